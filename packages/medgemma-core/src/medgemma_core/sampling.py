"""Token selection: repetition control, then greedy, temperature, top-k, top-p (in that order,
as transformers applies its logits processors before its warpers).

Repetition control follows transformers' definitions:

- ``repetition_penalty`` (``RepetitionPenaltyLogitsProcessor``): the logit of every token seen
  so far is divided by the penalty when positive, multiplied by it when negative.
- ``no_repeat_ngram_size`` n (``NoRepeatNGramLogitsProcessor``): a token that would complete
  an n-gram already present gets probability 0.

"Seen so far" is the prompt and the generated tokens (transformers' default), or with
``penalize_prompt=False`` the generated tokens only (as transformers' ``prompt_ignore_length``
does for the penalty). Left padding is never counted.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How to pick the next token. ``temperature == 0`` (or ``greedy``) means argmax.

    ``top_k == 0`` disables top-k; ``top_p >= 1`` disables top-p; ``repetition_penalty == 1``
    and ``no_repeat_ngram_size == 0`` disable repetition control (see the module docstring).
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    penalize_prompt: bool = True

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0 (0 = off)")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if not self.repetition_penalty > 0:
            raise ValueError("repetition_penalty must be > 0 (1 = off)")
        if self.no_repeat_ngram_size < 0:
            raise ValueError("no_repeat_ngram_size must be >= 0 (0 = off)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def controls_repetition(self) -> bool:
        return self.repetition_penalty != 1.0 or self.no_repeat_ngram_size > 0

    def static_key(self) -> tuple:
        """The parts that shape the compiled program (the rest are traced values):
        ``(greedy, top_k, use_top_p, repetition_penalty, no_repeat_ngram_size,
        penalize_prompt)``; the last three are ``(1.0, 0, True)`` when repetition control is off."""
        rep = (float(self.repetition_penalty), int(self.no_repeat_ngram_size),
               bool(self.penalize_prompt)) if self.controls_repetition else (1.0, 0, True)
        return (self.greedy, self.top_k, self.top_p < 1.0, *rep)


def repetition_penalty(logits: jax.Array, history: jax.Array, valid: jax.Array,
                       penalty: float) -> jax.Array:
    """logits [B, V], history [B, L] token ids, valid [B, L] bool -> logits with every token of
    a row's valid history penalized once (divided by ``penalty`` if > 0, else multiplied)."""
    b, v = logits.shape
    rows = jnp.arange(b)[:, None]
    seen = jnp.zeros((b, v), bool).at[rows, jnp.clip(history, 0, v - 1)].max(
        valid & (history < v) & (history >= 0))
    penalized = jnp.where(logits < 0, logits * penalty, logits / penalty)
    return jnp.where(seen, penalized, logits)


def ban_repeated_ngrams(logits: jax.Array, history: jax.Array, first: jax.Array, end: jax.Array,
                        n: int) -> jax.Array:
    """logits [B, V]; ``history [B, L]`` whose row b's sequence so far is
    ``history[b, first[b]:end]`` (``first [B]``, ``end`` a scalar) -> logits with ``-inf`` on
    every token that would repeat an n-gram of that sequence."""
    b, v = logits.shape
    length = history.shape[1]
    pos = jnp.arange(length)[None, :]
    # i is a start of an earlier n-gram: history[i : i + n] lies inside the sequence, and the
    # sequence holds at least n - 1 tokens to match against.
    match = (pos >= first[:, None]) & (pos + n - 1 < end) & (end - (n - 1) >= first[:, None])
    for j in range(n - 1):
        ahead = jnp.roll(history, -j, axis=1)  # ahead[:, i] = history[:, i + j]
        last = jax.lax.dynamic_slice_in_dim(history, end - (n - 1) + j, 1, axis=1)
        match = match & (ahead == last)
    follower = jnp.roll(history, -(n - 1), axis=1)  # the token that completed each n-gram
    rows = jnp.arange(b)[:, None]
    banned = jnp.zeros((b, v), bool).at[rows, jnp.clip(follower, 0, v - 1)].max(
        match & (follower < v) & (follower >= 0))
    return jnp.where(banned, -jnp.inf, logits)


def control_repetition(logits: jax.Array, history: jax.Array, first: jax.Array, end: jax.Array,
                       *, penalty: float, ngram: int) -> jax.Array:
    """Both controls over ``history[b, first[b]:end]`` (see :func:`ban_repeated_ngrams`)."""
    if penalty != 1.0:
        pos = jnp.arange(history.shape[1])[None, :]
        valid = (pos >= first[:, None]) & (pos < end)
        logits = repetition_penalty(logits, history, valid, penalty)
    if ngram > 0:
        logits = ban_repeated_ngrams(logits, history, first, end, ngram)
    return logits


def select(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_p: jax.Array,
           *, greedy: bool, top_k: int, use_top_p: bool) -> jax.Array:
    """logits [B, V] float32 -> token ids [B] int32."""
    if greedy:
        return first_max(logits)
    logits = logits / temperature
    if top_k > 0 or use_top_p:
        k = top_k if top_k > 0 else logits.shape[-1]
        k = min(k, logits.shape[-1])
        vals, idx = jax.lax.top_k(logits, k)  # sorted descending
        if use_top_p:
            probs = jax.nn.softmax(vals, axis=-1)
            before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each candidate
            vals = jnp.where(before < top_p, vals, -jnp.inf)
        choice = jax.random.categorical(key, vals, axis=-1)
        return jnp.take_along_axis(idx, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def first_max(logits: jax.Array) -> jax.Array:
    """``argmax`` over the last axis as int32 (the first maximum; the first NaN if any), as
    two plain reductions: XLA's CPU argmax (a reduction over value-index pairs) takes 2.4x as
    long over [8, 262144] float32 logits."""
    v = logits.shape[-1]
    m = jnp.max(logits, axis=-1, keepdims=True)  # NaN when the row holds one
    hit = (logits == m) | jnp.isnan(logits)
    return jnp.min(jnp.where(hit, jnp.arange(v, dtype=jnp.int32), v), axis=-1)
