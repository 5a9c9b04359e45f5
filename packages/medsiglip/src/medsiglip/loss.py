"""The SigLIP sigmoid pairwise loss, direct and chunked.

For normalized image embeddings ``I [B, D]`` and text embeddings ``T [B, D]`` where row ``i``
of each is a matching pair, ``z = I @ T.T * exp(logit_scale) + logit_bias`` and
``loss = -sum_ij log_sigmoid(y_ij * z_ij) / B`` with ``y = 2 * eye(B) - 1``
(Zhai et al. 2023; big_vision ``siglip.py``; transformers' ``SiglipModel`` with ``return_loss``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sigmoid_loss(image_embeds: jax.Array, text_embeds: jax.Array, logit_scale: jax.Array,
                 logit_bias: jax.Array) -> jax.Array:
    """Builds the full ``[B, B]`` logit matrix. Embeddings ``[B, D]``, scalars -> scalar loss."""
    z = image_embeds @ text_embeds.T * jnp.exp(logit_scale) + logit_bias
    labels = 2.0 * jnp.eye(z.shape[0], dtype=z.dtype) - 1.0
    return -jnp.sum(jax.nn.log_sigmoid(labels * z)) / z.shape[0]


def chunked_sigmoid_loss(image_embeds: jax.Array, text_embeds: jax.Array,
                         logit_scale: jax.Array, logit_bias: jax.Array, *,
                         chunk_size: int) -> jax.Array:
    """The same loss, never holding more than a ``[B, chunk_size]`` block of logits.

    Texts are processed ``chunk_size`` at a time in a ``lax.scan``; each block is
    rematerialized in the backward pass (``jax.checkpoint``), so memory stays ``O(B * chunk)``
    for gradients too. ``B`` must be a multiple of ``chunk_size``.
    """
    b, d = text_embeds.shape
    if chunk_size <= 0 or b % chunk_size:
        raise ValueError(f"batch {b} is not a multiple of chunk_size {chunk_size}: pick a divisor")
    scale = jnp.exp(logit_scale)
    rows = jnp.arange(b)[:, None]

    @jax.checkpoint
    def block(start: jax.Array, texts: jax.Array) -> jax.Array:
        z = image_embeds @ texts.T * scale + logit_bias  # [B, C]
        labels = jnp.where(rows == start + jnp.arange(chunk_size)[None, :], 1.0, -1.0)
        return jnp.sum(jax.nn.log_sigmoid(labels.astype(z.dtype) * z))

    def step(total: jax.Array, xs: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, None]:
        start, texts = xs
        return total + block(start, texts), None

    starts = jnp.arange(0, b, chunk_size)
    chunks = text_embeds.reshape(b // chunk_size, chunk_size, d)
    total, _ = jax.lax.scan(step, jnp.zeros((), image_embeds.dtype), (starts, chunks))
    return -total / b
