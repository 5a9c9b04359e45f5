"""The scale search of the ``-mse`` quantize modes (:mod:`medgemma_core.quant`).

Each scale is ``max|w| / k``, with the ``k`` of :data:`SEARCH_K` that gives the least squared
error of its block (an output channel's weights, or a group of them) on the weights alone: no
calibration data. ``k = 127`` is ``max|w| / 127`` (tried first: a tie keeps it); ``k > 127``
clips the largest weights; ``k < 127`` leaves levels unused, so weights already on a coarser
grid (a dequantized GGUF file's) fall on it exactly. Runs jitted, in chunks of about
:data:`SEARCH_ELEMENTS` weights (one compiled shape per block size).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["SEARCH_ELEMENTS", "SEARCH_K", "block_k", "search_scales"]

SEARCH_K = (127, *range(126, 63, -1), *range(128, 161, 2))
SEARCH_ELEMENTS = 1 << 22  # weights per searched chunk


def block_k(grouped: np.ndarray, axis, shape) -> np.ndarray:
    """The searched ``k`` of every block of ``grouped`` (the weights reduced over ``axis``, an
    int or a tuple), in the scale's keepdims ``shape``."""
    return _blocks_back(search_scales(_blocks(grouped, axis)), shape, axis)


def _blocks(grouped: np.ndarray, axis) -> np.ndarray:
    """``grouped`` as ``[blocks, weights of a block]`` (the reduced ``axis`` last)."""
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    rest = [a for a in range(grouped.ndim) if a not in axes]
    moved = np.transpose(grouped, (*rest, *axes))
    return moved.reshape(-1, math.prod(grouped.shape[a] for a in axes))


def _blocks_back(k: np.ndarray, shape, axis) -> np.ndarray:
    """Per-block ``k`` ([blocks]) in the scale's keepdims ``shape``."""
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    rest = [a for a in range(len(shape)) if a not in axes]
    out = k.reshape([shape[a] for a in rest])
    return np.expand_dims(out, axes) if axes else out


def search_scales(blocks: np.ndarray) -> np.ndarray:
    """For each row of ``blocks`` ([n, size] float32), the ``k`` in :data:`SEARCH_K` (float32)
    whose ``scale = max|w| / k`` gives the least ``sum((w - scale * q)^2)``, ``q = clip(round(w
    / scale), -127, 127)``: weights alone, no calibration data. The first such k on a tie."""
    blocks = np.ascontiguousarray(blocks, np.float32)
    n, size = blocks.shape
    rows = max(1, SEARCH_ELEMENTS // size)
    rows = min(rows, 1 << max(n - 1, 0).bit_length())  # small tensors: a power of two
    out = np.empty(n, np.float32)
    for i in range(0, n, rows):
        part = blocks[i:i + rows]
        if part.shape[0] < rows:  # one compiled shape: pad the last chunk with zero blocks
            part = np.concatenate([part, np.zeros((rows - part.shape[0], size), np.float32)])
        out[i:i + rows] = np.asarray(_search(part))[:min(rows, n - i)]
    return out


@jax.jit
def _search(blocks):
    amax = jnp.max(jnp.abs(blocks), axis=1, keepdims=True)
    amax = jnp.where(amax > 0, amax, 1.0)
    ks = jnp.asarray(SEARCH_K, jnp.float32)

    def err(k):
        s = amax / k
        return jnp.sum(jnp.square(blocks - s * jnp.clip(jnp.round(blocks / s), -127, 127)), 1)

    def body(i, carry):
        best_k, best_e = carry
        e = err(ks[i])
        better = e < best_e
        return jnp.where(better, ks[i], best_k), jnp.where(better, e, best_e)

    first = (jnp.full(blocks.shape[:1], ks[0]), err(ks[0]))
    return jax.lax.fori_loop(1, len(SEARCH_K), body, first)[0]
