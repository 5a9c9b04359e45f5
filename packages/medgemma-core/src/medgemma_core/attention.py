"""Gemma 3 attention: QK-norm, RoPE, grouped-query attention over a KV cache.

Every key slot carries the absolute sequence index it holds (``-1`` when empty). Masks are
derived from those indices, the query indices and each row's first real index (left padding):

    visible(b, t, s) = start[b] <= kidx[s] <= qidx[t]              (causal, no padding)
                       and (global or qidx[t] - kidx[s] < window)  (sliding window, one-sided)
                       or the pair lies in the same image block    (bidirectional, windowed)
                       and seg[b, t] == seg[b, s]                   (packed rows, if given)

Packed rows (``segment_id`` [B, T], training only): a query sees only keys of its own segment;
RoPE positions restart at each segment (the caller's ``positions``), and since a segment is a
contiguous run of indices, causality and the window count within the segment.

Cost follows the mask: short runs (at most QUERY_BLOCK queries) take one dense score matrix;
longer ones on local layers without image blocks compute only the window band (query blocks
of LOCAL_BLOCK against the ``window + LOCAL_BLOCK`` keys around them: O(T·W)); everything
else (global layers, image blocks) is blocked online-softmax attention over FLASH_BLOCK key
blocks that skips blocks the mask hides (O(T·block) memory, never T x S). On GPUs, whole
sequences without image blocks or left padding go to cuDNN's fused attention.

Local (sliding-window) layers keep a ring buffer of ``window`` slots: index i lives in slot
``i % window``; so their cache is O(window) whatever the context length.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from medsiglip.lora import adapt, project
from medsiglip.sharding import constrain, param

from .layers import RMSNorm, apply_rope, matmul

NEG_INF = -2.3819763e38  # finite "minus infinity": fully-masked (padding) rows stay NaN-free
QUERY_BLOCK = 512  # runs of at most this many queries take the dense path (one score matrix)
LOCAL_BLOCK = 256  # queries per step of the banded sliding-window path (keys: window + block)
FLASH_BLOCK = 512  # queries and keys per step of the blocked online-softmax path
_BIG = 2**30


@dataclasses.dataclass(frozen=True)
class AttnInputs:
    """Index bookkeeping shared by every layer of one forward pass.

    q_index [T] absolute index of each new token (the same for every row);
    start [B] first real index of each row; positions [B, T] RoPE positions;
    image_id [B, T] image block of each new token (0 = text), or None;
    segment_id [B, T] packed-row segment of each token (no cache: keys are the queries), or None.
    """

    q_index: jax.Array
    start: jax.Array
    positions: jax.Array
    image_id: jax.Array | None = None
    segment_id: jax.Array | None = None


def make_mask(qidx, kidx, start, window: int | None, q_img=None, k_img=None, q_seg=None,
              k_seg=None) -> jax.Array:
    """Boolean mask [B, T, S] from query indices [T], key indices [S] and row starts [B];
    optionally image blocks and segments ([B, T] and [B, S] each)."""
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
    if q_seg is not None:
        mask = mask & (q_seg[:, :, None] == k_seg[:, None, :])
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

    def __call__(self, x, inp: AttnInputs, rope, cache=None, ring_index=None):
        """x [B, T, D] -> ([B, T, D], new cache entry or None); ``rope``: the (cos, sin) tables
        of this layer's RoPE base (:func:`~medgemma_core.layers.rope_tables`).

        ``cache`` is ``(k, v)``, k [B, K, S, Hd] and v [B, K, Hd, S]: S slots of a global layer hold
        indices 0..S-1; a local layer's S = window ring slots hold ``ring_index`` (the slot
        indices *before* this call; the caller advances them).
        """
        q = project(self, "q", x, self.q[...], 1, _proj_in)
        k = project(self, "k", x, self.k[...], 1, _proj_in)
        v = project(self, "v", x, self.v[...], 1, _proj_in)
        q = constrain(q, ("batch", "length", "act_heads", None))
        k = constrain(k, ("batch", "length", "act_kv_heads", None))
        v = constrain(v, ("batch", "length", "act_kv_heads", None))
        q = apply_rope(self.q_norm(q), rope)
        # keys live as [B, K, S, Hd], values as [B, K, Hd, S]: the layouts in which XLA's CPU
        # matmuls read them (contracted axis last), so no decode step transposes the cache
        k = apply_rope(self.k_norm(k), rope).transpose(0, 2, 1, 3)
        v = v.transpose(0, 2, 3, 1)
        t = x.shape[1]
        if cache is not None and t == 1:
            return self._decode_step(q, k, v, inp, cache, ring_index)
        k_img = inp.image_id
        band = self.window is not None and k_img is None and t > QUERY_BLOCK
        seg = inp.segment_id
        if seg is not None and cache is not None:
            raise ValueError("segment_id (packed rows) is for whole sequences; run without a "
                             "KV cache")
        if cache is None:
            if band:
                out = _maybe_cudnn(self, q, k, v, inp, lambda: self._banded(
                    q, k, v, inp.q_index, inp.q_index, inp.start, 0, seg))
                return self._project(out), None
            keys, values, kidx, new_cache = k, v, inp.q_index, None
            if self.window is None and k_img is None:
                out = _maybe_cudnn(self, q, k, v, inp, lambda: self._attend(
                    q, keys, values, inp.q_index, kidx, inp.start, None, None, seg))
                return self._project(out), None
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
            w = ck.shape[2]
            m = min(t, w)
            if m == w:  # the chunk's last w entries replace the whole ring: a rotation
                shift = inp.q_index[t - w] % w
                new_cache = (jnp.roll(k[:, :, t - w:], shift, axis=2),
                             jnp.roll(v[:, :, :, t - w:], shift, axis=3))
            else:
                slots = inp.q_index[t - m:] % w
                new_cache = (ck.at[:, :, slots].set(k[:, :, t - m:]),
                             cv.at[:, :, :, slots].set(v[:, :, :, t - m:]))
            img = inp.image_id

            def fresh(_):  # an empty ring (a prompt's first chunk): the chunk alone
                if band:
                    return self._banded(q, k, v, inp.q_index, inp.q_index, inp.start, 0)
                return self._attend(q, k, v, inp.q_index, inp.q_index, inp.start, img, img)

            def with_ring(_):
                if band:  # the ring in index order (empty slots first), then the chunk
                    order = jnp.argsort(ring_index)
                    keys = jnp.concatenate([ck[:, :, order], k], axis=2)
                    values = jnp.concatenate([cv[:, :, :, order], v], axis=3)
                    kidx = jnp.concatenate([ring_index[order], inp.q_index])
                    return self._banded(q, keys, values, inp.q_index, kidx, inp.start, w)
                keys = jnp.concatenate([ck, k], axis=2)
                values = jnp.concatenate([cv, v], axis=3)
                kidx = jnp.concatenate([ring_index, inp.q_index])
                k_img = None if img is None else jnp.concatenate(
                    [jnp.zeros((img.shape[0], w), img.dtype), img], 1)
                return self._attend(q, keys, values, inp.q_index, kidx, inp.start, img, k_img)

            out = jax.lax.cond(jnp.all(ring_index < 0), fresh, with_ring, None)
            return self._project(out), new_cache
        q_img = inp.image_id if k_img is not None else None
        out = self._attend(q, keys, values, inp.q_index, kidx, inp.start, q_img, k_img, seg)
        return self._project(out), new_cache

    def _project(self, out):
        out = constrain(out, ("batch", "length", "act_heads", None))
        return project(self, "o", out, self.o[...], 2, _proj_out)

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

    def _attend(self, q, k, v, qidx, kidx, start, q_img, k_img, seg=None):
        """q [B, T, H, Hd], k [B, K, S, Hd], v [B, K, Hd, S] -> [B, T, H, Hd]: one dense score
        matrix for at most QUERY_BLOCK queries, else the blocked online-softmax path. ``seg``
        [B, T]: segments of packed rows (then the keys are the queries)."""
        if q.shape[1] <= QUERY_BLOCK:
            mask = make_mask(qidx, kidx, start, self.window, q_img, k_img, seg, seg)
            return self._attend_block(q, k, v, mask)
        return self._flash(q, k, v, qidx, kidx, start, q_img, k_img, seg)

    def _banded(self, q, k, v, qidx, kidx, start, front: int, seg=None):
        """Sliding-window attention over the band only (no image blocks). The keys are
        ``front`` earlier slots followed by the T new ones, all in index order (empty slots,
        index -1, first), so query t's window lies in key positions [front + t - W + 1,
        front + t]: each block of LOCAL_BLOCK queries reads the W + LOCAL_BLOCK keys ending at
        its own last one (``dynamic_slice``). O(T·W) compute and memory. ``seg`` [B, T]: the
        segments of packed rows (``front`` = 0)."""
        b, t, h, hd = q.shape
        w, bq = self.window, LOCAL_BLOCK
        n = -(-t // bq)
        span = w + bq
        q, qidx = _pad_queries(q, qidx, n * bq)
        size = max(front + n * bq, span)
        k, v, kidx = _pad_keys(k, v, kidx, size)
        kseg = qseg = None
        if seg is not None:
            kseg = jnp.pad(seg, ((0, 0), (0, size - seg.shape[1])))
            qseg = jnp.pad(seg, ((0, 0), (0, n * bq - t))).reshape(b, n, bq).swapaxes(0, 1)

        def one(block):
            i, qb, qi, qs = block
            # dynamic_slice clamps the end into range, but wraps negative starts around
            s0 = jnp.maximum(i * bq + front - w, 0)
            kb = jax.lax.dynamic_slice_in_dim(k, s0, span, axis=2)
            vb = jax.lax.dynamic_slice_in_dim(v, s0, span, axis=3)
            ki = jax.lax.dynamic_slice_in_dim(kidx, s0, span)
            ks = None if kseg is None else jax.lax.dynamic_slice_in_dim(kseg, s0, span, axis=1)
            return self._attend_block(qb, kb, vb, make_mask(qi, ki, start, w, q_seg=qs,
                                                            k_seg=ks))

        blocks = (jnp.arange(n, dtype=jnp.int32), q.reshape(b, n, bq, h, hd).swapaxes(0, 1),
                  qidx.reshape(n, bq), qseg)
        out = jax.lax.map(one, blocks)
        return out.swapaxes(0, 1).reshape(b, n * bq, h, hd)[:, :t]

    def _flash(self, q, k, v, qidx, kidx, start, q_img, k_img, seg=None):
        """Blocked online-softmax attention: query blocks (``lax.map``, each rematerialized in
        the backward pass) scan key blocks of FLASH_BLOCK, skipping (``lax.cond``) every block
        pair that the causal order, the window, empty slots, image ranges and segment ranges
        (packed rows: ``seg`` [B, T], keys = queries) rule out. Memory O(T·block) forward and
        backward."""
        b, t, h, hd = q.shape
        kh, g, bs = k.shape[1], self.groups, FLASH_BLOCK
        nq, nk = -(-t // bs), -(-k.shape[2] // bs)
        q, qidx = _pad_queries(q, qidx, nq * bs)
        k, v, kidx = _pad_keys(k, v, kidx, nk * bs)
        images = q_img is not None
        if images:
            q_img = jnp.pad(q_img, ((0, 0), (0, nq * bs - t)))
            k_img = jnp.pad(k_img, ((0, 0), (0, nk * bs - k_img.shape[1])))
        q = (q * jnp.asarray(self.scale, q.dtype)).reshape(b, nq, bs, kh, g, hd)
        q = q.transpose(1, 0, 3, 2, 4, 5)  # [nq, B, K, bs, G, Hd]: scores come out [.., S] last
        qi = qidx.reshape(nq, bs)
        ki = kidx.reshape(nk, bs)
        kvalid = ki >= 0
        k_lo = jnp.min(jnp.where(kvalid, ki, _BIG), axis=1)
        k_hi = jnp.max(jnp.where(kvalid, ki, -1), axis=1)
        q_lo, q_hi = qi.min(axis=1), qi.max(axis=1)
        kb = k.reshape(b, kh, nk, bs, hd).transpose(2, 0, 1, 3, 4)
        vb = v.reshape(b, kh, hd, nk, bs).transpose(3, 0, 1, 2, 4)
        if images:  # range of the image ids (> 0) present in each block, over the batch
            qm = q_img.reshape(b, nq, bs).swapaxes(0, 1)
            km = k_img.reshape(b, nk, bs).swapaxes(0, 1)
            img_q = (jnp.min(jnp.where(qm > 0, qm, _BIG), axis=(1, 2)), qm.max(axis=(1, 2)))
            img_k = (jnp.min(jnp.where(km > 0, km, _BIG), axis=(1, 2)), km.max(axis=(1, 2)))
        else:
            qm = km = img_q = img_k = None
        qs = ks = seg_q = seg_k = None
        if seg is not None:  # range of the segment ids in each block, over the batch
            qs = jnp.pad(seg, ((0, 0), (0, nq * bs - t))).reshape(b, nq, bs).swapaxes(0, 1)
            ks = jnp.pad(seg, ((0, 0), (0, nk * bs - t)), constant_values=-1)
            ks = ks.reshape(b, nk, bs).swapaxes(0, 1)
            seg_q = (qs.min(axis=(1, 2)), qs.max(axis=(1, 2)))
            seg_k = (ks.min(axis=(1, 2)), ks.max(axis=(1, 2)))
        window, softcap, dtype = self.window, self.softcap, q.dtype

        def q_block(args):
            qb, qib, qmb, lo, hi, iq, qsb, sq = args

            def k_block(carry, kargs):
                kbb, vbb, kib, kmb, klo, khi, ik, ksb, sk = kargs
                live = (khi >= 0) & (klo <= hi)
                if images:
                    live = (khi >= 0) & ((klo <= hi) | ((ik[0] <= iq[1]) & (iq[0] <= ik[1])))
                if window is not None:
                    live = live & (lo - khi < window)
                if sq is not None:
                    live = live & (sk[0] <= sq[1]) & (sq[0] <= sk[1])

                def compute(c):
                    m, l_, acc = c
                    sc = jnp.einsum("bktgd,bksd->bktgs", qb, kbb.astype(dtype))
                    sc = sc.astype(jnp.float32)
                    if softcap is not None:
                        sc = jnp.tanh(sc / softcap) * softcap
                    mask = make_mask(qib, kib, start, window, qmb, kmb, qsb,
                                     ksb)[:, None, :, None]
                    sc = jnp.where(mask, sc, NEG_INF)
                    m_new = jnp.maximum(m, sc.max(axis=-1))
                    p = jnp.where(mask, jnp.exp(sc - m_new[..., None]), 0.0)
                    corr = jnp.exp(m - m_new)
                    pv = jnp.einsum("bktgs,bkds->bktgd", p.astype(dtype), vbb.astype(dtype),
                                    preferred_element_type=jnp.float32)
                    return (m_new, l_ * corr + p.sum(axis=-1),
                            acc * corr[..., None] + pv.astype(jnp.float32))

                return jax.lax.cond(live, compute, lambda c: c, carry), None

            init = (jnp.full((b, kh, bs, g), NEG_INF, jnp.float32),
                    jnp.zeros((b, kh, bs, g), jnp.float32),
                    jnp.zeros((b, kh, bs, g, hd), jnp.float32))
            (_, l_, acc), _ = jax.lax.scan(k_block, init,
                                           (kb, vb, ki, km, k_lo, k_hi, img_k, ks, seg_k))
            out = acc / jnp.where(l_ > 0, l_, 1.0)[..., None]  # fully masked rows: zeros
            return out.astype(dtype).transpose(0, 2, 1, 3, 4).reshape(b, bs, h, hd)

        out = jax.lax.map(jax.checkpoint(q_block), (q, qi, qm, q_lo, q_hi, img_q, qs, seg_q))
        return out.swapaxes(0, 1).reshape(b, nq * bs, h, hd)[:, :t]

    def _attend_block(self, q, k, v, mask):
        """q [B, T, H, Hd], k [B, K, S, Hd], v [B, K, Hd, S], mask [B, T, S] -> [B, T, H, Hd].

        Scores are [B, K, T, G, S] (queries x group rows, keys last): the order in which the
        dots produce them, so neither the scores nor the probabilities are transposed
        (``bkgts`` cost a copy of each, ~2x this function's time at 512 tokens on a CPU)."""
        b, t, h, hd = q.shape
        kh = k.shape[1]
        q = (q * jnp.asarray(self.scale, q.dtype)).reshape(b, t, kh, self.groups, hd)
        q = q.transpose(0, 2, 1, 3, 4)  # [B, K, T, G, Hd]: a bitcast for one kv head
        scores = jnp.einsum("bktgd,bksd->bktgs", q, k.astype(q.dtype)).astype(jnp.float32)
        if self.softcap is not None:
            scores = jnp.tanh(scores / self.softcap) * self.softcap
        scores = jnp.where(mask[:, None, :, None], scores, NEG_INF)
        # softmax, normalized after the value product (T x Hd divisions, not T x S)
        e = jnp.exp(scores - jax.lax.stop_gradient(scores.max(axis=-1, keepdims=True)))
        out = jnp.einsum("bktgs,bkds->bktgd", e.astype(q.dtype), v.astype(q.dtype),
                         preferred_element_type=jnp.float32)
        out = (out / e.sum(axis=-1)[..., None]).astype(q.dtype)
        return out.transpose(0, 2, 1, 3, 4).reshape(b, t, h, hd)


def _proj_in(x, w):
    return matmul(x, w, "btd,dhk->bthk")


def _proj_out(x, w):
    return matmul(x, w, "bthk,hkd->btd")


def _pad_queries(q, qidx, size):
    """Pad q [B, T, ...] and qidx [T] to ``size`` queries (indices past the last one)."""
    extra = size - q.shape[1]
    if not extra:
        return q, qidx
    q = jnp.pad(q, ((0, 0), (0, extra)) + ((0, 0),) * (q.ndim - 2))
    return q, jnp.concatenate([qidx, qidx[-1] + 1 + jnp.arange(extra, dtype=qidx.dtype)])


def _pad_keys(k, v, kidx, size):
    """Pad k [B, K, S, Hd], v [B, K, Hd, S], kidx [S] to ``size`` empty slots (index -1)."""
    extra = size - k.shape[2]
    if not extra:
        return k, v, kidx
    return (jnp.pad(k, ((0, 0), (0, 0), (0, extra), (0, 0))),
            jnp.pad(v, ((0, 0), (0, 0), (0, 0), (0, extra))),
            jnp.concatenate([kidx, jnp.full((extra,), -1, kidx.dtype)]))


def _maybe_cudnn(attn: Attention, q, k, v, inp: AttnInputs, xla):
    """On GPUs, whole sequences that cuDNN's fused attention covers (bf16/f16, no softcap, no
    image blocks; causal, optionally a window) run there when no row is left-padded (a
    runtime ``lax.cond``; padded batches take ``xla()``). Elsewhere ``xla()``. Packed rows
    (segments) stay on ``xla()``: jax 0.10's ``dot_product_attention`` takes sequence lengths,
    not segment ids."""
    if (jax.default_backend() != "gpu" or q.dtype not in (jnp.bfloat16, jnp.float16)
            or attn.softcap is not None or inp.image_id is not None or q.shape[-1] > 256
            or inp.segment_id is not None):
        return xla()
    window = None if attn.window is None else (attn.window - 1, 0)

    def fused(_):
        return jax.nn.dot_product_attention(
            q, k.transpose(0, 2, 1, 3).astype(q.dtype), v.transpose(0, 3, 1, 2).astype(q.dtype),
            scale=attn.scale, is_causal=True, local_window_size=window,
            implementation="cudnn")

    return jax.lax.cond(jnp.all(inp.start == 0), fused, lambda _: xla(), None)
