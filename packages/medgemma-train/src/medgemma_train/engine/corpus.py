"""The distillation corpus: a teacher's answers to a question set (``medgemma-train
teacher-generate``), written as chat JSONL that ``distill`` (or ``sft``) trains on.

Every row of ``data.train`` (chat rows, manifests, QA sets: read and checked as the stages
read them) loses its last assistant turn; the teacher answers the prompts ``batch`` at a time
with medgemma-core's batched generation (:meth:`medgemma_core.MedGemma.chat_completions`: one
compiled prefill and decode loop per batch, images included on image-text teachers), and each
row is written back with the teacher's answer as its assistant turn, plus ``source`` (the
input row's ``file:line``) and, when the input had one, ``reference`` (its own answer).
Rows the teacher did not finish within ``max_new_tokens`` are kept and counted (``truncated``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["teacher_generate"]


def teacher_generate(cfg: Any, teacher: str, out: str | Path, *, max_new_tokens: int = 256,
                     batch: int = 8, temperature: float = 0.0, seed: int = 0,
                     say: Any = None) -> dict:
    """Write ``out`` (chat JSONL); returns ``{"rows", "truncated", "out"}``."""
    from medgemma_core import Sampling, load

    from .data import check_bad_rows, read_source
    from .rl import _prompts

    say = say or (lambda text: None)
    path = Path(teacher).expanduser()
    if not path.exists():
        raise ValueError(f"teacher {path} not found; pass an existing checkpoint")
    model = load(path)
    sources = [read_source(s, i) for i, s in enumerate(cfg.data.train)]
    check_bad_rows(sources, skip_bad=cfg.data.skip_bad)
    prompts = _prompts([ex for s in sources for ex in s.examples], model.is_multimodal,
                       cfg.data.system)
    sampling = Sampling(temperature=temperature, seed=seed)
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    truncated = 0
    with open(target, "w", encoding="utf-8") as f:
        for start in range(0, len(prompts), batch):
            part = prompts[start:start + batch]
            answers = model.chat_completions([p.messages for p in part],
                                             max_new_tokens=max_new_tokens, sampling=sampling)
            for p, a in zip(part, answers):
                truncated += not a.stopped
                row = {"messages": [*p.messages, {"role": "assistant", "content": a.text}],
                       "source": p.meta.get("where", "")}
                if p.gold:
                    row["reference"] = p.gold
                f.write(json.dumps(row, default=str) + "\n")
            say(f"teacher answers: {min(start + batch, len(prompts))}/{len(prompts)}")
    return {"rows": len(prompts), "truncated": truncated, "out": str(target)}
