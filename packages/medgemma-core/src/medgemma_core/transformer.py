"""The Gemma 3 text decoder (Flax NNX) and its KV cache."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

from medsiglip import weights
from medsiglip.remat import check_remat, run_blocks
from medsiglip.sharding import constrain, param

from . import quant
from .attention import Attention, AttnInputs
from .config import Gemma3Config
from .layers import FeedForward, RMSNorm, pin_to, rope_inv_freq, rope_tables, vocab_projection


@struct.dataclass
class KVCache:
    """Per-layer (k [B, K, S, Hd], v [B, K, Hd, S]); S = ``window`` for local layers (a ring buffer), the
    maximum length for global ones. ``ring_index`` [window] holds the absolute index stored in
    each ring slot (-1 empty); ``start`` [B] is each row's first real index (left padding);
    ``length`` is the next index to write."""

    layers: tuple[tuple[jax.Array, jax.Array], ...]
    ring_index: jax.Array
    start: jax.Array
    length: jax.Array

    @classmethod
    def create(cls, cfg: Gemma3Config, batch: int, max_len: int, start: jax.Array,
               dtype=jnp.float32) -> KVCache:
        layers = []
        w = min(cfg.sliding_window, max_len)
        for i in range(cfg.num_layers):
            s = w if cfg.is_local(i) else max_len
            k = jnp.zeros((batch, cfg.num_kv_heads, s, cfg.head_dim), dtype)
            v = jnp.zeros((batch, cfg.num_kv_heads, cfg.head_dim, s), dtype)
            layers.append((k, v))
        return cls(tuple(layers), jnp.full((w,), -1, jnp.int32),
                   jnp.asarray(start, jnp.int32), jnp.zeros((), jnp.int32))


_TOKENS = ("batch", "length", "act_embed")  # [B, T, D] activations' logical axes


class Block(nnx.Module):
    """Sandwich-norm decoder layer: h += post_attn(attn(pre_attn(h))); h += post_ffw(mlp(pre_ffw(h)))."""

    def __init__(self, cfg: Gemma3Config, layer: int, *, dtype, rngs: nnx.Rngs):
        eps = cfg.rms_norm_eps
        self.pre_attn_norm = RMSNorm(cfg.hidden_size, eps=eps, dtype=dtype)
        self.attn = Attention(cfg, layer, dtype=dtype, rngs=rngs)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, eps=eps, dtype=dtype)
        self.pre_ffw_norm = RMSNorm(cfg.hidden_size, eps=eps, dtype=dtype)
        self.mlp = FeedForward(cfg.hidden_size, cfg.intermediate_size, dtype=dtype, rngs=rngs)
        self.post_ffw_norm = RMSNorm(cfg.hidden_size, eps=eps, dtype=dtype)

    def __call__(self, h, inp, rope, cache=None, ring_index=None):
        h = constrain(h, _TOKENS)
        a, new_cache = self.attn(self.pre_attn_norm(h), inp, rope, cache, ring_index)
        h = h + self.post_attn_norm(a)
        h = h + self.post_ffw_norm(self.mlp(self.pre_ffw_norm(h)))
        return constrain(h, _TOKENS), new_cache


class Gemma3(nnx.Module):
    """Gemma 3 decoder. ``embedding`` [V, D] is tied to the output projection."""

    def __init__(self, cfg: Gemma3Config, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = cfg
        self.dtype = dtype
        self.embedding = param(
            nnx.initializers.normal(0.02)(rngs.params(), (cfg.vocab_size, cfg.hidden_size), dtype),
            ("vocab", "embed"))
        self.layers = nnx.List([Block(cfg, i, dtype=dtype, rngs=rngs)
                                for i in range(cfg.num_layers)])
        self.final_norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)

    # ---- pieces -------------------------------------------------------------------------
    def embed(self, tokens: jax.Array) -> jax.Array:
        """tokens [B, T] -> [B, T, D], scaled by sqrt(D) rounded to the weight dtype."""
        table = self.embedding[...]
        scale = jnp.asarray(math.sqrt(self.config.hidden_size), table.dtype)
        if isinstance(table, quant.QArray):
            return quant.take(table, tokens) * scale
        # without the pin, XLA on CPUs hoists a float32 copy of the bf16 table out of the
        # decode loop for this lookup (2.7 GB more for the 4B model; tested)
        tokens, table = pin_to(tokens, table)
        return jnp.take(table, tokens, axis=0) * scale

    def logits(self, h: jax.Array) -> jax.Array:
        """Final hidden states [..., D] (already normed) -> logits [..., V] in float32."""
        out = vocab_projection(h, self.embedding[...])
        cap = self.config.final_logit_softcapping
        if cap is not None:
            out = jnp.tanh(out / cap) * cap
        return out

    def _inv_freqs(self) -> dict[bool, jax.Array]:
        c = self.config
        return {True: rope_inv_freq(c.head_dim, c.rope_local_theta),
                False: rope_inv_freq(c.head_dim, c.rope_global_theta, c.rope_global_scaling)}

    # ---- forward ------------------------------------------------------------------------
    def __call__(self, tokens: jax.Array, *, embeddings: jax.Array | None = None,
                 cache: KVCache | None = None, start: jax.Array | None = None,
                 image_id: jax.Array | None = None,
                 segment_ids: jax.Array | None = None,
                 logits_at: str = "all", remat: str = "none",
                 scan: bool = False) -> tuple[jax.Array, KVCache | None]:
        """Run T new tokens [B, T].

        Without a cache the tokens are a whole sequence at indices 0..T-1 (``start`` marks left
        padding). With a cache they continue at ``cache.length``. ``embeddings`` [B, T, D]
        replaces the token embedding (the image-text model inserts soft tokens there).
        ``segment_ids`` [B, T] int (no cache): packed rows, 1..n for the sequences of a row in
        order, 0 for padding; RoPE positions restart at 0 at each segment's first token and a
        token attends only to earlier tokens of its own segment (window counted within it).
        ``logits_at``: "all" [B, T, V], "last" [B, V], or "none" (final hidden states).
        ``remat``: the rematerialization policy of every block for training
        (:mod:`medsiglip.remat`: "none", "full", "dots"); ``scan``: run the layers as a
        ``lax.scan`` over their local/global period (one period compiled, not every layer).
        Both only without a cache.
        """
        if (check_remat(remat) != "none" or scan) and cache is not None:
            raise ValueError("remat and scan are for training (whole sequences); pass "
                             "remat='none', scan=False with a KV cache")
        if segment_ids is not None and cache is not None:
            raise ValueError("segment_ids (packed rows) are for whole sequences; run packed "
                             "batches without a KV cache")
        b, t = tokens.shape
        h = self.embed(tokens) if embeddings is None else embeddings
        base = jnp.zeros((), jnp.int32) if cache is None else cache.length
        if start is None:
            start = jnp.zeros((b,), jnp.int32) if cache is None else cache.start
        qidx = base + jnp.arange(t, dtype=jnp.int32)
        positions = qidx[None, :] - start[:, None]
        if segment_ids is not None:
            segment_ids = jnp.asarray(segment_ids, jnp.int32)
            positions = qidx[None, :] - segment_starts(segment_ids)
        inp = AttnInputs(q_index=qidx, start=start, positions=jnp.maximum(positions, 0),
                         image_id=image_id, segment_id=segment_ids)
        # cos/sin once per RoPE base (local, global), not in every layer
        ropes = {local: rope_tables(inp.positions, f, h.dtype)
                 for local, f in self._inv_freqs().items()}
        new_cache = None
        if cache is None:
            fields = dataclasses.astuple(inp)
            h = run_blocks(self.layers, h, _run_block, remat=remat, scan=scan,
                           period=layer_period(self.config),
                           extra=lambda i: (fields, ropes[self.config.is_local(i)]))
        else:
            new_layers: list[Any] = []
            for i, block in enumerate(self.layers):
                local = self.config.is_local(i)
                h, new = block(h, inp, ropes[local], cache.layers[i], cache.ring_index)
                new_layers.append(new)
            new_cache = cache.replace(layers=tuple(new_layers),
                                      ring_index=_advance_ring(cache.ring_index, qidx),
                                      length=base + t)
        h = self.final_norm(h)
        if logits_at == "none":
            return h, new_cache
        if logits_at == "last":
            h = h[:, -1]
        return self.logits(h), new_cache


def segment_starts(segment_ids: jax.Array) -> jax.Array:
    """[B, T] -> the index of the first token of each token's segment (a segment is a run of
    equal ids)."""
    t = segment_ids.shape[1]
    idx = jnp.arange(t, dtype=jnp.int32)
    first = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool),
                             segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    return jax.lax.cummax(jnp.where(first, idx[None, :], 0), axis=1)


def layer_period(cfg: Gemma3Config) -> int:
    """The smallest p with layer i local exactly when layer i % p is (6 for Gemma 3's 5:1)."""
    n = cfg.num_layers
    return next(p for p in range(1, n + 1)
                if all(cfg.is_local(i) == cfg.is_local(i % p) for i in range(n)))


def _run_block(block: Block, h: jax.Array, inp: tuple, rope: tuple) -> jax.Array:
    """One block without a cache; ``inp`` is the AttnInputs' fields (a pytree, for nnx.remat)."""
    return block(h, AttnInputs(*inp), rope)[0]


def _advance_ring(ring: jax.Array, qidx: jax.Array) -> jax.Array:
    w, t = ring.shape[0], qidx.shape[0]
    m = min(w, t)
    return ring.at[qidx[t - m:] % w].set(qidx[t - m:])


def param_count(cfg: Gemma3Config) -> int:
    """Number of parameters, from shapes only (no memory used)."""
    return weights.param_count(lambda rngs: Gemma3(cfg, rngs=rngs))
