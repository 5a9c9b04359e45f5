"""``medgemma-train eval``, ``compare`` and ``tasks``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..cli import Command
from .spec import MODES, EvalError

EVAL_EPILOG = """\
examples:
  medgemma-train eval medqa --checkpoint default --out runs/medqa-270m        (bundled sample)
  medgemma-train eval medqa --checkpoint medgemma-4b-it/ --mode generate --out runs/medqa-4b
  medgemma-train eval vqa_rad --checkpoint medgemma-4b-it/ --data vqa_rad/test.json --out runs/v
  medgemma-train eval cxr_labels --checkpoint medsiglip-448/ --mode zeroshot --data cxr.jsonl \\
      --out runs/cxr-zs
  medgemma-train compare runs/medqa-270m runs/medqa-ft --out report/

OUT/items.jsonl gets one line per item as it is scored (id, the exact prompt, the option
continuations and log-likelihoods or the raw output, the parsed answer, gold, correct); the same
command again resumes from it. OUT/summary.json: every metric with a bootstrap 95% interval.
"""


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("task", help="task name (medgemma-train tasks lists them)")
    p.add_argument("--checkpoint", required=True, metavar="CK",
                   help="MedGemma / Gemma 3 checkpoint (Hugging Face folder, .gguf, Orbax "
                        "folder; 'default': the embedded Gemma 3 270M); for --mode zeroshot a "
                        "MedSigLIP folder")
    p.add_argument("--data", metavar="FILE", help="dataset file (default: the task's bundled "
                   "sample, where it has one)")
    p.add_argument("--mode", choices=MODES, help="scoring mode (default: the task's first)")
    p.add_argument("--limit", type=int, metavar="N", help="score the first N items only")
    p.add_argument("--out", required=True, metavar="DIR", help="run folder (resumed if it "
                   "holds items of the same run)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON line, "
                   "the last of stdout")
    p.add_argument("--batch-size", type=int, default=8, metavar="B",
                   help="rows per compiled forward (loglik) or conversations per batch")
    p.add_argument("--max-new-tokens", type=int, metavar="N",
                   help="answer length in generate mode (default: the task's)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="weights and activations (float32 is the fast path on CPUs)")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def load_model(checkpoint: str, mode: str, *, dtype: str = "float32") -> Any:
    """A MedGemma model (loglik, generate) or MedSigLIP (zeroshot); a checkpoint that does not
    load is an :class:`EvalError` (one line)."""
    try:
        if mode == "zeroshot":
            from medsiglip import MedSigLIP

            return MedSigLIP.from_pretrained(checkpoint)
        import medgemma_core

        medgemma_core.enable_compilation_cache()
        return medgemma_core.load(None if checkpoint == "default" else checkpoint, dtype=dtype)
    except Exception as exc:  # any failure to load is the user's checkpoint, not a crash
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EvalError(f"--checkpoint {checkpoint}: cannot load it ({first})") from None


def make_scorer(mode: str, model: Any, *, batch_size: int = 8,
                max_new_tokens: int | None = None) -> Any:
    from .scoring import GenerateMode, LoglikMode, ZeroShotMode

    if mode == "loglik":
        return LoglikMode(model, batch_size=batch_size)
    if mode == "generate":
        return GenerateMode(model, batch_size=batch_size, max_new_tokens=max_new_tokens)
    return ZeroShotMode(model, batch_size=batch_size)


def _identity(checkpoint: str) -> str:
    path = Path(checkpoint).expanduser()
    return str(path.resolve()) if checkpoint != "default" and path.exists() else checkpoint


def _print_summary(summary: dict[str, Any]) -> None:
    print(f"{summary['task']} ({summary['mode']}): {summary['n']} items scored, "
          f"{summary['skipped']} skipped" + (f", {summary['unparsed']} unparsed"
                                             if "unparsed" in summary else ""))
    for name, m in summary["metrics"].items():
        if m["value"] is None:
            print(f"  {name}: not computed ({m.get('note', 'no value')})")
        else:
            lo, hi = m["ci95"]
            print(f"  {name}: {m['value']:.4f}  95% CI [{lo:.4f}, {hi:.4f}]")


def _run_eval(args: argparse.Namespace) -> int:
    from .registry import get_task
    from .runner import evaluate, read_items

    task = get_task(args.task)
    mode = args.mode or task.modes[0]
    if mode not in task.modes:
        raise EvalError(f"task {task.name} is scored by {' or '.join(task.modes)}, not --mode "
                        f"{mode}")
    if args.limit is not None and args.limit < 1:
        raise EvalError(f"--limit {args.limit}: give a positive number of items")
    if args.batch_size < 1:
        raise EvalError(f"--batch-size {args.batch_size}: give a positive number")
    read = read_items(task, args.data)  # a bad data file fails before the model loads
    model = load_model(args.checkpoint, mode, dtype=args.dtype)
    if task.kind != "mcq" and mode != "zeroshot" and not model.is_multimodal:
        raise EvalError(f"task {task.name} asks about images but {args.checkpoint} is a "
                        "text-only checkpoint; pass a MedGemma image-text checkpoint")
    scorer = make_scorer(mode, model, batch_size=args.batch_size,
                         max_new_tokens=args.max_new_tokens)
    summary = evaluate(task, scorer, data=args.data, checkpoint=_identity(args.checkpoint),
                       limit=args.limit, out=args.out, n_boot=args.n_boot, seed=args.seed,
                       progress=not args.no_progress, read=read)
    _print_summary(summary)
    print(f"items: {Path(args.out) / 'items.jsonl'}  summary: {Path(args.out) / 'summary.json'}")
    if args.json:
        print(json.dumps(summary))
    return 0


def _compare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders of medgemma-train eval "
                   "(the first is the base the others are tested against)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="writes comparison.md, comparison.json and comparison.png here")
    p.add_argument("--names", nargs="+", metavar="NAME", help="row names (default: folders)")
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the comparison as one JSON line")


def _run_compare(args: argparse.Namespace) -> int:
    from .report import compare, markdown_table

    if args.names and len(args.names) != len(args.runs):
        raise EvalError(f"--names gives {len(args.names)} names for {len(args.runs)} runs")
    result = compare(args.runs, out=args.out, names=args.names, n_boot=args.n_boot,
                     seed=args.seed)
    print(markdown_table(result))
    if args.json:
        print(json.dumps(result))
    return 0


def _tasks_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="one JSON line")


def _run_tasks(args: argparse.Namespace) -> int:
    from .registry import get_registry, list_tasks

    infos = list_tasks()
    rows = [{"name": i.task.name, "description": i.task.description, "kind": i.task.kind,
             "modes": list(i.task.modes), "metrics": [m.name for m in i.task.metrics],
             "bundled_data": i.task.fixture is not None, "data": i.task.data_help,
             "plugin": i.plugin, "distribution": i.distribution, "version": i.version}
            for i in infos]
    problems = [vars(p) for p in get_registry().problems]
    if args.json:
        print(json.dumps({"tasks": rows, "problems": problems}))
        return 0
    for r in rows:
        print(f"{r['name']:<12} {'/'.join(r['modes']):<17} {r['distribution']} {r['version']}"
              f"{'' if r['bundled_data'] else '  (needs --data)'}  {r['description']}")
    for p in problems:
        print(f"problem: {p['plugin']} ({p['distribution']}): {p['problem']}")
    return 0


EVAL = Command("eval", "evaluate a checkpoint on a task (items.jsonl, summary with 95% CIs)",
               _eval_args, _run_eval,
               description="Evaluate a checkpoint on one task: every item scored (loglik: the "
                           "option with the highest summed log-likelihood; generate: a greedy "
                           "answer, parsed; zeroshot: MedSigLIP label scores), written to "
                           "OUT/items.jsonl as it goes, summarized with bootstrap 95% intervals.",
               epilog=EVAL_EPILOG)
COMPARE = Command("compare", "compare runs of one task: Markdown table, p-values, bar chart",
                  _compare_args, _run_compare,
                  description="Compare eval runs of one task on the items they share: each "
                              "metric with its 95% interval, the paired-bootstrap p-value of "
                              "each run against the first, a PNG bar chart with error bars.")
TASKS = Command("tasks", "list the evaluation tasks with their package and version",
                _tasks_args, _run_tasks)
