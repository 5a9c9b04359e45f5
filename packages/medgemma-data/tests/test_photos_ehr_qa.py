"""derm / fundus photographs, FHIR bundles, QA sets."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _gen import fhir_bundle, fundus_image, skin_image, write_json, write_photo
from PIL import Image

import medgemma_data as md
from medgemma_data.errors import InvalidInputError

# -- photographs ------------------------------------------------------------------------------


def test_fundus_and_derm_are_told_apart(tmp_path):
    fundus = write_photo(tmp_path / "eye.png", fundus_image())
    skin = write_photo(tmp_path / "skin.png", skin_image())
    assert md.detect(fundus) == "fundus"
    assert md.detect(skin) == "derm"
    [s] = md.load(fundus)
    np.testing.assert_array_equal(s.images[0], fundus_image())


@pytest.mark.parametrize("orientation, rotate", [(3, 180), (6, 270), (8, 90)])
def test_exif_orientation_is_applied(tmp_path, orientation, rotate):
    raw = skin_image()
    path = write_photo(tmp_path / "skin.png", raw, orientation=orientation)
    [s] = md.load(path)
    expected = np.asarray(Image.fromarray(raw).rotate(rotate, expand=True))
    np.testing.assert_array_equal(s.images[0], expected)
    assert s.metadata["exif_orientation"] == orientation


def test_pad_to_square(tmp_path):
    raw = skin_image(240, 160)
    path = write_photo(tmp_path / "skin.png", raw)
    [s] = md.load(path, options={"pad_square": "true", "pad_color": "102030"})
    image = s.images[0]
    assert image.shape == (240, 240, 3)
    np.testing.assert_array_equal(image[40:200], raw)
    assert (image[:40] == (0x10, 0x20, 0x30)).all() and (image[200:] == (16, 32, 48)).all()
    with pytest.raises(md.MedgemmaDataError, match="colour"):
        md.load(path, options={"pad_square": "true", "pad_color": "blue"})
    with pytest.raises(md.OptionError, match="true or false"):
        md.load(path, options={"pad_square": "maybe"})


def test_jpeg_photo_and_broken_photo(tmp_path):
    path = write_photo(tmp_path / "eye.jpg", fundus_image(256))
    assert md.detect(path) == "fundus"
    [s] = md.load(path)
    assert s.images[0].shape == (256, 256, 3)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(path.read_bytes()[:200])
    with pytest.raises(InvalidInputError, match="not a readable image"):
        md.load(broken, modality="derm")


# -- FHIR -------------------------------------------------------------------------------------


def test_fhir_bundle_becomes_a_chronological_record(tmp_path):
    path = write_json(tmp_path / "bundle.json", fhir_bundle())
    assert md.detect(path) == "ehr"
    [s] = md.load(path)
    assert s.images == [] and len(s.texts) == 1
    text = s.texts[0]
    facts = ["Penicillin", "Hives", "Type 2 diabetes mellitus", "Metformin 500 mg tablet",
             "one tablet twice daily", "Retinal photography", "Hemoglobin A1c", "7.2 %"]
    for fact in facts:
        assert fact in text
    order = [text.index(f) for f in ("2010-01-05", "2015-03-02", "2015-03-10", "2019-11-20",
                                     "2021-06-01")]
    assert order == sorted(order)
    for secret in ("Smithington", "Alexandra", "1961-04-12", "MRN-998877"):
        assert secret not in text and secret not in repr(s.metadata)
    assert s.metadata["gender"] == "female"
    assert s.metadata["resource_counts"]["Observation"] == 1


def test_json_that_is_not_fhir(tmp_path):
    path = write_json(tmp_path / "x.json", {"hello": "world"})
    with pytest.raises(md.DetectionError):
        md.load(path)
    with pytest.raises(InvalidInputError, match="not a FHIR Bundle"):
        md.load(path, modality="ehr")
    patient = write_json(tmp_path / "p.json", {"resourceType": "Patient", "gender": "male"})
    with pytest.raises(InvalidInputError, match="not a FHIR Bundle"):
        md.load(patient, modality="ehr")
    notjson = tmp_path / "n.json"
    notjson.write_text("{not json")
    with pytest.raises(InvalidInputError, match="not JSON"):
        md.load(notjson, modality="ehr")


def test_invalid_bundle_error_names_the_field_not_the_value(tmp_path):
    bundle = fhir_bundle()
    bundle["entry"][1]["resource"]["valueQuantity"]["value"] = "Smithington-seven"
    path = write_json(tmp_path / "bad.json", bundle)
    with pytest.raises(InvalidInputError, match="not a valid FHIR R4 Bundle") as info:
        md.load(path)
    assert "Smithington" not in str(info.value)


# -- QA sets ----------------------------------------------------------------------------------

SETS = ["medqa", "medmcqa", "pubmedqa", "mmlu", "afrimedqa"]


@pytest.mark.parametrize("name", SETS)
def test_all_questions_parsed(fixtures, name):
    path = fixtures / "qa" / f"{name}_sampled_50.jsonl"
    raw = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    assert md.detect(path) == "qa"
    samples = md.load(path)
    assert len(samples) == len(raw) == 50
    for s, item in zip(samples, raw):
        assert s.label == item["answer_idx"]
        [text] = s.texts
        assert item["question"].strip() in text
        for letter, option in item["options"].items():
            assert f"\n{letter}. {str(option).strip()}" in text
        assert s.metadata["dataset"] == name
        assert s.metadata["num_options"] == len(item["options"])


def test_vqa_set_with_image_folder(tmp_path):
    (tmp_path / "images").mkdir()
    write_photo(tmp_path / "images" / "a.png", skin_image())
    write_photo(tmp_path / "images" / "b.png", fundus_image())
    items = [
        {"img_name": "a.png", "question": "Is there a lesion?", "answer": "yes",
         "answer_type": "CLOSED", "q_lang": "en"},
        {"img_name": "b.png", "question": "这是什么?", "answer": "眼底", "q_lang": "zh"},
        {"img_name": "b.png", "question": "Which organ?", "answer": "Eye ", "q_lang": "en"},
    ]
    path = write_json(tmp_path / "slake_test.json", items)
    assert md.detect(path) == "qa"
    samples = md.load(path)
    assert [s.label for s in samples] == ["yes", "Eye"]
    assert samples[0].texts == ["Is there a lesion?"]
    np.testing.assert_array_equal(samples[1].images[0], fundus_image())
    assert samples[0].metadata["dataset"] == "slake"
    assert len(md.load(path, options={"language": ""})) == 3
    missing = write_json(tmp_path / "vqa.json", [{"image_name": "zz.png", "question": "q",
                                                  "answer": "a"}])
    with pytest.raises(InvalidInputError, match="not found"):
        md.load(missing)


def test_bad_qa_lines(tmp_path):
    path = tmp_path / "medqa_bad.jsonl"
    path.write_text('{"question": "q", "options": {"A": "x"}, "answer_idx": "A"}\n{oops\n')
    with pytest.raises(InvalidInputError, match=r"medqa_bad.jsonl:2 is not JSON"):
        md.load(path)
    path.write_text('{"question": "q", "options": {"A": "x"}, "answer_idx": "C"}\n')
    with pytest.raises(InvalidInputError, match="answer_idx 'C'"):
        md.load(path)
