"""gradio_client against a running app with a recording stand-in model and a tiny MedSigLIP.

The stand-in records exactly what the app sends the model, so these tests check the wiring:
a DICOM reaches the model as the pixels pydicom decodes, settings pass through, requests queue,
bad uploads come back as one-line errors, identifiers stay out of the logs.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import RecordingModel, launch, solid_image
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from medgemma_demo import DemoConfig, Loader, build_app

CORPUS = ["a chest x-ray showing pneumonia", "normal chest radiograph", "pleural effusion",
          "pneumothorax on the right side", "cardiomegaly with mild edema", "benign nevus"]


def _tiny_medsiglip(folder: Path) -> Path:
    """A tiny random two-tower SigLIP saved by medsiglip, with a SentencePiece model trained here."""
    from flax import nnx

    from medsiglip import SiglipConfig, SiglipModel, save_checkpoint
    from medsiglip.testing import train_sentencepiece

    spiece = train_sentencepiece(folder, CORPUS, vocab_size=60, shuffled_lines=200,
                                 words_per_line=6)
    model = SiglipModel(SiglipConfig.tiny(vocab_size=64, image_size=32), rngs=nnx.Rngs(3))
    return save_checkpoint(model, folder / "ckpt", tokenizer_file=spiece)


@pytest.fixture(scope="module")
def model() -> RecordingModel:
    return RecordingModel(multimodal=True, delay=0.02)


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory) -> Path:
    return _tiny_medsiglip(tmp_path_factory.mktemp("siglip"))


@pytest.fixture(scope="module")
def client(model, siglip_dir):
    config = DemoConfig(medsiglip=str(siglip_dir), max_upload_mb=5, max_new_tokens=16)
    app = build_app(config, loader=Loader.ready(model))
    url = launch(app, config)
    yield Client(url, verbose=False)
    app.close()


@pytest.fixture
def text_only(model):
    model._multimodal = False
    yield model
    model._multimodal = True


def test_chat_answers_and_passes_settings(client, model):
    answer = client.predict("What is a pneumothorax?", None, "Be brief.", 12, 0.5,
                            api_name="/chat")
    sent = model.calls[-1]
    assert sent == [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "What is a pneumothorax?"}]
    from medgemma_core import Sampling

    assert model.kwargs[-1] == {"max_new_tokens": 12, "sampling": Sampling(temperature=0.5)}
    assert answer == "seen 2 messages and 0 images "


def test_dicom_goes_through_the_data_plugin_to_the_model(client, model, cxr_dcm):
    answer = client.predict("Describe this X-ray.", handle_file(str(cxr_dcm)), "", 16, 0.0,
                            api_name="/chat")
    (user,) = model.calls[-1]
    items = user["content"]
    assert [i["type"] for i in items] == ["text", "image"]
    assert items[0]["text"] == "Describe this X-ray."
    ref = pydicom.dcmread(cxr_dcm).pixel_array  # the independent decode
    image = items[1]["image"]
    assert image.dtype == np.uint8 and image.shape == (*ref.shape, 3)
    np.testing.assert_array_equal(image[..., 1], ref)
    assert answer == "seen 1 messages and 1 images 1024x1024"


def test_text_only_model_refuses_images_with_the_fix(client, text_only, cxr_dcm):
    with pytest.raises(AppError, match="text-only.*--checkpoint"):
        client.predict("Describe.", handle_file(str(cxr_dcm)), "", 16, 0.0, api_name="/chat")


def test_bad_upload_is_an_error_message_not_a_trace(client, tmp_path):
    bad = tmp_path / "scan.dcm"
    bad.write_bytes(b"not a dicom file at all" * 10)
    with pytest.raises(AppError) as info:
        client.predict("Describe.", handle_file(str(bad)), "", 16, 0.0, api_name="/chat")
    message = str(info.value)
    assert "scan.dcm" in message and "Traceback" not in message and "\n" not in message
    assert "modality argument" in message and "Read as" not in message  # the API's words


def test_upload_over_the_limit_is_refused(client, tmp_path):
    big = tmp_path / "big.png"
    big.write_bytes(b"\0" * (6 * 1024 * 1024))  # the app allows 5 MB
    with pytest.raises(ValueError, match="exceeds the maximum file size of 5242880"):
        client.predict("Describe.", handle_file(str(big)), "", 16, 0.0, api_name="/chat")


def test_concurrent_users_are_queued(client, model):
    model.max_active = 0
    jobs = [client.submit(f"question {k}", None, "", 16, 0.0, api_name="/chat")
            for k in range(4)]
    answers = [job.result(timeout=120) for job in jobs]
    assert answers == ["seen 1 messages and 0 images "] * 4
    assert model.max_active == 1  # one generation at a time; the others waited in the queue


def test_no_identifiers_in_logs(client, model, cxr_dcm, tmp_path, caplog, capfd):
    ds = pydicom.dcmread(cxr_dcm)
    ds.PatientName = "Zzsecretname^Jane"
    ds.PatientID = "ZZID-4711-SECRET"
    ds.PatientBirthDate = "19010203"
    named = tmp_path / "Zzsecretname_Jane_ZZID-4711-SECRET.dcm"
    ds.save_as(named)
    caplog.set_level(logging.DEBUG)
    answer = client.predict("Describe.", handle_file(str(named)), "", 16, 0.0, api_name="/chat")
    assert answer.startswith("seen 1 messages and 1 images")
    out, err = capfd.readouterr()
    logged = caplog.text + out + err
    assert "upload: radiograph" in logged  # the app did log this request...
    for marker in ("Zzsecretname", "ZZID-4711", "19010203"):  # ...without identifiers
        assert marker not in logged
        assert marker not in repr(model.calls[-1])


def test_zero_shot_matches_medsiglip_called_directly(client, siglip_dir, tmp_path):
    from medsiglip import MedSigLIP

    png = solid_image(tmp_path / "img.png", (180, 40, 90), size=(40, 30))
    labels = "pneumothorax\nnormal chest radiograph\npleural effusion"
    preview, chart = client.predict(handle_file(str(png)), labels, api_name="/zero_shot")
    rows = {r[0]: r[1] for r in chart["data"]}
    ref_model = MedSigLIP.from_pretrained(siglip_dir)
    image = np.full((30, 40, 3), (180, 40, 90), np.uint8)
    ref = ref_model.zero_shot([image], labels.splitlines())[0]
    assert list(rows) == [labels.splitlines()[i] for i in np.argsort(-ref, kind="stable")]
    for label, p in zip(labels.splitlines(), ref):
        assert rows[label] == pytest.approx(float(p), rel=1e-4)  # JSON keeps 6 digits
    from PIL import Image

    np.testing.assert_array_equal(np.asarray(Image.open(preview).convert("RGB")), image)


def test_zero_shot_with_no_labels_is_an_error(client, tmp_path):
    png = solid_image(tmp_path / "img.png", (1, 2, 3))
    with pytest.raises(AppError, match="at least one label"):
        client.predict(handle_file(str(png)), "  \n", api_name="/zero_shot")


def test_page_shows_the_notice_and_api_lists_chat(client):
    import urllib.request

    html = urllib.request.urlopen(client.src, timeout=30).read().decode()
    assert "Research use only" in html and "Not for clinical decisions" in html
    api = client.view_api(return_format="dict", print_info=False)
    params = [p["parameter_name"] for p in api["named_endpoints"]["/chat"]["parameters"]]
    assert params == ["message", "file", "system", "max_new_tokens", "temperature", "modality",
                      "options", "repetition_penalty", "no_repeat_ngram_size"]
    required = [p["parameter_name"] for p in api["named_endpoints"]["/chat"]["parameters"]
                if not p["parameter_has_default"]]
    assert required == ["message"]


def test_chat_reads_the_file_as_the_given_modality(client, model, tmp_path):
    png = solid_image(tmp_path / "skin.png", (200, 120, 100))
    client.predict("What is this?", handle_file(str(png)), "", 16, 0.0, "derm", api_name="/chat")
    assert model.calls[-1][-1]["content"][1]["image"].shape == (48, 64, 3)
    with pytest.raises(AppError, match="skin.png is not a DICOM.*modality argument"):
        client.predict("What is this?", handle_file(str(png)), "", 16, 0.0, "ct",
                       api_name="/chat")



def test_chat_takes_a_message_alone_as_documented(client, model):
    """The README's call: no file, no settings (each has a default for gradio_client)."""
    answer = client.predict("What is a pneumothorax?", api_name="/chat")
    assert answer == "seen 1 messages and 0 images "
    assert model.calls[-1] == [{"role": "user", "content": "What is a pneumothorax?"}]
    from medgemma_core import Sampling

    assert model.kwargs[-1] == {"max_new_tokens": 16, "sampling": Sampling()}  # the defaults


def test_chat_takes_each_optional_argument_by_name(client, model, cxr_dcm, tmp_path):
    from medgemma_core import Sampling

    assert client.predict("Describe.", file=handle_file(str(cxr_dcm)), api_name="/chat") == \
        "seen 1 messages and 1 images 1024x1024"
    client.predict("Hi", system="Be brief.", api_name="/chat")
    assert model.calls[-1][0] == {"role": "system", "content": "Be brief."}
    client.predict("Hi", max_new_tokens=5, api_name="/chat")
    assert model.kwargs[-1]["max_new_tokens"] == 5
    client.predict("Hi", temperature=0.7, api_name="/chat")
    assert model.kwargs[-1]["sampling"] == Sampling(temperature=0.7)
    client.predict("Hi", repetition_penalty=1.3, no_repeat_ngram_size=3, api_name="/chat")
    assert model.kwargs[-1]["sampling"] == Sampling(repetition_penalty=1.3,
                                                    no_repeat_ngram_size=3,
                                                    penalize_prompt=False)
    png = solid_image(tmp_path / "skin.png", (200, 120, 100))
    client.predict("What?", file=handle_file(str(png)), modality="derm", api_name="/chat")
    assert model.calls[-1][-1]["content"][1]["image"].shape == (48, 64, 3)
    client.predict("What?", file=handle_file(str(png)), modality="derm",
                   options="pad_square=true", api_name="/chat")
    assert model.calls[-1][-1]["content"][1]["image"].shape == (64, 64, 3)
    with pytest.raises(AppError, match="not key=value"):
        client.predict("What?", file=handle_file(str(png)), options="pad_square",
                       api_name="/chat")
