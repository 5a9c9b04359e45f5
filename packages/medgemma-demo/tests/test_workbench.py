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


def test_the_train_tab_defaults_keep_every_bundled_row_whole(tmp_path):
    """The Train tab's own ``medgemma-train sft`` arguments, at its default settings, on each
    bundled set (a tiny text model with the real tokenizer), planned with ``--dry-run``: no row
    is cut at the default Tokens per row, so none is skipped, and the rows are packed."""
    import subprocess

    from conftest import save_tiny_checkpoint

    from medgemma_core import load
    from medgemma_demo.workbench import SEQ_LEN, packs, train_args

    checkpoint = save_tiny_checkpoint(tmp_path / "ckpt")
    assert packs(load(checkpoint)) and not packs(None)  # a text model packs; none loaded yet
    procs = {name: subprocess.Popen(
        [*jobs.train_command(), *train_args(checkpoint, bundled_path(name), tmp_path / str(i),
                                            pack=True), "--dry-run", "--json"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i, name in enumerate(BUNDLED)}
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, (name, out[-2000:])
        plan = json.loads(out.strip().splitlines()[-1])
        assert (plan["cut_rows"], plan["bad_rows"]) == (0, 0), (name, plan)
        assert 0 < plan["longest_row_tokens"] <= SEQ_LEN, (name, plan)
        assert plan["mixture"][0]["rows"] == plan["packing"]["rows"] == 50, (name, plan)
        assert plan["packing"]["sequences"] < 50 and plan["rows_per_step"] == 2, (name, plan)


def test_the_status_line_counts_skipped_rows(tmp_path):
    from types import SimpleNamespace

    from medgemma_demo.workbench import train_status

    (tmp_path / "metrics.jsonl").write_text(json.dumps(
        {"step": 2, "split": "train", "loss": 3.5, "tokens_per_s": 120.0}) + "\n")
    job = SimpleNamespace(folder=tmp_path, elapsed=5.0, running=True, stopped=False,
                          returncode=None)
    assert "skipped" not in train_status(job, 4)
    (tmp_path / "bad_rows.jsonl").write_text("".join(json.dumps(
        {"where": f"train.jsonl:{i}", "reason": "its answer is past the cut"}) + "\n"
        for i in (3, 9)))
    status = train_status(job, 4)
    assert status.startswith("**Training...** step **2 / 4**"), status
    assert "2 row(s) skipped" in status and "Tokens per row" in status, status
