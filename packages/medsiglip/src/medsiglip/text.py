"""The SigLIP text tower (Flax NNX).

Token ids ``[B, L]`` (``L <= max_positions``; SigLIP pads every text to the full length with
``</s>`` and uses no attention mask) -> token states ``[B, L, D]`` after the final LayerNorm;
the pooled embedding is the last position through a linear head, ``[B, projection_size]``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from medsiglip.config import SiglipTextConfig
from medsiglip.layers import EMBED, Encoder, layer_norm, linear
from medsiglip.sharding import param


class TextTower(nnx.Module):
    """SigLIP text tower: ``pooled(ids [B, L]) -> [B, P]``, ``__call__`` -> ``[B, L, D]``."""

    def __init__(self, config: SiglipTextConfig, *, dtype: jnp.dtype = jnp.float32,
                 rngs: nnx.Rngs):
        self.config = config
        d = config.hidden_size
        self.token_embedding = nnx.Embed(
            config.vocab_size, d, dtype=dtype, param_dtype=dtype, rngs=rngs,
            embedding_metadata={"out_sharding": ("vocab", EMBED), "eager_sharding": False},
        )
        self.position_embedding = param(
            nnx.initializers.normal(0.02)(rngs.params(), (config.max_positions, d), dtype),
            ("vision_pos", EMBED))
        self.encoder = Encoder(
            config.num_layers, d, config.intermediate_size, config.num_heads,
            config.layer_norm_eps, config.hidden_act, dtype=dtype, rngs=rngs,
        )
        self.final_layer_norm = layer_norm(d, config.layer_norm_eps, dtype, rngs)
        self.head = linear(d, config.projection_size, dtype, rngs, (EMBED, None))

    def __call__(self, ids: jax.Array) -> jax.Array:
        """Token ids ``[B, L]`` -> final-LayerNorm states ``[B, L, D]``."""
        if ids.ndim != 2 or ids.shape[1] > self.config.max_positions:
            raise ValueError(
                f"token ids must be [B, L] with L <= {self.config.max_positions}, got "
                f"{list(ids.shape)}: tokenize with medsiglip.SiglipTokenizer"
            )
        x = self.token_embedding(ids) + self.position_embedding[: ids.shape[1]]
        return self.final_layer_norm(self.encoder(x))

    def pooled(self, ids: jax.Array) -> jax.Array:
        """Token ids ``[B, L]`` -> unnormalized text embedding ``[B, P]`` (last position)."""
        return self.head(self(ids)[:, -1])
