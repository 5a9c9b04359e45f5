"""Running a task: read the items, score them in chunks, write ``items.jsonl`` as it goes,
resume from it, and summarize with bootstrap intervals.

``OUT/run.json`` names what the items belong to (task, mode, checkpoint, data file and its
SHA-256, prompt, answer length); a re-run with the same command continues from
``OUT/items.jsonl`` and scores only the items not in it (a line cut short by a kill is
dropped and its item scored again). ``OUT/summary.json`` is written at the end.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .scoring import Record, Scorer
from .spec import EvalError, EvalItem, EvalTask, ReadResult, Skipped
from .stats import bootstrap_ci

ITEMS, RUN, SUMMARY = "items.jsonl", "run.json", "summary.json"
#: summary keys that differ between a straight run and a resumed one
VOLATILE = ("timing",)


def read_items(task: EvalTask, data: str | Path | None) -> tuple[ReadResult, Path]:
    """The task's items from ``data`` (None: the bundled fixture)."""
    if data is None:
        if task.fixture is None:
            raise EvalError(f"task {task.name} has no bundled data; pass --data FILE "
                            f"({task.data_help})")
        path = Path(task.fixture)
    else:
        path = Path(data).expanduser()
        if not path.is_file():
            raise EvalError(f"--data {data}: no such file ({task.data_help})")
    return task.reader(path), path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _load_done(items_file: Path) -> dict[str, Record]:
    """Records already in ``items.jsonl``; lines cut short by a kill are dropped (and the file
    rewritten without them)."""
    if not items_file.is_file():
        return {}
    done: dict[str, Record] = {}
    good, bad = [], 0
    for line in items_file.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict) or "id" not in rec:
                raise ValueError
        except ValueError:
            bad += 1
            continue
        done[str(rec["id"])] = rec
        good.append(line)
    if bad:
        items_file.write_text("".join(f"{g}\n" for g in good), encoding="utf-8")
    return done


def _check_run(out: Path, identity: dict[str, Any]) -> None:
    run_file = out / RUN
    if run_file.is_file():
        try:
            before = json.loads(run_file.read_text())
        except json.JSONDecodeError:
            before = None
        if before != identity:
            diff = sorted(k for k in identity if not isinstance(before, dict) or
                          before.get(k) != identity[k])
            raise EvalError(f"{out} holds items of another run (different {', '.join(diff)}); "
                            f"pass another --out or delete {out / ITEMS}")
    else:
        run_file.write_text(json.dumps(identity, indent=2) + "\n")


def evaluate(task: EvalTask, scorer: Scorer, *, data: str | Path | None = None,
             checkpoint: str = "", limit: int | None = None, out: str | Path | None = None,
             n_boot: int = 1000, seed: int = 0, progress: bool = True,
             on_records: Callable[[list[Record]], None] | None = None,
             read: tuple[ReadResult, Path] | None = None) -> dict[str, Any]:
    """Score ``task``'s items with ``scorer`` and return the summary (see :func:`summarize`).

    ``out``: a folder for ``items.jsonl`` (written as it goes, resumed from), ``run.json`` and
    ``summary.json``; None keeps everything in memory (the trainer's validation).
    ``on_records(records)``: called after each chunk is written; ``read``: the result of
    :func:`read_items` when the caller has it already."""
    read, path = read if read is not None else read_items(task, data)
    items = read.items[:limit] if limit is not None else read.items
    for s in read.skipped:
        print(f"medgemma-train: skipped {s.where}: {s.reason}", file=sys.stderr)
    done: dict[str, Record] = {}
    items_file = None
    if out is not None:
        out_dir = Path(out)
        out_dir.mkdir(parents=True, exist_ok=True)
        identity = {"task": task.name, "mode": scorer.mode, "checkpoint": checkpoint,
                    "data": str(path.resolve()), "data_sha256": _sha256(path),
                    "prompt": dataclasses.asdict(task.prompt),
                    "max_new_tokens": getattr(scorer, "max_new_tokens", None)}
        _check_run(out_dir, identity)
        items_file = out_dir / ITEMS
        done = _load_done(items_file)
    todo = [it for it in items if it.id not in done]
    from tqdm import tqdm

    bar = tqdm(total=len(items), initial=len(items) - len(todo), unit="item",
               desc=f"{task.name} ({scorer.mode})", disable=not progress, file=sys.stderr,
               dynamic_ncols=True)
    t0 = time.perf_counter()
    try:
        for i in range(0, len(todo), scorer.chunk):
            chunk = todo[i:i + scorer.chunk]
            records = scorer.score(chunk, task)
            if items_file is not None:
                with open(items_file, "a", encoding="utf-8") as f:
                    for rec in records:
                        f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
            for rec in records:
                done[str(rec["id"])] = rec
            bar.update(len(chunk))
            if on_records is not None:
                on_records(records)
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    ordered = [done[it.id] for it in items if it.id in done]  # dataset order, this --limit
    summary = summarize(task, scorer.mode, ordered, read.skipped, n_boot=n_boot, seed=seed)
    summary.update(checkpoint=checkpoint, data=str(path))
    summary["timing"] = {"seconds": round(seconds, 3), "scored_now": len(todo),
                         "items_per_s": round(len(todo) / seconds, 3) if seconds > 0 else None}
    if out is not None:
        (Path(out) / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _metric_block(task: EvalTask, mode: str, records: Sequence[Record], n_boot: int,
                  seed: int) -> dict[str, Any]:
    block: dict[str, Any] = {}
    for metric in task.metrics_for(mode):
        missing = metric.available()
        if missing is not None:
            block[metric.name] = {"value": None, "note": missing}
            continue
        value = metric(records)
        lo, hi = bootstrap_ci(metric, records, n_boot=n_boot, seed=seed)
        block[metric.name] = {"value": _num(value), "ci95": [_num(lo), _num(hi)]}
    return block


def _num(x: float) -> float | None:
    return None if x is None or not np.isfinite(x) else round(float(x), 6)


def summarize(task: EvalTask, mode: str, records: Sequence[Record],
              skipped: Sequence[Skipped] = (), *, n_boot: int = 1000,
              seed: int = 0) -> dict[str, Any]:
    """The JSON summary: counts, every metric with its seeded bootstrap 95% interval, the
    same per group (``task.groups``), and the skipped items."""
    scored = [r for r in records if not r.get("skipped")]
    late = [Skipped(r.get("where") or r["id"], r["skipped"]) for r in records if r.get("skipped")]
    all_skipped = list(skipped) + late
    summary: dict[str, Any] = {
        "task": task.name, "mode": mode, "n": len(scored), "skipped": len(all_skipped),
        "skipped_items": [{"where": s.where, "reason": s.reason} for s in all_skipped[:100]],
        "headline": task.metrics_for(mode)[0].name,
        "metrics": _metric_block(task, mode, scored, n_boot, seed),
        "bootstrap": {"n_boot": n_boot, "seed": seed, "level": 0.95},
    }
    if task.kind == "mcq" and mode == "generate" or task.kind in ("vqa", "multilabel"):
        summary["unparsed"] = sum(1 for r in scored if r.get("parsed") in (None, "", []))
    if mode == "zeroshot" and scored:
        from .metrics import auc_per_label

        summary["auc_per_label"] = {k: _num(v) if v is not None else None
                                    for k, v in auc_per_label(scored, task.labels).items()}
    groups: dict[str, Any] = {}
    for key in task.groups:
        values = sorted({str(r["meta"].get(key)) for r in scored if r["meta"].get(key)})
        groups[key] = {v: {"n": len(sub), **_metric_block(task, mode, sub, n_boot, seed)}
                       for v in values
                       for sub in [[r for r in scored if str(r["meta"].get(key)) == v]]}
    if groups:
        summary["groups"] = groups
    return summary


def load_records(out: str | Path) -> list[Record]:
    """The records of a finished run folder, in file order (skipped ones included)."""
    return list(_load_done(Path(out) / ITEMS).values())


__all__ = ["EvalItem", "evaluate", "load_records", "read_items", "summarize"]
