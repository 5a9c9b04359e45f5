"""The Train and Evaluate tabs' pieces without a browser: one job per server, Stop, and what
the tabs read from a run's files (written here by hand, in medgemma-train's formats)."""

from __future__ import annotations

import json
import sys
import time

import pytest

from medgemma_demo import jobs
from medgemma_demo.workbench import BUNDLED, bundled_path, headline, items_table, loss_table


def test_one_job_at_a_time_and_stop_ends_it(tmp_path, monkeypatch):
    monkeypatch.setattr(jobs, "train_command",
                        lambda: [sys.executable, "-c", "import time; time.sleep(60)"])
    slot = jobs.JobSlot()
    job = slot.start("training", [], tmp_path / "a")
    assert job.running
    with pytest.raises(RuntimeError, match="one run at a time"):
        slot.start("evaluation", [], tmp_path / "b")
    job.stop(timeout=10)
    assert not job.running and job.stopped and job.returncode != 0
    again = slot.start("evaluation", [], tmp_path / "c")  # the slot is free again
    again.stop(timeout=10)


def test_the_loss_curve_reads_complete_train_lines(tmp_path):
    lines = [{"step": 1, "split": "train", "loss": 12.5, "tokens_per_s": 3.0},
             {"step": 1, "split": "eval", "loss": 11.0},
             {"step": 2, "split": "train", "loss": 12.25}]
    (tmp_path / "metrics.jsonl").write_text(
        "".join(json.dumps(x) + "\n" for x in lines) + '{"step": 3, "spl')  # being written
    table = loss_table(tmp_path)
    assert table["step"].tolist() == [1, 2] and table["loss"].tolist() == [12.5, 12.25]


def test_items_and_headline_from_an_eval_run(tmp_path):
    items = [{"id": "23", "prompt": "Header\n\nQuestion: Which organism?\nA. x\nB. y\nAnswer:",
              "parsed": "B", "gold": "B", "correct": True},
             {"id": "24", "prompt": "Question: Which drug?\nAnswer:", "parsed": "A",
              "gold": "C", "correct": False},
             {"id": "25", "skipped": "too long"}]
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(x) + "\n" for x in items))
    table = items_table(tmp_path)
    assert table.to_dict("records") == [
        {"id": "23", "question": "Which organism? A. x B. y Answer:", "answer": "B",
         "gold": "B", "correct": True},
        {"id": "24", "question": "Which drug? Answer:", "answer": "A", "gold": "C",
         "correct": False}]
    summary = {"headline": "accuracy",
               "metrics": {"accuracy": {"value": 0.5, "ci95": [0.0, 1.0]}}}
    assert headline(summary) == ("accuracy", 0.5, 0.0, 1.0)


def test_bundled_sets_ship_with_medgemma_train():
    for name in BUNDLED:
        path = bundled_path(name)
        assert path.is_file() and path.stat().st_size > 1000, path


def test_job_log_names_the_error(tmp_path, monkeypatch):
    monkeypatch.setattr(jobs, "train_command", lambda: [
        sys.executable, "-c",
        "import sys; print('step 1'); print('medgemma-train: error: no such file x.jsonl'); "
        "sys.exit(2)"])
    job = jobs.Job("training", [], tmp_path)
    deadline = time.monotonic() + 30
    while job.running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert job.returncode == 2
    assert job.error_line() == "medgemma-train: error: no such file x.jsonl"
