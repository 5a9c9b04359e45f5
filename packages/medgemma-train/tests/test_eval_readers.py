"""Readers: the QA fixtures through medgemma-data, corrupt items skipped and counted, wrong
formats refused, VQA and chest X-ray manifests with image files."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import QA_SETS, TASK_OF
from PIL import Image

from medgemma_train.evals import EvalError, get_task, read_items
from medgemma_train.evals.readers import cxr_labels_reader, cxr_report_reader, read_mcq
from medgemma_train.evals.tasks import CXR_LABELS, DATA


@pytest.mark.parametrize("name", QA_SETS)
def test_fixtures_read_item_by_item(name, qa_dir):
    path = qa_dir / f"{name}_sampled_50.jsonl"
    raw = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    read, _ = read_items(get_task(TASK_OF[name]), path)
    assert read.skipped == [] and len(read.items) == len(raw) == 50
    for item, want in zip(read.items, raw):
        assert item.question == want["question"].strip()
        assert item.gold == want["answer_idx"]
        assert dict(item.options) == {k: v.strip() for k, v in sorted(want["options"].items())}
    assert len({i.id for i in read.items}) == 50


@pytest.mark.parametrize("name", QA_SETS)
def test_bundled_data_is_the_repository_fixture(name, qa_dir):
    bundled = DATA / f"{name}_sampled_50.jsonl"
    assert bundled.read_bytes() == (qa_dir / bundled.name).read_bytes()
    assert get_task(TASK_OF[name]).fixture == bundled


def test_corrupt_lines_are_skipped_and_counted(tmp_path, qa_dir):
    lines = (qa_dir / "medqa_sampled_50.jsonl").read_bytes().splitlines()[:6]
    bad = json.loads(lines[3])
    bad["answer_idx"] = "Z"
    lines[1] = lines[1][:40]                      # cut short
    lines[3] = json.dumps(bad).encode()           # answer not among the options
    lines[4] = b'{"question": "x", "options": {"A": "\xff"}}'  # not UTF-8
    path = tmp_path / "medqa_broken.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    read = read_mcq(path, num_options=4)
    assert [s.where for s in read.skipped] == [f"{path}:2", f"{path}:5", f"{path}:4"]
    assert "not JSON" in read.skipped[0].reason
    assert "UTF-8" in read.skipped[1].reason
    assert "answer_idx 'Z'" in read.skipped[2].reason
    assert [i.where for i in read.items] == [f"{path}:{n}" for n in (1, 3, 6)]


def test_option_count_of_the_task(tmp_path):
    path = tmp_path / "medqa5.jsonl"
    rows = [{"question": "q1", "options": list("vwxyz"), "answer_idx": "B"},
            {"question": "q2", "options": list("wxyz"), "answer_idx": "C"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    read, _ = read_items(get_task("medqa_5"), path)
    assert [i.question for i in read.items] == ["q1"]
    assert dict(read.items[0].options) == dict(zip("ABCDE", "vwxyz"))
    assert read.skipped[0].reason == "4 options; this task takes 5"


@pytest.mark.parametrize(("content", "match"), [
    ('{"text": "hello"}\n', "not a multiple-choice JSONL"),
    ("not json at all\nstill not\n", "no multiple-choice item"),
    ("", "no multiple-choice item"),
])
def test_wrong_formats_are_refused(tmp_path, content, match):
    path = tmp_path / "x.jsonl"
    path.write_text(content)
    with pytest.raises(EvalError, match=match):
        read_items(get_task("medqa"), path)


def test_mostly_broken_file_is_the_wrong_format(tmp_path):
    good = {"question": "q", "options": list("abcd"), "answer_idx": "A"}
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps(good) + "\n" + "garbage\n" * 20)
    with pytest.raises(EvalError, match="20 of 21 items are unreadable"):
        read_items(get_task("medqa"), path)


def _png(path, seed, size=(40, 48)):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
    return np.asarray(Image.open(path).convert("RGB"))


def test_vqa_json_with_images(tmp_path):
    (tmp_path / "images").mkdir()
    pixels = [_png(tmp_path / "images" / f"{i}.png", i) for i in range(3)]
    (tmp_path / "images" / "broken.png").write_bytes(b"\x89PNG not really")
    items = [
        {"qid": 11, "question": "Is there a mass?", "answer": "Yes", "image_name": "0.png",
         "answer_type": "CLOSED", "q_lang": "en"},
        {"qid": 12, "question": "Which organ?", "answer": "liver", "image_name": "1.png",
         "q_lang": "en"},
        {"qid": 13, "question": "missing", "answer": "x", "image_name": "nope.png"},
        {"qid": 14, "question": "Quel organe ?", "answer": "foie", "image_name": "2.png",
         "q_lang": "fr"},
        {"qid": 15, "question": "broken", "answer": "x", "image_name": "broken.png"},
        {"qid": 16, "question": "Is it normal?", "answer": "no", "image_name": "2.png"},
    ]
    path = tmp_path / "slake_test.json"
    path.write_text(json.dumps(items))
    read, _ = read_items(get_task("slake"), path)
    assert [i.id for i in read.items] == ["11", "12", "16"]
    assert [i.meta["answer_type"] for i in read.items] == ["CLOSED", "OPEN", "CLOSED"]
    np.testing.assert_array_equal(read.items[1].images[0], pixels[1])
    assert sorted(s.where for s in read.skipped) == [f"{path}: item 2", f"{path}: item 4"]
    vqa_rad, _ = read_items(get_task("vqa_rad"), path)  # all languages
    assert [i.id for i in vqa_rad.items] == ["11", "12", "14", "16"]


def test_cxr_manifests(tmp_path):
    (tmp_path / "img").mkdir()
    _png(tmp_path / "img" / "a.png", 0)
    _png(tmp_path / "img" / "b.png", 1)
    rows = [{"image": "img/a.png", "labels": ["Cardiomegaly", "pleural effusion"]},
            {"image": "img/b.png", "labels": ["No Finding"]},
            {"image": "img/c.png", "labels": []},
            {"image": "img/a.png", "labels": ["Pneumonia"]}]
    jsonl = tmp_path / "cxr.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{broken\n")
    read = cxr_labels_reader(CXR_LABELS)(jsonl)
    assert [i.gold for i in read.items] == [("Cardiomegaly", "Pleural Effusion"), ()]
    assert [s.where.rsplit(":", 1)[1] for s in read.skipped] == ["3", "4", "5"]
    assert "not found" in read.skipped[0].reason and "unknown label" in read.skipped[1].reason
    image = read.items[0].load_images()[0]  # through the radiograph plugin: gray, stretched
    assert image.dtype == np.uint8 and image.shape == (40, 48, 3)
    csv_path = tmp_path / "cxr.csv"
    csv_path.write_text("Path,Atelectasis,Cardiomegaly,Consolidation,Edema,Pleural Effusion\n"
                        "img/a.png,1.0,0.0,-1.0,,1\nimg/b.png,,,,,\n")
    assert [i.gold for i in cxr_labels_reader(CXR_LABELS)(csv_path).items] == [
        ("Atelectasis", "Pleural Effusion"), ()]
    reports = tmp_path / "reports.jsonl"
    reports.write_text(json.dumps({"image": "img/a.png", "report": "Normal heart size."}) + "\n"
                       + json.dumps({"image": "img/b.png", "report": ""}) + "\n")
    read = cxr_report_reader()(reports)
    assert [i.gold for i in read.items] == ["Normal heart size."] and len(read.skipped) == 1
    with pytest.raises(EvalError, match="not a chest X-ray label manifest"):
        cxr_labels_reader(CXR_LABELS)(reports)
