"""items.jsonl is written as it goes: a run killed halfway (SIGKILL) and run again gives the
summary of one straight run, without scoring the finished items again."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap

from medgemma_train.evals import LoglikMode, evaluate, get_task
from medgemma_train.evals.runner import VOLATILE

KILLER = textwrap.dedent("""
    import os, signal, sys
    from medgemma_core import enable_compilation_cache, load
    from medgemma_train.evals import LoglikMode, evaluate, get_task

    enable_compilation_cache()
    def kill(records):  # the first chunk is on disk (fsynced): die as a kill -9 would
        os.kill(os.getpid(), signal.SIGKILL)

    evaluate(get_task("medqa"), LoglikMode(load(sys.argv[1]), batch_size=2), checkpoint="tiny",
             data=sys.argv[3], limit=20, out=sys.argv[2], progress=False, on_records=kill)
""")


class Spy:
    """A scorer that records which items it was asked to score."""

    def __init__(self, inner):
        self.inner, self.mode, self.chunk, self.ids = inner, inner.mode, inner.chunk, []

    def score(self, items, task):
        self.ids += [i.id for i in items]
        return self.inner.score(items, task)


def _short_medqa(path):
    """24 short questions (one compiled length): 4 options each, gold cycling A..D."""
    rows = [{"realidx": f"q{i}", "question": f"Which number is {i} plus one?",
             "options": {k: str(i + d) for k, d in zip("ABCD", (1, 2, 0, 3))},
             "answer_idx": "ABCD"[i % 4]} for i in range(24)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _stable(summary):
    return {k: v for k, v in summary.items() if k not in VOLATILE and k != "data"}


def test_killed_run_resumes_to_the_same_summary(tiny_text, tiny_text_model, tmp_path):
    task = get_task("medqa")
    data = _short_medqa(tmp_path / "medqa_short.jsonl")
    straight = evaluate(task, LoglikMode(tiny_text_model, batch_size=2), checkpoint="tiny",
                        data=data, limit=20, out=tmp_path / "straight", progress=False)
    run = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-c", KILLER, str(tiny_text[0]), str(run), str(data)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    lines = (run / "items.jsonl").read_text().splitlines()
    assert len(lines) == 8  # one chunk: 4 x batch_size items
    with open(run / "items.jsonl", "a") as f:  # and a line cut short by the kill
        f.write(lines[0][:25])
    spy = Spy(LoglikMode(tiny_text_model, batch_size=2))
    resumed = evaluate(task, spy, checkpoint="tiny", data=data, limit=20, out=run,
                       progress=False)
    done = [json.loads(x)["id"] for x in lines]
    assert set(spy.ids).isdisjoint(done) and len(spy.ids) == 12
    assert resumed["timing"]["scored_now"] == 12
    assert _stable(resumed) == _stable(straight)
    ids = [json.loads(x)["id"] for x in (run / "items.jsonl").read_text().splitlines()]
    assert sorted(ids) == sorted(json.loads(x)["id"] for x in
                                 (tmp_path / "straight" / "items.jsonl").read_text().splitlines())
    # a third run has nothing left to score; a larger --limit scores only the new items
    again = Spy(LoglikMode(tiny_text_model, batch_size=2))
    evaluate(task, again, checkpoint="tiny", data=data, limit=20, out=run, progress=False)
    assert again.ids == []
    more = Spy(LoglikMode(tiny_text_model, batch_size=2))
    bigger = evaluate(task, more, checkpoint="tiny", data=data, limit=24, out=run,
                      progress=False)
    assert len(more.ids) == 4 and bigger["n"] == 24


def test_another_run_in_the_same_folder_is_refused(tiny_text_model, tmp_path):
    import pytest

    from medgemma_train.evals import EvalError

    data = _short_medqa(tmp_path / "medqa_short.jsonl")
    out = tmp_path / "run"
    evaluate(get_task("medqa"), LoglikMode(tiny_text_model, batch_size=2), checkpoint="a",
             data=data, limit=2, out=out, progress=False)
    with pytest.raises(EvalError, match="another run .*checkpoint"):
        evaluate(get_task("medqa"), LoglikMode(tiny_text_model, batch_size=2), checkpoint="b",
                 data=data, limit=2, out=out, progress=False)
