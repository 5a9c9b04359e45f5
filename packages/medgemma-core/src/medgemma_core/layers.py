"""Gemma 3 building blocks: RMSNorm(1 + w), rotary embeddings, the GeGLU feed-forward.

Parameters carry logical axis names (:mod:`medsiglip.sharding`): ``embed`` (D), ``mlp`` (F),
``vocab``, ``q_heads``, ``kv_heads``, ``head_dim``; projections can carry LoRA adapters
(:mod:`medsiglip.lora`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from medsiglip.lora import flat_rows, project
from medsiglip.sharding import constrain, param

from . import quant


class RMSNorm(nnx.Module):
    """``y = x * rsqrt(mean(x^2) + eps) * (1 + w)``, computed in float32, cast back to x's dtype.

    The scale is stored as Hugging Face stores it (zero-centred: 0 means identity).
    """

    def __init__(self, dim: int, *, eps: float = 1e-6, dtype=jnp.float32, name: str = "embed"):
        self.scale = param(jnp.zeros((dim,), dtype), (name,))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(xf), axis=-1, keepdims=True)
        y = xf * jax.lax.rsqrt(var + self.eps)
        return (y * (1.0 + self.scale[...].astype(jnp.float32))).astype(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: float = 1.0) -> jax.Array:
    """Inverse frequencies [head_dim // 2] in float32; linear scaling divides them."""
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    return 1.0 / (theta**exponents) / scaling


def rope_tables(positions: jax.Array, inv_freq: jax.Array,
                dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
    """``(cos, sin)`` [B, T, 1, H] in ``dtype`` for :func:`apply_rope`, from positions [B, T]
    (``sin``'s first half negated: rotate-half's sign). Computed once per forward pass and RoPE
    base and shared by every layer of that base: on the CPU behind an optimization barrier,
    without which XLA fuses the cos/sin back into every layer's consumers (recomputing them)."""
    angles = positions.astype(jnp.float32)[..., None, None] * inv_freq  # [B, T, 1, H/2]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    cos = jnp.concatenate([cos, cos], axis=-1).astype(dtype)
    sin = jnp.concatenate([-sin, sin], axis=-1).astype(dtype)
    if jax.default_backend() == "cpu":
        cos, sin = jax.lax.optimization_barrier((cos, sin))
    return cos, sin


def apply_rope(x: jax.Array, rope: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Rotate-half (NeoX) RoPE. x [B, T, N, H]; ``rope``: :func:`rope_tables`."""
    cos, sin = (r.astype(x.dtype) for r in rope)
    # the halves swapped by a reverse over an axis of 2 (fuses into the consumer on the CPU;
    # a concatenate of two slices is materialized there)
    swapped = jax.lax.rev(x.reshape(*x.shape[:-1], 2, x.shape[-1] // 2), (x.ndim - 1,))
    return x * cos + swapped.reshape(x.shape) * sin


class FeedForward(nnx.Module):
    """GeGLU: down(gelu_tanh(x @ gate) * (x @ up)). Kernels stored [in, out]."""

    lora_targets = {"gate": 1, "up": 1, "down": 1}

    def __init__(self, dim: int, hidden: int, *, dtype, rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.02)
        self.gate = param(init(rngs.params(), (dim, hidden), dtype), ("embed", "mlp"))
        self.up = param(init(rngs.params(), (dim, hidden), dtype), ("embed", "mlp"))
        self.down = param(init(rngs.params(), (hidden, dim), dtype), ("mlp", "embed"))
        self.lora = nnx.data(None)

    def __call__(self, x: jax.Array) -> jax.Array:
        names = ("batch", "length", "act_mlp")[-x.ndim:]
        gate = project(self, "gate", x, self.gate[...], 1, matmul)
        gate = constrain(jax.nn.gelu(gate, approximate=True), names)
        h = gate * constrain(project(self, "up", x, self.up[...], 1, matmul), names)
        return project(self, "down", h, self.down[...], 1, matmul)


def matmul(x: jax.Array, w: jax.Array, spec: str = "...d,df->...f") -> jax.Array:
    """``einsum(spec, x, w)`` accumulated in float32 and cast back to x's dtype.

    On CPUs XLA computes bf16 products in float32 by converting both operands. Asking for a
    float32 result avoids a second conversion of the output, and :func:`pin_to` ties each
    weight to its activation so that the float32 copy of the weight is made just before its
    product and freed after it: otherwise XLA hoists the conversions of every weight out of
    the decode loop and holds float32 copies of the whole model (2x its size) for the loop.
    An int8 weight (:class:`~medgemma_core.quant.QArray`) goes to :func:`quant.dot`."""
    if isinstance(w, quant.QArray):
        return quant.dot(x, w, spec)
    x, w = pin_to(x, w)
    n_in = _CONTRACTED.get(spec)
    if n_in is not None and x.ndim > n_in + 1 and flat_rows():
        return flat_matmul(x, w, n_in)
    return jnp.einsum(spec, x, w, preferred_element_type=jnp.float32).astype(x.dtype)


#: The specs :func:`matmul` takes whose kernel's first n axes are contracted with x's last n.
_CONTRACTED = {"...d,df->...f": 1, "btd,dhk->bthk": 1, "bthk,hkd->btd": 2, "bhk,hkd->bd": 2}

def flat_matmul(x: jax.Array, w: jax.Array, n_in: int) -> jax.Array:
    """``x [..., *K]`` times ``w [*K, *N]`` (the last ``n_in`` axes of x with the first of w) as
    one 2-D product ``[rows, K] x [K, N]`` (f32 accumulation, x's dtype), on CPUs
    (:func:`medsiglip.lora.flat_rows`). The same sums as the einsum; but the weight gradient
    autodiff makes of a product with several leading axes contracts two axes, which XLA on
    CPUs runs by copying the activation gradient into a transposed layout first (an
    elementwise copy per weight gradient: 13% of a 270M full-fine-tuning step's op time); of
    the 2-D product it is a plain GEMM (a GeGLU block's forward and backward at [4, 256, 640]:
    403 -> 247 CPU ms)."""
    lead, size = x.shape[:x.ndim - n_in], math.prod(x.shape[x.ndim - n_in:])
    y = jnp.dot(x.reshape(-1, size), w.reshape(size, -1), preferred_element_type=jnp.float32)
    return y.reshape(*lead, *w.shape[n_in:]).astype(x.dtype)


def pin_to(x: jax.Array, w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(x, w)`` unchanged, except that on the CPU a low-precision ``w`` cannot be read (nor
    converted) before ``x`` is computed (an optimization barrier). A no-op elsewhere and in
    float32, where no conversion happens."""
    if w.dtype == jnp.float32 or jax.default_backend() != "cpu":
        return x, w
    return jax.lax.optimization_barrier((x, w))


def vocab_projection(h: jax.Array, table: jax.Array, chunk_bytes: int = 64 << 20) -> jax.Array:
    """Logits ``[..., V]`` in float32 from hidden states ``[..., D]`` and the (tied) embedding
    table ``[V, D]``.

    On the CPU a low-precision table is projected in vocabulary chunks of about
    ``chunk_bytes`` (as float32), each converted just before its product: one product over
    the whole table would hold a float32 copy of it (2.7 GB for the 4B model). An int8 table
    goes to :func:`quant.logits`."""
    if isinstance(table, quant.QArray):
        return quant.logits(h, table)
    v, d = table.shape
    n = 1
    if table.dtype != jnp.float32 and jax.default_backend() == "cpu":
        want = -(-v * d * 4 // chunk_bytes)
        n = next(k for k in range(max(want, 1), v + 1) if v % k == 0)
    if n == 1:
        return jnp.einsum("...d,vd->...v", h, table, preferred_element_type=jnp.float32)
    chunks = table.reshape(n, v // n, d)

    def one(w: jax.Array) -> jax.Array:
        x, w = pin_to(h, w)
        return jnp.einsum("...d,vd->...v", x, w, preferred_element_type=jnp.float32)

    out = jax.lax.map(one, chunks)  # [n, ..., V/n]
    return jnp.moveaxis(out, 0, -2).reshape(*h.shape[:-1], v)
