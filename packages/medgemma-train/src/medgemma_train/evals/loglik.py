"""Log-likelihood scoring: the summed log-probability of each option's continuation.

Tokenization follows lm-evaluation-harness exactly: trailing spaces of the context move into
the continuation; the context is ``tokenize(context)`` with ``<bos>``; the continuation's
tokens are those of ``tokenize(context + continuation)`` after the context's length; a row
longer than the model's context keeps its last ``max_length + 1`` tokens.

One compiled forward scores a batch of rows. A row is the input ``(context +
continuation)[:-1]``; requests whose rows are equal share one (every option of a
multiple-choice item with one-token continuations such as ``" A"``: one row per item). Only the
last ``C`` positions of each row are projected onto the vocabulary (the logits of a 262,144-row
vocabulary at every position would dominate the cost), and each row answers up to ``K``
requests. Rows are left-padded; ``B`` (rows), ``T`` (length), ``K`` and ``C`` are bucketed, so
a task compiles a handful of shapes.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

LENGTH_BUCKETS = (16, 32, 64, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096,
                  6144, 8192, 12288, 16384, 24576, 32768, 49152, 65536, 98304, 131072)


def _bucket(n: int, buckets: Sequence[int]) -> int:
    for b in buckets:
        if n <= b:
            return b
    raise ValueError(f"a row of {n} tokens is longer than the largest bucket {buckets[-1]}")


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


@functools.partial(jax.jit, static_argnums=(0,))
def _forward(graphdef, state, tokens, start, targets, mask):
    """tokens [B, T], start [B], targets/mask [B, K, C] -> (sums [B, K], greedy [B, K]).
    Module-level with the graph as the static argument: every scorer of one model shares
    the compiled shapes."""
    model = nnx.merge(graphdef, state)
    c = targets.shape[-1]
    h, _ = model(tokens, start=start, logits_at="none")
    logits = model.logits(h[:, -c:])  # [B, C, V] float32
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp[:, None], targets[..., None], axis=-1)[..., 0]
    best = jnp.argmax(logits, axis=-1)[:, None]  # [B, 1, C]
    sums = jnp.sum(jnp.where(mask, picked, 0.0), axis=-1)
    greedy = jnp.all(jnp.where(mask, best == targets, True), axis=-1)
    return sums, greedy


@dataclasses.dataclass(frozen=True)
class Scored:
    """One request's result: its continuation ids, summed log-probability, and whether each of
    its tokens is the greedy (argmax) choice."""

    continuation_ids: list[int]
    loglik: float
    greedy: bool


class LoglikScorer:
    """Scores ``(context, continuation)`` text pairs with a loaded :class:`medgemma_core.MedGemma`
    (its decoder; for image-text checkpoints the text decoder). ``batch_size``: rows per
    compiled forward."""

    def __init__(self, model: Any, *, batch_size: int = 8, max_length: int | None = None):
        engine = model.engine
        self.tokenizer = model.tokenizer
        self.graphdef, self.state = engine.graphdef, engine.state
        self.pad_id = int(engine.pad_id)
        self.max_length = int(max_length or engine.config.max_position_embeddings)
        self.batch_size = max(1, int(batch_size))
        self.compiled_shapes: set[tuple[int, ...]] = set()

    # ---- tokenization (lm-evaluation-harness' rule) -----------------------------------------
    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        spaces = len(context) - len(context.rstrip())
        if spaces:
            continuation = context[-spaces:] + continuation
            context = context[:-spaces]
        whole = self.tokenizer.encode(context + continuation, add_bos=True)
        ctx = self.tokenizer.encode(context, add_bos=True)
        return ctx, whole[len(ctx):]

    def score(self, pairs: Sequence[tuple[str, str]]) -> list[Scored]:
        """Every ``(context, continuation)`` pair's :class:`Scored`, in order."""
        encoded = [self.encode_pair(ctx, cont) for ctx, cont in pairs]
        return self.score_ids(encoded)

    def score_ids(self, encoded: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[Scored]:
        """The same from ``(context ids, continuation ids)`` pairs."""
        rows: dict[tuple[int, ...], list[int]] = {}  # row input -> request indices
        fulls = []
        for n, (ctx, cont) in enumerate(encoded):
            if not cont:
                raise ValueError(f"request {n}: the continuation has no tokens")
            full = (list(ctx) + list(cont))[-(self.max_length + 1):]
            fulls.append(full)
            rows.setdefault(tuple(full[:-1]), []).append(n)
        # longest rows first, so that a batch's rows have similar lengths
        order = sorted(rows, key=lambda r: (-len(r), r))
        out: list[Scored | None] = [None] * len(encoded)
        for i in range(0, len(order), self.batch_size):
            self._run_batch(order[i:i + self.batch_size], rows, encoded, out)
        return out  # type: ignore[return-value]

    def _run_batch(self, batch: list[tuple[int, ...]], rows: dict[tuple[int, ...], list[int]],
                   encoded: Sequence[tuple[Sequence[int], Sequence[int]]],
                   out: list[Scored | None]) -> None:
        b = self.batch_size
        t = _bucket(max(len(r) for r in batch), LENGTH_BUCKETS)
        k = _pow2(max(len(rows[r]) for r in batch))
        conts = {n: list(encoded[n][1])[-t:] for r in batch for n in rows[r]}
        c = min(t, _pow2(max(len(v) for v in conts.values())))
        tokens = np.full((b, t), self.pad_id, np.int32)
        start = np.full((b,), t - 1, np.int32)  # unused rows: one pad token
        targets = np.zeros((b, k, c), np.int32)
        mask = np.zeros((b, k, c), bool)
        for j, row in enumerate(batch):
            tokens[j, t - len(row):] = row
            start[j] = t - len(row)
            for q, n in enumerate(rows[row]):
                cont = conts[n][-c:]
                targets[j, q, c - len(cont):] = cont
                mask[j, q, c - len(cont):] = True
        self.compiled_shapes.add((b, t, k, c))
        sums, greedy = _forward(self.graphdef, self.state, jnp.asarray(tokens),
                                jnp.asarray(start), jnp.asarray(targets), jnp.asarray(mask))
        sums, greedy = np.asarray(sums), np.asarray(greedy)
        for j, row in enumerate(batch):
            for q, n in enumerate(rows[row]):
                out[n] = Scored(list(encoded[n][1]), float(sums[j, q]), bool(greedy[j, q]))
