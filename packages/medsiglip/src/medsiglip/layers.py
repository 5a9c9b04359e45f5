"""Transformer building blocks shared by both towers (Flax NNX).

Shapes: ``B`` batch, ``T`` tokens, ``D`` hidden width, ``N`` heads, ``H = D // N``.
Parameters are stored in ``dtype`` and the computation runs in ``dtype``; LayerNorm statistics
are computed in float32 (Flax upcasts them).

Every parameter carries logical axis names (:mod:`medsiglip.sharding`): ``vision_embed`` for
the width D, ``vision_heads`` for the heads x head_dim side of q/k/v/out, ``vision_mlp`` for
the MLP width (both SigLIP towers use these names). Projections are :class:`Dense` modules
that can carry LoRA adapters (:mod:`medsiglip.lora`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from medsiglip.lora import adapt, flat_rows
from medsiglip.remat import run_blocks
from medsiglip.sharding import constrain, param

EMBED, HEADS, MLP_AXIS = "vision_embed", "vision_heads", "vision_mlp"
TOKENS = ("batch", "length", "act_embed")  # [B, T, D] activations


def gelu(x: jax.Array, hidden_act: str) -> jax.Array:
    """GELU as transformers names it: ``"gelu"`` is exact (erf), the others use tanh."""
    return jax.nn.gelu(x, approximate=hidden_act != "gelu")


def layer_norm(width: int, eps: float, dtype: jnp.dtype, rngs: nnx.Rngs,
               name: str = EMBED) -> nnx.LayerNorm:
    meta = {"out_sharding": (name,), "eager_sharding": False}
    return nnx.LayerNorm(width, epsilon=eps, dtype=dtype, param_dtype=dtype, rngs=rngs,
                         scale_metadata=meta, bias_metadata=meta)


class Dense(nnx.Module):
    """``x @ kernel + bias`` (``kernel [in, out]``, lecun-normal; ``bias [out]``, zeros) plus
    its LoRA adapter, if any. The input is cast to the kernel's dtype, as ``nnx.Linear``
    does; ``names``: the kernel's two logical axes."""

    lora_targets = {"kernel": 1}

    def __init__(self, d_in: int, d_out: int, names: tuple[str | None, str | None], *,
                 dtype: jnp.dtype, rngs: nnx.Rngs):
        init = nnx.initializers.lecun_normal()
        self.kernel = param(init(rngs.params(), (d_in, d_out), dtype), names)
        self.bias = param(nnx.initializers.zeros(rngs.params(), (d_out,), dtype), names[1:])
        self.lora = nnx.data(None)

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...]
        x = x.astype(kernel.dtype)
        if x.ndim > 2 and flat_rows():  # one 2-D product (see medsiglip.lora.flat_rows)
            y = (x.reshape(-1, x.shape[-1]) @ kernel).reshape(*x.shape[:-1], kernel.shape[-1])
        else:
            y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
        y = y + self.bias[...].astype(kernel.dtype)
        return adapt(self, "kernel", x, y)


def linear(d_in: int, d_out: int, dtype: jnp.dtype, rngs: nnx.Rngs,
           names: tuple[str | None, str | None] = (EMBED, EMBED)) -> Dense:
    return Dense(d_in, d_out, names, dtype=dtype, rngs=rngs)


#: ``implementation`` of ``jax.nn.dot_product_attention`` on accelerators: ``"auto"`` (cuDNN's
#: fused flash attention for bf16/f16 on NVIDIA GPUs when cuDNN takes the shapes, else XLA),
#: None (XLA) or ``"cudnn"``. Read at trace time. On an H100, the so400m-448 tower in bf16
#: runs 1.8x faster with cuDNN than with XLA's attention at batch 32 (benchmarks/siglip.py).
ACCELERATOR_ATTENTION: str | None = "auto"


def _accelerator_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    impl = ACCELERATOR_ATTENTION
    if impl == "auto":
        if jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16):
            try:  # cuDNN checks its version, the GPU and the shapes while tracing
                return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
            except (NotImplementedError, ValueError, RuntimeError):
                pass
        impl = None
    return jax.nn.dot_product_attention(q, k, v, implementation=impl)


def _softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """One head: ``[S, H] x [T, H] x [T, H] -> [S, H]``, scale ``H ** -0.5``, softmax in f32."""
    scores = (q * q.shape[-1] ** -0.5) @ k.T
    probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(v.dtype)
    return probs @ v


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Unmasked attention ``[B, S, N, H] x [B, T, N, H] x [B, T, N, H] -> [B, S, N, H]``.

    On accelerators this is ``jax.nn.dot_product_attention`` (XLA or cuDNN fused kernels).
    On the CPU, XLA's batched matmuls over ``[B, N]`` are poorly threaded and the full
    ``[B, N, S, T]`` score tensor does not stay in cache, so heads are processed one at a time
    (``lax.map``): about 3x faster there for 1024 tokens.
    """
    if jax.default_backend() != "cpu":
        return _accelerator_attention(q, k, v)
    if q.shape[1] == 1:
        return jax.nn.dot_product_attention(q, k, v)
    b, s, n, h = q.shape

    def heads(x: jax.Array) -> jax.Array:  # [B, T, N, H] -> [B * N, T, H]
        return x.transpose(0, 2, 1, 3).reshape(b * n, x.shape[1], h)

    out = jax.lax.map(lambda qkv: _softmax_attention(*qkv), (heads(q), heads(k), heads(v)))
    return out.reshape(b, n, s, h).transpose(0, 2, 1, 3)


class MLP(nnx.Module):
    """``fc2(gelu(fc1(x)))``: ``[..., D] -> [..., D]`` through ``[..., intermediate]``."""

    def __init__(self, hidden: int, intermediate: int, hidden_act: str, *,
                 dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
        self.fc1 = linear(hidden, intermediate, dtype, rngs, (EMBED, MLP_AXIS))
        self.fc2 = linear(intermediate, hidden, dtype, rngs, (MLP_AXIS, EMBED))
        self.hidden_act = hidden_act

    def __call__(self, x: jax.Array) -> jax.Array:
        h = gelu(self.fc1(x), self.hidden_act)
        return self.fc2(constrain(h, (*TOKENS[:-1], "act_mlp")[-h.ndim:]))


class Attention(nnx.Module):
    """Multi-head attention with biased q/k/v/out projections, scale ``H ** -0.5``, no mask.

    ``__call__(x)`` is self-attention ``[B, T, D] -> [B, T, D]``; ``__call__(q_in, kv_in)``
    attends ``[B, S, D]`` queries over ``[B, T, D]`` keys/values (the MAP head).
    """

    def __init__(self, hidden: int, num_heads: int, *, dtype: jnp.dtype = jnp.float32,
                 rngs: nnx.Rngs):
        self.num_heads = num_heads
        self.q_proj = linear(hidden, hidden, dtype, rngs, (EMBED, HEADS))
        self.k_proj = linear(hidden, hidden, dtype, rngs, (EMBED, HEADS))
        self.v_proj = linear(hidden, hidden, dtype, rngs, (EMBED, HEADS))
        self.out_proj = linear(hidden, hidden, dtype, rngs, (HEADS, EMBED))

    def _heads(self, x: jax.Array) -> jax.Array:
        b, t, d = x.shape
        x = x.reshape(b, t, self.num_heads, d // self.num_heads)
        return constrain(x, ("batch", "length", "act_heads", None))

    def __call__(self, x: jax.Array, kv: jax.Array | None = None) -> jax.Array:
        kv = x if kv is None else kv
        q = self._heads(self.q_proj(x))
        k = self._heads(self.k_proj(kv))
        v = self._heads(self.v_proj(kv))
        out = dot_product_attention(q, k, v)  # [B, S, N, H], scale H**-0.5
        b, s, n, h = out.shape
        return self.out_proj(out.reshape(b, s, n * h))


class EncoderBlock(nnx.Module):
    """Pre-LN block: ``x += attn(ln1(x)); x += mlp(ln2(x))``, ``[B, T, D] -> [B, T, D]``."""

    def __init__(self, hidden: int, intermediate: int, num_heads: int, eps: float,
                 hidden_act: str, *, dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
        self.layer_norm1 = layer_norm(hidden, eps, dtype, rngs)
        self.self_attn = Attention(hidden, num_heads, dtype=dtype, rngs=rngs)
        self.layer_norm2 = layer_norm(hidden, eps, dtype, rngs)
        self.mlp = MLP(hidden, intermediate, hidden_act, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = constrain(x, TOKENS)
        x = x + self.self_attn(self.layer_norm1(x))
        return constrain(x + self.mlp(self.layer_norm2(x)), TOKENS)


class Encoder(nnx.Module):
    """``num_layers`` :class:`EncoderBlock` s in sequence, ``[B, T, D] -> [B, T, D]``."""

    def __init__(self, num_layers: int, hidden: int, intermediate: int, num_heads: int,
                 eps: float, hidden_act: str, *, dtype: jnp.dtype = jnp.float32,
                 rngs: nnx.Rngs):
        self.layers = nnx.List([
            EncoderBlock(hidden, intermediate, num_heads, eps, hidden_act, dtype=dtype, rngs=rngs)
            for _ in range(num_layers)
        ])

    def __call__(self, x: jax.Array, *, remat: str = "none", scan: bool = False) -> jax.Array:
        """``remat``: the rematerialization policy of every block; ``scan``: run the blocks as
        one ``lax.scan`` (:func:`medsiglip.remat.run_blocks`)."""
        return run_blocks(self.layers, x, _run_block, remat=remat, scan=scan)


def _run_block(block: EncoderBlock, x: jax.Array) -> jax.Array:
    return block(x)
