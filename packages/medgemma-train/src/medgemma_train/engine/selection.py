"""Checkpoint selection by the evaluation harness (:mod:`medgemma_train.evals`).

Every validation (``run.eval_every``) the model under training answers two validation sets
by greedy generation, as ``medgemma-train eval --mode generate`` would:

* ``cxr_labels``: chest X-ray multi-label classification, the labels parsed from the
  generated text; its macro F1 over the five CheXpert findings -> ``cxr_macro_f1``;
* ``vqa_rad``: visual QA; the accuracy on the closed (yes / no) questions ->
  ``vqa_closed_accuracy``.

``selection_score`` is their mean weighted by ``cxr_weight`` and ``vqa_weight`` (the sets
given only). The trainer keeps the best ``run.keep_best`` checkpoints by it
(``run.best_metric: selection_score``, ``run.best_mode: max``), and :func:`write_selection`
writes the chosen one with its scores to ``RUN/selection.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["SELECTION_FILE", "generator", "selection_scores", "write_selection"]

SELECTION_FILE = "selection.json"


def generator(model: Any, checkpoint: str | Path) -> Any:
    """A :class:`medgemma_core.MedGemma` answering with ``model`` (its current weights) and
    the processor of ``checkpoint``."""
    from medgemma_core import Engine, Gemma3Multimodal, MedGemma, Processor, Tokenizer
    from medgemma_core.prompts import PromptEncoder

    if isinstance(model, Gemma3Multimodal):
        processor = Processor.from_checkpoint(checkpoint)
        tok = processor.tokenizer
        engine = Engine(model.decoder, stop_ids=sorted(tok.stop_ids), pad_id=tok.pad_id)
        return MedGemma(engine, tok, multimodal=PromptEncoder(model, processor))
    tok = Tokenizer.from_checkpoint(checkpoint)
    engine = Engine(model, stop_ids=sorted(tok.stop_ids), pad_id=tok.pad_id)
    return MedGemma(engine, tok)


def _value(block: Any) -> float | None:
    value = block.get("value") if isinstance(block, dict) else None
    return None if value is None else float(value)


def selection_scores(model: Any, checkpoint: str | Path, *, cxr_data: str = "",
                     vqa_data: str = "", cxr_weight: float = 1.0, vqa_weight: float = 1.0,
                     limit: int = 0, batch_size: int = 8,
                     max_new_tokens: int = 0) -> dict[str, float]:
    """``cxr_macro_f1``, ``vqa_closed_accuracy`` and ``selection_score`` of ``model`` on the
    given validation files (see the module docstring); {} when neither is given."""
    from medgemma_train.evals import GenerateMode, evaluate, get_task

    if not cxr_data and not vqa_data:
        return {}
    mode = GenerateMode(generator(model, checkpoint), batch_size=batch_size,
                        max_new_tokens=max_new_tokens or None)
    out: dict[str, float] = {}
    parts: list[tuple[float, float]] = []
    if cxr_data:
        summary = evaluate(get_task("cxr_labels"), mode, data=cxr_data, limit=limit or None,
                           n_boot=1, progress=False)
        f1 = _value(summary["metrics"].get("macro_f1")) or 0.0
        out["cxr_macro_f1"] = f1
        parts.append((cxr_weight, f1))
    if vqa_data:
        summary = evaluate(get_task("vqa_rad"), mode, data=vqa_data, limit=limit or None,
                           n_boot=1, progress=False)
        closed = summary.get("groups", {}).get("answer_type", {}).get("CLOSED", {})
        acc = _value(closed.get("accuracy")) or 0.0
        out["vqa_closed_accuracy"] = acc
        parts.append((vqa_weight, acc))
    total = sum(w for w, _ in parts)
    out["selection_score"] = sum(w * v for w, v in parts) / total if total > 0 else 0.0
    return out


def write_selection(run_dir: Path, metric: str = "selection_score",
                    mode: str = "max") -> dict | None:
    """``RUN/selection.json``: the kept checkpoint with the best ``metric``, its step, folder
    and scores, and every kept checkpoint's scores (None when none was scored)."""
    from .checkpoint import Checkpoints

    ckpt_dir = Path(run_dir) / "checkpoints"
    if not ckpt_dir.is_dir():
        return None
    ckpt = Checkpoints(ckpt_dir, read_only=True, best_metric=metric, best_mode=mode)
    try:
        best = ckpt.best_step()
        scored = {str(s): ckpt.metrics(s) for s in ckpt.steps() if ckpt.metrics(s)}
    finally:
        ckpt.close()
    if best is None:
        return None
    chosen = {"metric": metric, "mode": mode, "step": best,
              "checkpoint": str(ckpt_dir / str(best)), "scores": scored[str(best)],
              "kept": scored}
    (Path(run_dir) / SELECTION_FILE).write_text(json.dumps(chosen, indent=2) + "\n")
    return chosen
