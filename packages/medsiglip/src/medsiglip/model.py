"""The two-tower SigLIP model: image and text embeddings, logits and probabilities.

``logits_per_text = normalize(t) @ normalize(i).T * exp(logit_scale) + logit_bias``;
zero-shot probabilities are ``sigmoid(logits)`` (each label scored independently).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from medsiglip.config import SiglipConfig
from medsiglip.sharding import param
from medsiglip.text import TextTower
from medsiglip.vision import VisionTower


def l2_normalize(x: jax.Array, eps: float = 0.0) -> jax.Array:
    """``x / ||x||`` along the last axis, computed in float32."""
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps or 1e-12)


class SiglipOutput(NamedTuple):
    image_embeds: jax.Array  # [Bi, D], L2-normalized
    text_embeds: jax.Array  # [Bt, D], L2-normalized
    logits_per_image: jax.Array  # [Bi, Bt]
    logits_per_text: jax.Array  # [Bt, Bi]


class SiglipModel(nnx.Module):
    """Vision tower (with MAP head) + text tower + learned ``logit_scale`` / ``logit_bias``."""

    def __init__(self, config: SiglipConfig, *, dtype: jnp.dtype = jnp.float32,
                 rngs: nnx.Rngs):
        self.config = config
        self.vision = VisionTower(config.vision, dtype=dtype, rngs=rngs)
        self.text = TextTower(config.text, dtype=dtype, rngs=rngs)
        # big_vision's init: t = log(10), b = -10.
        self.logit_scale = param(jnp.full((1,), jnp.log(10.0), jnp.float32), (None,))
        self.logit_bias = param(jnp.full((1,), -10.0, jnp.float32), (None,))

    def image_features(self, pixels: jax.Array) -> jax.Array:
        """Images ``[B, H, W, C]`` -> unnormalized pooled embeddings ``[B, D]``."""
        return self.vision.pooled(pixels)

    def text_features(self, ids: jax.Array) -> jax.Array:
        """Token ids ``[B, L]`` -> unnormalized pooled embeddings ``[B, D]``."""
        return self.text.pooled(ids)

    def logits(self, image_embeds: jax.Array, text_embeds: jax.Array) -> jax.Array:
        """Normalized ``[Bi, D]`` x ``[Bt, D]`` -> ``logits_per_image`` ``[Bi, Bt]``."""
        scale = jnp.exp(self.logit_scale[...].astype(jnp.float32))[0]
        bias = self.logit_bias[...].astype(jnp.float32)[0]
        return image_embeds @ text_embeds.T * scale + bias

    def __call__(self, pixels: jax.Array, ids: jax.Array) -> SiglipOutput:
        img = l2_normalize(self.image_features(pixels))
        txt = l2_normalize(self.text_features(ids))
        logits = self.logits(img, txt)
        return SiglipOutput(img, txt, logits, logits.T)
