"""generate mode: greedy answers equal transformers' on the same prompts; a VQA task end to end
on the tiny image-text checkpoint with image files."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import QA_SETS, TASK_OF
from evalref import hf_greedy
from PIL import Image

from medgemma_train.cli import main
from medgemma_train.evals import GenerateMode, get_task, read_items


def _agree(records, model, tok, n):
    for r in records:
        want = hf_greedy(model, tok, r["prompt"], n)
        assert r["output_tokens"] == want, r["id"]
        assert r["output"] == tok.decode([t for t in want if t not in (1, 106)]), r["id"]


@pytest.mark.slow  # its first three items are in the slow test below (CI time)
def test_real_270m_first_items(ours_270m, reference_270m, qa_dir):
    model, tok = reference_270m
    task = get_task("medqa")
    items = read_items(task, qa_dir / "medqa_sampled_50.jsonl")[0].items[:3]
    records = GenerateMode(ours_270m, batch_size=3, max_new_tokens=12).score(items, task)
    assert records[0]["prompt"].startswith("<bos><start_of_turn>user\nAnswer the following")
    _agree(records, model, tok, 12)


@pytest.mark.slow
@pytest.mark.parametrize("name", QA_SETS)
def test_real_270m_first_ten_of_each_fixture(name, ours_270m, reference_270m, qa_dir):
    model, tok = reference_270m
    task = get_task(TASK_OF[name])
    items = read_items(task, qa_dir / f"{name}_sampled_50.jsonl")[0].items[:10]
    records = GenerateMode(ours_270m, batch_size=5).score(items, task)
    _agree(records, model, tok, task.max_new_tokens)


def test_vqa_end_to_end_on_the_tiny_image_text_model(tiny_mm, tokenizer_files, tmp_path,
                                                     capsys):
    import torch
    from transformers import AutoTokenizer

    from medgemma_core.testing import IMAGE_SIZE, random_images, reference_processor

    folder, reference = tiny_mm
    (tmp_path / "images").mkdir()
    for i, img in enumerate(random_images(5, [(90, 120), (64, 64), (150, 100)])):
        Image.fromarray(img).save(tmp_path / "images" / f"case{i}.png")
    rows = [{"qid": 1, "question": "Is there a fracture?", "answer": "no",
             "image_name": "case0.png", "answer_type": "CLOSED"},
            {"qid": 2, "question": "Which organ is shown?", "answer": "lung",
             "image_name": "case1.png", "answer_type": "OPEN"},
            {"qid": 3, "question": "Where is the lesion?", "answer": "left lobe",
             "image_name": "case2.png", "answer_type": "OPEN"},
            {"qid": 4, "question": "Is it missing?", "answer": "yes",
             "image_name": "gone.png", "answer_type": "CLOSED"}]
    data = tmp_path / "vqa_rad_test.json"
    data.write_text(json.dumps(rows))
    out = tmp_path / "run"
    rc = main(["eval", "vqa_rad", "--checkpoint", str(folder), "--data", str(data), "--out",
               str(out), "--max-new-tokens", "6", "--batch-size", "2", "--json",
               "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["n"] == 3 and summary["skipped"] == 1
    assert "gone.png" in summary["skipped_items"][0]["reason"]
    assert set(summary["groups"]["answer_type"]) == {"CLOSED", "OPEN"}
    assert {"accuracy", "token_f1"} <= set(summary["metrics"])
    records = [json.loads(x) for x in (out / "items.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == ["1", "2", "3"]
    hf_tok = AutoTokenizer.from_pretrained(tokenizer_files)
    processor = reference_processor(hf_tok)
    for r, row in zip(records, rows):
        assert r["prompt"].count("<start_of_image>") == 1
        image = Image.open(tmp_path / "images" / row["image_name"]).convert("RGB")
        inputs = processor(text=r["prompt"], images=[image], return_tensors="pt",
                           add_special_tokens=False)
        assert inputs["pixel_values"].shape[-1] == IMAGE_SIZE
        with torch.no_grad():
            gen = reference.generate(**inputs, max_new_tokens=6, do_sample=False,
                                     eos_token_id=[1, 106], pad_token_id=0)
        want = gen[0, inputs["input_ids"].shape[1]:].tolist()
        stop = next((i for i, t in enumerate(want) if t in (1, 106)), None)
        want = want if stop is None else want[:stop + 1]
        assert r["output_tokens"] == want, r["id"]
        assert r["gold"] == row["answer"] and isinstance(r["correct"], bool)
    assert np.isfinite(summary["metrics"]["token_f1"]["value"])


def test_cxr_tasks_generate_on_the_tiny_image_text_model(tiny_mm, tmp_path):
    """Report generation and multi-label classification end to end: DICOM and PNG images
    through the radiograph plugin, ROUGE-L recomputed with rouge-score on the raw outputs."""
    import pydicom
    from rouge_score import rouge_scorer

    from medgemma_core import load
    from medgemma_train.evals import evaluate

    dcm = pydicom.data.get_testdata_file("CT_small.dcm", download=False)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 50), dtype=np.uint8),
                    mode="L").save(tmp_path / "a.png")
    reports = tmp_path / "reports.jsonl"
    reports.write_text(json.dumps({"id": "r1", "image": "a.png", "report": "Heart size normal."})
                       + "\n" + json.dumps({"id": "r2", "image": dcm, "report": "No effusion."})
                       + "\n")
    model = load(tiny_mm[0])
    summary = evaluate(get_task("cxr_report"), GenerateMode(model, batch_size=2,
                                                            max_new_tokens=5),
                       data=reports, out=tmp_path / "rep", progress=False, n_boot=100)
    records = [json.loads(x) for x in (tmp_path / "rep" / "items.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == ["r1", "r2"] and summary["n"] == 2
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    want = np.mean([scorer.score(r["gold"], r["output"].strip())["rougeL"].fmeasure
                    for r in records])
    assert summary["metrics"]["rouge_l"]["value"] == pytest.approx(want, abs=1e-6)
    assert summary["metrics"]["bleu"]["value"] is not None
    assert "radgraph_f1" in summary["metrics"]
    labels = tmp_path / "labels.jsonl"
    labels.write_text(json.dumps({"image": "a.png", "labels": ["Edema"]}) + "\n")
    summary = evaluate(get_task("cxr_labels"), GenerateMode(model, max_new_tokens=5),
                       data=labels, progress=False, n_boot=100)
    assert summary["n"] == 1 and "macro_f1" in summary["metrics"]
