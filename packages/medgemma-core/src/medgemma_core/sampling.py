"""Token selection: greedy, temperature, top-k, top-p (applied in that order, as transformers)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How to pick the next token. ``temperature == 0`` (or ``greedy``) means argmax.

    ``top_k == 0`` disables top-k; ``top_p >= 1`` disables top-p.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0 (0 = off)")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def static_key(self) -> tuple[bool, int, bool]:
        """The parts that shape the compiled program (the rest are traced values)."""
        return (self.greedy, self.top_k, self.top_p < 1.0)


def select(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_p: jax.Array,
           *, greedy: bool, top_k: int, use_top_p: bool) -> jax.Array:
    """logits [B, V] float32 -> token ids [B] int32."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
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
