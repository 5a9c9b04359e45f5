"""Comparing runs: a Markdown table with 95% intervals and paired-bootstrap p-values against
the first run (the base), and a PNG bar chart with error bars.

``compare(["runs/base", "runs/finetuned"], out="report/")`` reads each run folder's
``run.json`` and ``items.jsonl``, keeps the items every run scored (same ids), recomputes each
metric of the task on them with its interval, and tests each later run against the first on
the same bootstrap resamples (:func:`~medgemma_train.evals.stats.paired_bootstrap`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .registry import get_task
from .runner import ITEMS, RUN, load_records
from .spec import EvalError
from .stats import bootstrap_ci, paired_bootstrap


def _run(folder: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    if not (folder / RUN).is_file() or not (folder / ITEMS).is_file():
        raise EvalError(f"{folder} is not an eval run folder (no {RUN} / {ITEMS}); pass the "
                        "--out folders of medgemma-train eval")
    return json.loads((folder / RUN).read_text()), load_records(folder)


def compare(runs: Sequence[str | Path], *, out: str | Path | None = None,
            names: Sequence[str] | None = None, n_boot: int = 1000,
            seed: int = 0) -> dict[str, Any]:
    """Compare run folders of one task; writes ``comparison.md``, ``comparison.json`` and
    ``comparison.png`` into ``out`` when given. Returns the comparison as a dict."""
    if not runs:
        raise EvalError("give at least one run folder")
    loaded = [_run(Path(r)) for r in runs]
    tasks = {ident["task"] for ident, _ in loaded}
    if len(tasks) != 1:
        raise EvalError(f"the runs are of different tasks ({', '.join(sorted(tasks))}); "
                        "compare runs of one task")
    task = get_task(tasks.pop())
    names = list(names) if names else [Path(r).name or str(r) for r in runs]
    by_id = [{r["id"]: r for r in recs if not r.get("skipped")} for _, recs in loaded]
    common = [i for i in by_id[0] if all(i in b for b in by_id[1:])]
    if not common:
        raise EvalError("the runs have no scored item in common")
    rows = []
    base: list[dict[str, Any]] | None = None
    for name, (ident, _), recs in zip(names, loaded, by_id):
        records = [recs[i] for i in common]
        row: dict[str, Any] = {"name": name, "checkpoint": ident.get("checkpoint", ""),
                               "mode": ident["mode"], "n": len(records), "metrics": {}}
        for metric in task.metrics_for(ident["mode"]):
            if metric.available() is not None:
                continue
            lo, hi = bootstrap_ci(metric, records, n_boot=n_boot, seed=seed)
            entry: dict[str, Any] = {"value": metric(records), "ci95": [lo, hi]}
            if base is not None:
                entry["vs_base"] = paired_bootstrap(metric, base, records, n_boot=n_boot,
                                                    seed=seed)
            row["metrics"][metric.name] = entry
        base = records if base is None else base
        rows.append(row)
    result = {"task": task.name, "items": len(common), "runs": rows,
              "bootstrap": {"n_boot": n_boot, "seed": seed}}
    if out is not None:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "comparison.md").write_text(markdown_table(result))
        (folder / "comparison.json").write_text(json.dumps(result, indent=2) + "\n")
        bar_chart(result, folder / "comparison.png")
    return result


def _fmt(x: float | None, scale: float) -> str:
    return "n/a" if x is None or x != x else f"{x * scale:.1f}"


def markdown_table(result: dict[str, Any]) -> str:
    """The comparison as Markdown: one row per run, each metric as ``value [lo, hi]`` (in
    percent, BLEU as is), then the difference from the base and its p-value."""
    rows = result["runs"]
    metrics = list(rows[0]["metrics"])
    head = ["run", "checkpoint", "mode", "n"] + [f"{m} [95% CI]" for m in metrics]
    if len(rows) > 1:
        head += [f"Δ {metrics[0]} vs {rows[0]['name']}", "p (paired bootstrap)"]
    lines = [f"### {result['task']}: {result['items']} items in common", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["name"], f"`{row['checkpoint']}`", row["mode"], str(row["n"])]
        for m in metrics:
            e = row["metrics"].get(m)
            scale = 1.0 if m == "bleu" else 100.0
            cells.append("n/a" if e is None else
                         f"{_fmt(e['value'], scale)} [{_fmt(e['ci95'][0], scale)}, "
                         f"{_fmt(e['ci95'][1], scale)}]")
        if len(rows) > 1:
            vs = row["metrics"].get(metrics[0], {}).get("vs_base")
            scale = 1.0 if metrics[0] == "bleu" else 100.0
            cells += (["(base)", ""] if vs is None else
                      [f"{vs['delta'] * scale:+.1f}", f"{vs['p_value']:.3g}"])
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Values in percent (BLEU: 0-100). Intervals: percentile bootstrap, "
              f"{result['bootstrap']['n_boot']} resamples, seed {result['bootstrap']['seed']}; "
              "p: two-sided paired bootstrap on the same resamples.", ""]
    return "\n".join(lines)


def bar_chart(result: dict[str, Any], path: str | Path) -> Path:
    """A PNG: one group of bars per metric (0..1 metrics; BLEU only when it is the sole one),
    one bar per run, 95% intervals as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = result["runs"]
    metrics = [m for m in rows[0]["metrics"] if m != "bleu"] or list(rows[0]["metrics"])
    width = 0.8 / len(rows)
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(metrics) * max(1, len(rows) / 2), 4),
                           dpi=110)
    x = np.arange(len(metrics))
    for k, row in enumerate(rows):
        vals = np.array([row["metrics"][m]["value"] for m in metrics], float)
        lo = np.array([row["metrics"][m]["ci95"][0] for m in metrics], float)
        hi = np.array([row["metrics"][m]["ci95"][1] for m in metrics], float)
        err = np.nan_to_num(np.stack([vals - lo, hi - vals]).clip(min=0))
        ax.bar(x + (k - (len(rows) - 1) / 2) * width, np.nan_to_num(vals), width, yerr=err,
               capsize=4, label=row["name"])
    ax.set_xticks(x, metrics)
    ax.set_ylim(0, max(1.0, float(np.nanmax([[r["metrics"][m]["ci95"][1] or 0 for m in metrics]
                                              for r in rows]))) * 1.05)
    ax.set_title(f"{result['task']} ({result['items']} items, 95% bootstrap CI)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return Path(path)
