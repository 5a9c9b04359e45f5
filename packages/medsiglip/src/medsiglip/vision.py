"""The SigLIP vision tower (Flax NNX): the narrow interface MedGemma's image path uses.

``VisionTower(config, rngs=...)(pixels)`` maps normalized images ``[B, H, W, C]`` (NHWC,
values in [-1, 1], ``H = W = config.image_size``) to patch tokens ``[B, N, D]`` after the
post-LayerNorm, ``N = (H / patch) ** 2`` in row-major grid order. With ``config.use_head`` the
MAP pooling head gives one ``[B, D]`` embedding per image (:meth:`VisionTower.pooled`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from medsiglip.config import SiglipVisionConfig
from medsiglip.layers import EMBED, MLP, TOKENS, Attention, Encoder, layer_norm
from medsiglip.sharding import constrain, param


class PatchEmbedding(nnx.Module):
    """Non-overlapping ``p x p`` patches -> ``[B, N, D]`` plus learned positions.

    Equivalent to a stride-``p`` convolution with bias (HF stores it OIHW; here the kernel is
    ``[p, p, C, D]``) and runs as one matrix product. ``position_embedding`` is ``[N, D]``.
    """

    def __init__(self, config: SiglipVisionConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        p, c, d = config.patch_size, config.num_channels, config.hidden_size
        init = nnx.initializers.lecun_normal()
        patch = "vision_patch"
        self.kernel = param(init(rngs.params(), (p, p, c, d), dtype), (patch, patch, patch, EMBED))
        self.bias = param(jnp.zeros((d,), dtype), (EMBED,))
        self.position_embedding = param(
            nnx.initializers.normal(d**-0.5)(rngs.params(), (config.num_patches, d), dtype),
            ("vision_pos", EMBED))
        self.patch_size = p

    def __call__(self, pixels: jax.Array) -> jax.Array:
        b, h, w, c = pixels.shape
        p = self.patch_size
        gh, gw = h // p, w // p
        x = pixels.astype(self.kernel.dtype)
        x = x.reshape(b, gh, p, gw, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, gh * gw, p * p * c)
        kernel = self.kernel[...].reshape(p * p * c, -1)
        x = constrain(x, ("batch", "length", "act_patches"))
        return constrain(x @ kernel + self.bias[...] + self.position_embedding[...], TOKENS)


class MAPHead(nnx.Module):
    """Multi-head attention pooling: a learned probe ``[1, 1, D]`` attends over the tokens,
    then ``x + mlp(ln(x))``; ``[B, N, D] -> [B, D]``."""

    def __init__(self, config: SiglipVisionConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        d = config.hidden_size
        self.probe = param(nnx.initializers.normal(1.0)(rngs.params(), (1, 1, d), dtype),
                           (None, None, EMBED))
        self.attention = Attention(d, config.num_heads, dtype=dtype, rngs=rngs)
        self.layernorm = layer_norm(d, config.layer_norm_eps, dtype, rngs)
        self.mlp = MLP(d, config.intermediate_size, config.hidden_act, dtype=dtype, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        probe = jnp.broadcast_to(self.probe[...], (tokens.shape[0], 1, tokens.shape[-1]))
        x = self.attention(probe, tokens)
        x = x + self.mlp(self.layernorm(x))
        return x[:, 0]


class VisionTower(nnx.Module):
    """SigLIP vision tower. ``__call__``: ``[B, H, W, C]`` float -> ``[B, N, D]`` tokens."""

    def __init__(self, config: SiglipVisionConfig, *, dtype: jnp.dtype = jnp.float32,
                 rngs: nnx.Rngs):
        self.config = config
        self.embeddings = PatchEmbedding(config, dtype=dtype, rngs=rngs)
        self.encoder = Encoder(
            config.num_layers, config.hidden_size, config.intermediate_size, config.num_heads,
            config.layer_norm_eps, config.hidden_act, dtype=dtype, rngs=rngs,
        )
        self.post_layernorm = layer_norm(config.hidden_size, config.layer_norm_eps, dtype, rngs)
        self.head = MAPHead(config, dtype=dtype, rngs=rngs) if config.use_head else None

    def _check(self, pixels: jax.Array) -> None:
        cfg = self.config
        want = (cfg.image_size, cfg.image_size, cfg.num_channels)
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != want:
            hint = ""
            if pixels.ndim == 4 and pixels.shape[1] == cfg.num_channels:
                hint = " (channels-first? pass NHWC)"
            raise ValueError(
                f"images must be [B, {want[0]}, {want[1]}, {want[2]}] (NHWC), got "
                f"{list(pixels.shape)}{hint}: run medsiglip.preprocess(images, size="
                f"{cfg.image_size}) or resize the position embedding to your size"
            )

    def __call__(self, pixels: jax.Array, *, remat: str = "none", scan: bool = False
                 ) -> jax.Array:
        """Normalized images ``[B, H, W, C]`` -> post-LayerNorm patch tokens ``[B, N, D]``
        (``remat``, ``scan``: how the encoder runs its blocks, :mod:`medsiglip.remat`)."""
        self._check(pixels)
        x = self.embeddings(pixels)
        x = self.encoder(x, remat=remat, scan=scan)
        return self.post_layernorm(x)

    def pool(self, tokens: jax.Array) -> jax.Array:
        """MAP-head pooling of ``[B, N, D]`` tokens -> ``[B, D]`` (needs ``use_head``)."""
        if self.head is None:
            raise ValueError("this vision tower has no MAP head (config.use_head=False)")
        return self.head(tokens)

    def pooled(self, pixels: jax.Array) -> jax.Array:
        """Images ``[B, H, W, C]`` -> pooled, unnormalized image embedding ``[B, D]``."""
        return self.pool(self(pixels))
