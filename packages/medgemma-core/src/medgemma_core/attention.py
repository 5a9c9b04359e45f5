"""Gemma 3 attention: QK-norm, RoPE, grouped-query attention over a KV cache.

Every key slot carries the absolute sequence index it holds (``-1`` when empty). Masks are
derived from those indices, the query indices and each row's first real index (left padding):

    visible(b, t, s) = start[b] <= kidx[s] <= qidx[t]              (causal, no padding)
                       and (global or qidx[t] - kidx[s] < window)  (sliding window, one-sided)
                       or the pair lies in the same image block    (bidirectional, windowed)

Local (sliding-window) layers keep a ring buffer of ``window`` slots: index i lives in slot
``i % window``; so their cache is O(window) whatever the context length.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from medsiglip.lora import adapt
from medsiglip.sharding import constrain, param

from .layers import RMSNorm, apply_rope, matmul

NEG_INF = -2.3819763e38  # finite "minus infinity": fully-masked (padding) rows stay NaN-free
QUERY_BLOCK = 512  # long prefills attend this many queries at a time


@dataclasses.dataclass(frozen=True)
class AttnInputs:
    """Index bookkeeping shared by every layer of one forward pass.

    q_index [T] absolute index of each new token (the same for every row);
    start [B] first real index of each row; positions [B, T] RoPE positions;
    image_id [B, T] image block of each new token (0 = text), or None.
    """

    q_index: jax.Array
    start: jax.Array
    positions: jax.Array
    image_id: jax.Array | None = None


def make_mask(qidx, kidx, start, window: int | None, q_img=None, k_img=None) -> jax.Array:
    """Boolean mask [B, T, S] from query indices [T], key indices [S] and row starts [B]."""
    q = qidx[None, :, None]
    k = kidx[None, None, :]
    valid = (k >= 0) & (k >= start[:, None, None])
    causal = k <= q
    if q_img is not None and k_img is not None:
        same = (q_img[:, :, None] == k_img[:, None, :]) & (q_img[:, :, None] > 0)
        causal = causal | same
    mask = valid & causal
    if window is not None:
        mask = mask & (q - k < window)
    return mask


class Attention(nnx.Module):
    """Multi-/grouped-query attention with q/k RMSNorm. Kernels: q [D, H, Hd], k/v [D, K, Hd],
    o [H, Hd, D]."""

    lora_targets = {"q": 1, "k": 1, "v": 1, "o": 2}

    def __init__(self, cfg, layer: int, *, dtype, rngs: nnx.Rngs):
        d, h, k, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        init = nnx.initializers.normal(0.02)
        self.q = param(init(rngs.params(), (d, h, hd), dtype), ("embed", "q_heads", "head_dim"))
        self.k = param(init(rngs.params(), (d, k, hd), dtype), ("embed", "kv_heads", "head_dim"))
        self.v = param(init(rngs.params(), (d, k, hd), dtype), ("embed", "kv_heads", "head_dim"))
        self.o = param(init(rngs.params(), (h, hd, d), dtype), ("q_heads", "head_dim", "embed"))
        self.lora = nnx.data(None)
        self.q_norm = RMSNorm(hd, eps=cfg.rms_norm_eps, dtype=dtype, name="head_dim")
        self.k_norm = RMSNorm(hd, eps=cfg.rms_norm_eps, dtype=dtype, name="head_dim")
        self.window = cfg.sliding_window if cfg.is_local(layer) else None
        self.scale = float(cfg.query_pre_attn_scalar) ** -0.5
        self.softcap = cfg.attn_logit_softcapping
        self.groups = h // k

    def __call__(self, x, inp: AttnInputs, inv_freq, cache=None, ring_index=None):
        """x [B, T, D] -> ([B, T, D], new cache entry or None).

        ``cache`` is ``(k, v)``, k [B, K, S, Hd] and v [B, K, Hd, S]: S slots of a global layer hold
        indices 0..S-1; a local layer's S = window ring slots hold ``ring_index`` (the slot
        indices *before* this call; the caller advances them).
        """
        q = adapt(self, "q", x, matmul(x, self.q[...], "btd,dhk->bthk"))
        k = adapt(self, "k", x, matmul(x, self.k[...], "btd,dhk->bthk"))
        v = adapt(self, "v", x, matmul(x, self.v[...], "btd,dhk->bthk"))
        q = constrain(q, ("batch", "length", "act_heads", None))
        k = constrain(k, ("batch", "length", "act_kv_heads", None))
        v = constrain(v, ("batch", "length", "act_kv_heads", None))
        q = apply_rope(self.q_norm(q), inp.positions, inv_freq)
        # keys live as [B, K, S, Hd], values as [B, K, Hd, S]: the layouts in which XLA's CPU
        # matmuls read them (contracted axis last), so no decode step transposes the cache
        k = apply_rope(self.k_norm(k), inp.positions, inv_freq).transpose(0, 2, 1, 3)
        v = v.transpose(0, 2, 3, 1)
        t = x.shape[1]
        if cache is not None and t == 1:
            return self._decode_step(q, k, v, inp, cache, ring_index)
        k_img = inp.image_id
        if cache is None:
            keys, values, kidx, new_cache = k, v, inp.q_index, None
        elif self.window is None:  # global: write at the absolute indices, attend to all slots
            ck, cv = cache
            keys = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, 0, inp.q_index[0], 0))
            values = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, 0, 0, inp.q_index[0]))
            kidx = jnp.arange(ck.shape[2], dtype=jnp.int32)
            new_cache = (keys, values)
            if k_img is not None:  # image blocks are bidirectional within a chunk
                k_img = jax.lax.dynamic_update_slice(
                    jnp.zeros((k_img.shape[0], ck.shape[2]), k_img.dtype), k_img,
                    (0, inp.q_index[0]))
        else:  # local, a chunk: attend to the old ring plus the chunk, keep its last w entries
            ck, cv = cache
            k, v = k.astype(ck.dtype), v.astype(cv.dtype)
            keys = jnp.concatenate([ck, k], axis=2)
            values = jnp.concatenate([cv, v], axis=3)
            kidx = jnp.concatenate([ring_index, inp.q_index])
            w = ck.shape[2]
            m = min(t, w)
            slots = inp.q_index[t - m:] % w
            new_cache = (ck.at[:, :, slots].set(k[:, :, t - m:]),
                         cv.at[:, :, :, slots].set(v[:, :, :, t - m:]))
            if k_img is not None:
                k_img = jnp.concatenate([jnp.zeros((k_img.shape[0], w), k_img.dtype), k_img], 1)
        q_img = inp.image_id if k_img is not None else None
        out = self._attend(q, keys, values, inp.q_index, kidx, inp.start, q_img, k_img)
        out = constrain(out, ("batch", "length", "act_heads", None))
        return adapt(self, "o", out, matmul(out, self.o[...], "bthk,hkd->btd")), new_cache

    def _decode_step(self, q, k, v, inp: AttnInputs, cache, ring_index):
        """One new token per row: attend to the cache as it was plus the token itself, then
        write the token into its slot. The write's only consumer is the new cache, so XLA
        updates the buffer in place (attending to the written cache made it copy the cache
        every step)."""
        ck, cv = cache
        s = ck.shape[2]
        qi = inp.q_index[0]
        if self.window is None:
            slot, kidx = qi, jnp.arange(s, dtype=jnp.int32)
        else:
            slot, kidx = qi % s, ring_index
        # old slots strictly before this token (and inside the window), plus the token itself
        mask = make_mask(qi[None] - 1, kidx, inp.start, None if self.window is None
                         else self.window - 1)
        b, _, h, hd = q.shape
        kh = ck.shape[1]
        qs = (q * jnp.asarray(self.scale, q.dtype)).reshape(b, kh, self.groups, hd)
        old = jnp.einsum("bkgd,bksd->bkgs", qs, ck.astype(q.dtype)).astype(jnp.float32)
        own = jnp.einsum("bkgd,bkd->bkg", qs, k[:, :, 0].astype(q.dtype)).astype(jnp.float32)
        scores = jnp.concatenate([old, own[..., None]], axis=-1)
        if self.softcap is not None:
            scores = jnp.tanh(scores / self.softcap) * self.softcap
        valid = jnp.concatenate([mask[:, 0], jnp.ones((b, 1), bool)], axis=-1)
        scores = jnp.where(valid[:, None, None], scores, NEG_INF)
        probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
        out = jnp.einsum("bkgs,bkds->bkgd", probs[..., :s], cv.astype(q.dtype))
        out = out + probs[..., s:] * v[:, :, :, 0][:, :, None, :].astype(q.dtype)
        out = out.reshape(b, h, hd)
        out = adapt(self, "o", out, matmul(out, self.o[...], "bhk,hkd->bd"))[:, None]
        new_cache = (jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, 0, slot, 0)),
                     jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, 0, 0, slot)))
        return out, new_cache

    def _attend(self, q, k, v, qidx, kidx, start, q_img, k_img):
        """q [B, T, H, Hd], k [B, K, S, Hd], v [B, K, Hd, S] -> [B, T, H, Hd].

        Long query runs are processed QUERY_BLOCK queries at a time (``lax.map``), so a long
        prefill never holds a T x S score matrix, only QUERY_BLOCK x S per step.
        """
        t = q.shape[1]
        if t <= QUERY_BLOCK or t % QUERY_BLOCK:
            mask = make_mask(qidx, kidx, start, self.window, q_img, k_img)
            return self._attend_block(q, k, v, mask)
        n = t // QUERY_BLOCK
        b, _, h, hd = q.shape
        blocks = (q.reshape(b, n, QUERY_BLOCK, h, hd).swapaxes(0, 1),
                  qidx.reshape(n, QUERY_BLOCK),
                  None if q_img is None else q_img.reshape(b, n, QUERY_BLOCK).swapaxes(0, 1))

        def one(block):
            qb, qi, qm = block
            return self._attend_block(qb, k, v, make_mask(qi, kidx, start, self.window, qm, k_img))

        out = jax.lax.map(one, blocks)
        return out.swapaxes(0, 1).reshape(b, t, h, hd)

    def _attend_block(self, q, k, v, mask):
        """q [B, T, H, Hd], k [B, K, S, Hd], v [B, K, Hd, S], mask [B, T, S] -> [B, T, H, Hd]."""
        b, t, h, hd = q.shape
        kh = k.shape[1]
        q = (q * jnp.asarray(self.scale, q.dtype)).reshape(b, t, kh, self.groups, hd)
        scores = jnp.einsum("btkgd,bksd->bkgts", q, k.astype(q.dtype)).astype(jnp.float32)
        if self.softcap is not None:
            scores = jnp.tanh(scores / self.softcap) * self.softcap
        scores = jnp.where(mask[:, None, None], scores, NEG_INF)
        probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
        out = jnp.einsum("bkgts,bkds->btkgd", probs, v.astype(q.dtype))
        return out.reshape(b, t, h, hd)
