"""medgemma_train.evals: the MedGemma report's benchmarks as plugins, on any checkpoint.

    from medgemma_core import load
    from medgemma_train.evals import LoglikMode, evaluate, get_task

    summary = evaluate(get_task("medqa"), LoglikMode(load()), out="runs/medqa")
    summary["metrics"]["accuracy"]       # {"value": ..., "ci95": [lo, hi]}

Tasks are :class:`EvalTask` records registered through the pluggy hook
``medgemma_eval_tasks(register)`` (entry-point group ``medgemma.eval_tasks``); the built-in
tasks register through the same manager. Scoring modes: :class:`LoglikMode`,
:class:`GenerateMode`, :class:`ZeroShotMode`. Reports: :func:`compare` (Markdown table,
paired-bootstrap p-values, PNG bar chart).
"""

from __future__ import annotations

from typing import Any

from . import metrics, prompts, readers
from .hookspecs import hookimpl
from .registry import get_registry, get_task, list_tasks
from .runner import evaluate, load_records, read_items, summarize
from .spec import (
    KINDS,
    MODES,
    EvalError,
    EvalItem,
    EvalTask,
    ImageRef,
    Metric,
    Prompt,
    ReadResult,
    Skipped,
    TaskInfo,
)
from .stats import bootstrap_ci, paired_bootstrap

_LAZY = {"LoglikMode": "scoring", "GenerateMode": "scoring", "ZeroShotMode": "scoring",
         "LoglikScorer": "loglik", "compare": "report", "markdown_table": "report",
         "bar_chart": "report", "parse_choice": "parse", "parse_labels": "parse",
         "parse_short": "parse", "load_model": "cli", "make_scorer": "cli"}


def __getattr__(name: str) -> Any:  # the scorers import JAX: only when asked for
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "KINDS", "MODES", "EvalError", "EvalItem", "EvalTask", "GenerateMode", "ImageRef",
    "LoglikMode", "LoglikScorer", "Metric", "Prompt", "ReadResult", "Skipped", "TaskInfo",
    "ZeroShotMode", "bar_chart", "bootstrap_ci", "compare", "evaluate", "get_registry",
    "get_task", "hookimpl", "list_tasks", "load_model", "load_records", "make_scorer",
    "markdown_table", "metrics", "paired_bootstrap", "parse_choice", "parse_labels",
    "parse_short", "prompts", "read_items", "readers", "summarize",
]
