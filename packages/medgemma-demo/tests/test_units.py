"""Pieces of the demo without a server: uploads, prompts, presets, labels, plugins, loader."""

from __future__ import annotations

import importlib.metadata
import time
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import RecordingModel, solid_image

import medgemma_data
from medgemma_demo.chat import ChatService, text_only_note
from medgemma_demo.host import Loader
from medgemma_demo.plugins import plugin_table
from medgemma_demo.presets import PRESETS, preset
from medgemma_demo.prompting import messages, user_turn
from medgemma_demo.uploads import GALLERY_SIDE, UploadError, load_uploads, thumbnail
from medgemma_demo.zeroshot import parse_labels

MB = 1024 * 1024


def ct_series_dir() -> Path:
    from pydicom.data import get_testdata_file

    root = Path(get_testdata_file("CT_small.dcm", download=False)).parent
    return root / "dicomdirtests" / "98892001" / "CT5N"


# ---- uploads --------------------------------------------------------------------------------
def test_dicom_upload_gives_the_pixels_pydicom_decodes(cxr_dcm):
    loaded = load_uploads([cxr_dcm], max_bytes=10 * MB)
    ref = pydicom.dcmread(cxr_dcm).pixel_array  # MONOCHROME2, 8-bit: displayed as stored
    (image,) = loaded.samples[0].images
    assert image.shape == ref.shape + (3,)
    for c in range(3):
        np.testing.assert_array_equal(image[..., c], ref)
    (thumb, caption), = loaded.gallery
    assert thumb.shape == (GALLERY_SIDE, GALLERY_SIDE, 3)
    assert caption.startswith("radiograph")
    assert "siim" not in caption  # captions never carry file names
    assert "radiograph" in loaded.summary[0] and "1 image(s)" in loaded.summary[0]


def test_zipped_ct_series_goes_through_the_ct_plugin(tmp_path):
    series = ct_series_dir()
    files = sorted(p for p in series.iterdir() if p.is_file())
    zpath = tmp_path / "series.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for f in files:
            zf.write(f, f"CT5N/{f.name}")
        zf.writestr("__MACOSX/CT5N/._junk", b"junk")
    loaded = load_uploads([zpath], max_bytes=10 * MB)
    assert [s.modality for s in loaded.samples] == ["ct"]
    assert loaded.num_images == len(files)
    # slices are ordered by position, each captioned by the plugin's SLICE text
    assert [c for _, c in loaded.gallery] == [f"ct: SLICE {k}" for k in range(1, len(files) + 1)]
    rows = {int(pydicom.dcmread(f).Rows) for f in files}
    assert {img.shape[0] for img in loaded.samples[0].images} == rows


def test_zip_with_a_path_outside_its_folder_is_refused(tmp_path):
    zpath = tmp_path / "evil.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.writestr("../escape.dcm", b"x" * 10)
    with pytest.raises(UploadError, match="outside its folder"):
        load_uploads([zpath], max_bytes=MB)
    assert not (tmp_path.parent / "escape.dcm").exists()


def test_zip_bomb_is_refused_before_unpacking(tmp_path):
    zpath = tmp_path / "bomb.zip"
    with zipfile.ZipFile(zpath, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a/zeros.dcm", b"\0" * (5 * MB))
    assert zpath.stat().st_size < 100_000
    with pytest.raises(UploadError, match="unpacks to 5 MB .*--max-upload-mb"):
        load_uploads([zpath], max_bytes=MB)  # zips may unpack to 4x the limit


def test_upload_over_the_size_limit_is_refused(tmp_path):
    big = tmp_path / "big.png"
    big.write_bytes(b"\0" * (2 * MB))
    with pytest.raises(UploadError, match=r"over the 1 MB limit.*--max-upload-mb"):
        load_uploads([big], max_bytes=MB)


@pytest.mark.parametrize("name,data", [("broken.dcm", b"DICM" * 100), ("notes.txt", b"hello"),
                                        ("damaged.zip", b"PK\x03\x04garbage")])
def test_bad_upload_is_one_line_naming_the_file(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(UploadError) as info:
        load_uploads([path], max_bytes=MB)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    assert str(tmp_path) not in message  # the temporary folder is not shown
    if name != "damaged.zip":
        assert name in message


def test_thumbnail_keeps_aspect_and_small_images():
    img = np.zeros((1000, 500, 3), np.uint8)
    assert thumbnail(img, 200).shape == (200, 100, 3)
    small = np.zeros((10, 20, 3), np.uint8)
    assert thumbnail(small, 200) is small


# ---- prompts --------------------------------------------------------------------------------
def test_user_turn_multimodal_keeps_order_and_text_only_drops_images():
    samples = medgemma_data.load(ct_series_dir())
    n = len(samples[0].images)
    turn = user_turn("Describe.", samples, multimodal=True)
    kinds = [item["type"] for item in turn.content]
    assert kinds == ["text"] + ["image", "text"] * n
    assert turn.content[2]["text"] == "SLICE 1"
    assert turn.content[1]["image"] is samples[0].images[0]
    text_only = user_turn("Describe.", samples, multimodal=False)
    assert text_only.content == "Describe." and text_only.dropped_images == n


def test_user_turn_without_images_is_plain_text(tmp_path):
    assert user_turn("  Hi  ", [], multimodal=True).content == "Hi"
    assert user_turn("", [], multimodal=False).content == ""


def test_messages_fold_system_first_and_keep_history():
    history = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    out = messages(" Be brief. ", history, user_turn("c", [], multimodal=False))
    assert out == [{"role": "system", "content": "Be brief."}, *history,
                   {"role": "user", "content": "c"}]
    assert messages("", [], user_turn("c", [], multimodal=False))[0]["role"] == "user"


# ---- presets, labels, plugins -----------------------------------------------------------
def test_presets_cover_the_report_tasks():
    names = [p.name for p in PRESETS]
    assert len(names) == len(set(names))
    for task in ("X-ray", "VQA", "CT", "Dermatology", "Pathology", "EHR"):
        assert any(task in n for n in names), task
    assert preset(names[0]) is PRESETS[0]
    with pytest.raises(KeyError, match="choose one of"):
        preset("nope")


def test_parse_labels():
    assert parse_labels("pneumothorax\n normal , effusion\n\nnormal") == [
        "pneumothorax", "normal", "effusion"]
    with pytest.raises(ValueError, match="at least one label"):
        parse_labels(" \n ,")


def test_plugin_table_lists_installed_versions():
    table = plugin_table()
    names = [p.name for p in medgemma_data.list_plugins()]
    assert list(table["modality"]) == names
    assert {"radiograph", "ct", "wsi"} <= set(names)
    row = table[table["modality"] == "ct"].iloc[0]
    assert row["version"] == importlib.metadata.version("medgemma-data")
    assert row["distribution"] == "medgemma-data"


# ---- loader and status ----------------------------------------------------------------------
def test_loader_reports_a_failure_in_one_line():
    def boom():
        raise FileNotFoundError("no config.json in /x\nsecond line")

    loader = Loader(boom).start()
    assert loader.wait(30) is None
    assert loader.phase == "failed" and loader.error == "no config.json in /x"
    status = ChatService(loader).status()
    assert "failed to load" in status and "--checkpoint" in status


def test_status_and_text_only_note(tmp_path):
    model = RecordingModel(multimodal=False, name="tiny.gguf")
    service = ChatService(Loader.ready(model))
    assert "tiny.gguf" in service.status() and "text-only" in service.status()
    png = solid_image(tmp_path / "photo.png", (200, 30, 40))
    gallery, status, pending = service.upload([str(png)])
    assert len(gallery) == 1 and len(pending) == 1
    assert text_only_note("tiny.gguf") in status
    np.testing.assert_array_equal(pending[0].images[0][0, 0], [200, 30, 40])



class _Request:
    session_hash = "s1"


def test_stop_ends_the_stream_and_keeps_the_partial_answer():
    model = RecordingModel(multimodal=False, delay=0.01)
    service = ChatService(Loader.ready(model))
    request = _Request()
    _, display, _, question, sent, *_ = service.submit("hello", [], [], request)
    stream = service.respond(question, display, [], sent, "", 64, 0.0, request=request)
    first = next(stream)
    assert first[0][-1]["content"].endswith("▌")  # streaming, cursor shown
    service.request_stop(request)
    *_, (chat, _, history) = list(stream)
    assert chat[-1]["content"].endswith("_(stopped)_")
    partial = history[-1]["content"]
    full = "seen 1 messages and 0 images "
    assert 0 < len(partial) < len(full) and full.startswith(partial)
    assert history[0] == {"role": "user", "content": "hello"}
    deadline = time.monotonic() + 10
    while model.active and time.monotonic() < deadline:
        time.sleep(0.01)
    assert model.active == 0  # the model's generator was closed


def test_second_turn_sends_the_history():
    model = RecordingModel(multimodal=False)
    service = ChatService(Loader.ready(model))
    request = _Request()
    display, history = [], []
    for text in ("first", "second"):
        _, display, _, q, *_ = service.submit(text, display, [], request)
        *_, (display, _, history) = list(service.respond(q, display, history, [], "sys", 16,
                                                         0.0, request=request))
    assert [m["role"] for m in model.calls[-1]] == ["system", "user", "assistant", "user"]
    assert model.calls[-1][1]["content"] == "first" and model.calls[-1][3]["content"] == "second"
    assert display[-1]["content"] == "seen 4 messages and 0 images "


def test_a_second_question_waits_for_the_first_answer():
    import gradio as gr

    service = ChatService(Loader.ready(RecordingModel(multimodal=False)))
    request = _Request()
    _, display, _, q, *_ = service.submit("one", [], [], request)
    with pytest.raises(gr.Error, match="still coming"):
        service.submit("two", display, [], request)
    list(service.respond(q, display, [], [], "", 8, 0.0, request=request))
    assert service.submit("two", display, [], request)[3] == "two"
    with pytest.raises(gr.Error, match="type a question"):
        ChatService(Loader.ready(RecordingModel(multimodal=False))).submit(" ", [], [], request)


def test_a_qa_file_gives_its_first_question_as_text():
    import json

    from conftest import fixtures_dir

    path = fixtures_dir() / "qa" / "medqa_sampled_50.jsonl"
    first = json.loads(path.read_text().splitlines()[0])
    loaded = load_uploads([path], max_bytes=10 * MB, max_samples=1)
    assert len(loaded.samples) == 1 and "first 1 of 50 samples" in loaded.summary[0]
    turn = user_turn("Answer with a letter.", loaded.samples, multimodal=False)
    assert turn.content.startswith("Answer with a letter.\n\n")
    assert first["question"][:40] in turn.content
    for option in first["options"].values():
        assert option in turn.content


def test_a_bad_upload_empties_the_gallery_and_says_why(tmp_path):
    bad = tmp_path / "scan.dcm"
    bad.write_bytes(b"no dicom here" * 10)
    service = ChatService(Loader.ready(RecordingModel(multimodal=True)))
    gallery, status, pending = service.upload([str(bad)])
    assert gallery == [] and pending == []
    assert status.startswith("**Could not read the upload:** scan.dcm")


# ---- base-model prompts, reading options, launch hints ---------------------------------------
def test_base_prompt_frames_the_question_and_the_history():
    from medgemma_demo.prompting import BASE_EXAMPLES, Turn, base_prompt

    history = [{"role": "user", "content": "What is a fracture?"},
               {"role": "assistant", "content": "A broken bone."}]
    text = base_prompt("", history, Turn("Question: Is water wet?\nA. yes\nB. no", 0))
    blocks = text.split("\n\n")
    assert blocks[0] == "The following are medical questions, each followed by a short, " \
                        "correct answer written by a physician."
    assert blocks[1:1 + len(BASE_EXAMPLES)] == [f"Question: {q}\nAnswer: {a}"
                                                for q, a in BASE_EXAMPLES]
    assert blocks[-2] == "Question: What is a fracture?\nAnswer: A broken bone."
    assert blocks[-1] == "Question: Is water wet?\nA. yes\nB. no\nAnswer:"  # no double prefix
    assert base_prompt("Be brief.", [], Turn("Hi?", 0)).startswith("Be brief.\n\n")


def test_stop_strings_cut_and_hold_back():
    from medgemma_demo.prompting import cut_at_stop, held_back

    assert cut_at_stop(" B. ECG\n\nQuestion: next") == (" B. ECG", True)
    assert cut_at_stop(" B. ECG\nQuestion: x") == (" B. ECG", True)
    assert cut_at_stop(" two\nlines") == (" two\nlines", False)
    assert held_back("answer\n") == 1 and held_back("answer\nQues") == 5
    assert held_back("answer") == 0


def test_reading_options_reach_the_plugin_and_messages_name_the_control(tmp_path):
    from medgemma_demo.uploads import options_markdown, parse_options

    assert parse_options("min_tissue=0.1\n windows = serving ") == {"min_tissue": "0.1",
                                                                    "windows": "serving"}
    with pytest.raises(UploadError, match="not key=value"):
        parse_options("min_tissue")
    assert "min_tissue=0.25" in options_markdown("wsi") and "windows" not in \
        options_markdown("wsi")
    assert "windows=notebook" in options_markdown(None)
    png = solid_image(tmp_path / "skin.png", (200, 120, 100))
    padded = load_uploads([png], max_bytes=MB, modality="derm",
                          options={"pad_square": "true"})
    assert padded.samples[0].images[0].shape == (64, 64, 3)  # 64x48 padded to a square
    for surface, word in (("page", "'Read as' modality"), ("api", "modality argument")):
        with pytest.raises(UploadError, match=word):
            load_uploads([png], max_bytes=MB, modality="ct", surface=surface)


def test_bundled_slide_with_too_few_tissue_names_the_option_and_reads_with_it():
    from conftest import fixtures_dir

    slide = fixtures_dir() / "wsi" / "small.svs"
    try:
        load_uploads([slide], max_bytes=64 * MB, options={"min_tissue": "0.99"})
    except UploadError as exc:
        assert "min_tissue (in the 'Read options')" in str(exc)
    else:
        pytest.fail("min_tissue=0.99 should leave no tissue on the bundled slide")
    loaded = load_uploads([slide], max_bytes=64 * MB, options={"min_tissue": "0.01"})
    assert loaded.num_images >= 1


def test_mode_follows_the_checkpoint(tmp_path):
    import json

    from medgemma_demo.chat import has_chat_template

    assert ChatService(Loader(lambda: None), checkpoint=None).mode == "base"  # the default
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True}))
    assert not has_chat_template(folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ x }}"}))
    assert has_chat_template(folder)
    assert ChatService(Loader(lambda: None), prompt_mode="base").mode == "base"
    with pytest.raises(ValueError, match="auto, chat or base"):
        ChatService(Loader(lambda: None), prompt_mode="instruct")


def test_hints_name_the_way_the_demo_was_started(monkeypatch):
    from medgemma_demo.app import launch_command

    monkeypatch.setenv("NOX_CURRENT_SESSION", "demo")
    assert launch_command() == "nox -s demo --"
    monkeypatch.delenv("NOX_CURRENT_SESSION")
    monkeypatch.setattr("sys.argv", ["/somewhere/venv/bin/medgemma-demo"])
    assert launch_command() == "/somewhere/venv/bin/medgemma-demo"  # not on PATH
    monkeypatch.setattr("sys.argv", ["/x/medgemma_demo/__main__.py"])
    assert launch_command() == "python -m medgemma_demo"
    service = ChatService(Loader.ready(RecordingModel(multimodal=False)), command="nox -s demo --")
    png_note = text_only_note("m", service.command)
    assert "`nox -s demo -- --checkpoint" in png_note
