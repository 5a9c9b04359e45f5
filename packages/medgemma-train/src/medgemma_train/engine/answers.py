"""The ``sft`` stage's validation metrics beyond the loss.

* ``eval_token_accuracy``: over every labelled token of the eval data (the answers with
  ``data.mask_prompt``, else every token but padding and images), the share whose
  greedy next-token prediction (the argmax of the logits) is the label. Computed in the jitted
  eval step from the same hidden states as ``eval_loss``, ``model.loss_chunk`` tokens projected
  onto the vocabulary at a time (only the chunks that hold labelled tokens). XLA shares little
  of that with the loss's pass, so validation costs about one more vocabulary projection per
  batch; ``sft.token_accuracy: false`` turns it off.
* ``eval_exact_match`` (``sft.exact_match: N``, off by default): the first ``N`` eval rows'
  prompts (the conversation without its final answer) answered by greedy generation through
  :class:`medgemma_core.MedGemma` (at most ``sft.max_new_tokens`` tokens); the share whose
  answer equals the row's, compared after trimming, collapsing white space and case folding.

Both go to ``metrics.jsonl`` (split ``eval``), TensorBoard (``eval/...``) and the ``--json``
summary (``final_eval``), and either can pick the best checkpoints
(``run.best_metric: eval_token_accuracy``, ``run.best_mode: max``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["SFTSettings", "exact_match", "normalize_answer", "token_accuracy"]


@dataclasses.dataclass(frozen=True)
class SFTSettings:
    """``sft:`` settings. ``token_accuracy``: report ``eval_token_accuracy``;
    ``exact_match``: eval rows answered by greedy generation at each validation (0 = off);
    ``max_new_tokens``: the longest answer generated; ``generate_batch``: prompts per
    generation call."""

    token_accuracy: bool = True
    exact_match: int = 0
    max_new_tokens: int = 64
    generate_batch: int = 8

    def __post_init__(self) -> None:
        if self.exact_match < 0 or self.max_new_tokens < 1 or self.generate_batch < 1:
            raise ValueError("sft.exact_match must be >= 0, sft.max_new_tokens and "
                             "sft.generate_batch >= 1")


def token_accuracy(model: Any, batch: Any, cfg: Any) -> dict:
    """``{"eval_token_accuracy": (correct, labelled)}`` of one batch (traced; see the module
    docstring). Labels are input-aligned: the logits at ``t`` predict ``labels[t + 1]``."""
    import jax
    import jax.numpy as jnp

    from medgemma_core import Gemma3Multimodal
    from medgemma_core.training import forward_hidden

    if isinstance(cfg.options, SFTSettings) and not cfg.options.token_accuracy:
        return {}
    decoder = model.decoder if isinstance(model, Gemma3Multimodal) else model
    h = forward_hidden(model, batch, compute_dtype=cfg.model.compute_dtype or None)
    d = h.shape[-1]
    hs = h[:, :-1].reshape(-1, d)
    targets = jnp.asarray(batch.labels, jnp.int32)[:, 1:]
    seg = getattr(batch, "segment_ids", None)
    if seg is not None:  # packed rows: no token is predicted from another row's last one
        seg = jnp.asarray(seg, jnp.int32)
        targets = jnp.where((seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0), targets, -1)
    targets = targets.reshape(-1)
    valid = targets >= 0
    order = jnp.argsort(~valid, stable=True)  # the labelled tokens first
    hs, targets, valid = hs[order], targets[order], valid[order]
    n = hs.shape[0]
    c = max(1, min(int(cfg.model.loss_chunk), n))
    k = -(-n // c)
    pad = k * c - n
    hs = jnp.pad(hs, ((0, pad), (0, 0)))
    targets = jnp.pad(targets, (0, pad))
    valid = jnp.pad(valid, (0, pad))

    def one(xs: Any) -> Any:
        x, t, v = xs

        def count() -> Any:
            pred = jnp.argmax(decoder.logits(x), axis=-1)
            return jnp.sum((pred == t) & v).astype(jnp.int32)

        return jax.lax.cond(jnp.any(v), count, lambda: jnp.zeros((), jnp.int32))

    correct = jnp.sum(jax.lax.map(one, (hs.reshape(k, c, d), targets.reshape(k, c),
                                        valid.reshape(k, c))))
    return {"eval_token_accuracy": (correct, jnp.sum(valid).astype(jnp.int32))}


def normalize_answer(text: str) -> str:
    return " ".join(str(text).split()).casefold()


def _answer_text(message: dict) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    return " ".join(i.get("text", "") for i in content or () if isinstance(i, dict)
                    and i.get("type") == "text")


def exact_match(model: Any, cfg: Any, rows: list, messages: Any) -> dict:
    """``{"eval_exact_match": share, "eval_exact_match_rows": n}`` of the first
    ``cfg.options.exact_match`` of ``rows`` (``messages(row)``: the row's conversation, its
    final answer last); {} when off or there are no rows."""
    from .selection import generator

    opts = cfg.options if isinstance(cfg.options, SFTSettings) else SFTSettings()
    rows = list(rows)[:opts.exact_match]
    if not rows:
        return {}
    from medgemma_core import Sampling

    convs, refs = [], []
    for row in rows:
        msgs = messages(row)
        convs.append(msgs[:-1])
        refs.append(_answer_text(msgs[-1]))
    gen = generator(model, cfg.model.checkpoint)
    b = opts.generate_batch
    padded = convs + [convs[-1]] * (-len(convs) % b)  # one compiled shape for every call
    answers = []
    for start in range(0, len(padded), b):
        done = gen.chat_completions(padded[start:start + b], max_new_tokens=opts.max_new_tokens,
                                    sampling=Sampling(temperature=0.0))
        answers += [c.text for c in done]
    hits = sum(normalize_answer(a) == normalize_answer(r)
               for a, r in zip(answers[:len(refs)], refs, strict=True))
    return {"eval_exact_match": hits / len(refs), "eval_exact_match_rows": len(refs)}
