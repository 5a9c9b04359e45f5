"""The LoRA adapter's own backward pass and dropout mask, against plain JAX."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import medsiglip.lora
from medsiglip.lora import LoRA, LoRAConfig, project


def _adapter(n_in: int, shape: tuple[int, ...], dropout: float = 0.0) -> LoRA:
    kernel = nnx.Param(jnp.zeros(shape, jnp.float32))
    lora = LoRA(kernel, n_in, LoRAConfig(rank=3, alpha=6, dropout=dropout), rngs=nnx.Rngs(0))
    lora.b[...] = jax.random.normal(jax.random.key(1), lora.b.shape)
    return lora


@pytest.mark.parametrize("n_in,shape,x_shape", [
    (1, (6, 5), (2, 4, 6)),          # [D, out] kernel, batch and sequence axes
    (1, (6, 2, 3), (7, 6)),          # [D, heads, head_dim] kernel, one token axis
    (2, (2, 3, 5), (2, 4, 2, 3)),    # Gemma's o [H, Hd, D]: two input axes
])
def test_custom_backward_equals_autodiff_of_the_plain_product(n_in, shape, x_shape):
    lora = _adapter(n_in, shape)
    x = jax.random.normal(jax.random.key(2), x_shape)
    w = jax.random.normal(jax.random.key(3), (*x_shape[:len(x_shape) - n_in], *shape[n_in:]))
    a0, b0 = lora.a[...], lora.b[...]

    def plain(x, a, b):  # dropout(x) @ a @ b * alpha / r, written out
        lead = x.shape[:x.ndim - n_in]
        h = x.reshape(*lead, -1) @ a.reshape(-1, 3)
        return jnp.sum(w * (h @ b.reshape(3, -1) * 2.0).reshape(w.shape))

    graphdef, params, rest = nnx.split(lora, nnx.LoRAParam, ...)

    def ours(x, params):
        return jnp.sum(w * nnx.merge(graphdef, params, rest)(x))

    np.testing.assert_allclose(ours(x, params), plain(x, a0, b0), rtol=1e-6)
    gx, gp = jax.grad(ours, (0, 1))(x, params)
    rx, ra, rb = jax.grad(plain, (0, 1, 2))(x, a0, b0)
    for got, ref in ((gx, rx), (gp["a"][...], ra), (gp["b"][...], rb)):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)

class _Host(nnx.Module):
    """A module with one adapted projection ``k`` (as Gemma's attention and MLP hold them)."""

    def __init__(self, n_in: int, shape: tuple[int, ...], dropout: float = 0.0):
        self.k = nnx.Param(jax.random.normal(jax.random.key(4), shape))
        self.lora = nnx.Dict({"k": _adapter(n_in, shape, dropout)})


@pytest.mark.parametrize("n_in,shape,x_shape", [
    (1, (6, 5), (2, 4, 6)),
    (1, (6, 2, 3), (7, 6)),
    (2, (2, 3, 5), (2, 4, 2, 3)),
])
def test_merged_product_equals_autodiff_of_base_plus_adapter(n_in, shape, x_shape,
                                                            monkeypatch):
    """``project`` puts a dropout-free adapter into the base product (x @ (W + a b s)); its
    value and gradients (x, a, b, and W when W trains) equal autodiff of x @ W + x @ a @ b * s
    written out."""
    monkeypatch.setattr(medsiglip.lora, "MERGE_ROWS", 1)  # these few rows merge too
    calls = []
    merged = medsiglip.lora._merged
    monkeypatch.setattr(medsiglip.lora, "_merged", lambda *a: calls.append(1) or merged(*a))
    host = _Host(n_in, shape)
    x = jax.random.normal(jax.random.key(2), x_shape)
    lead = x_shape[:len(x_shape) - n_in]
    c = jax.random.normal(jax.random.key(3), (*lead, *shape[n_in:]))
    k = int(np.prod(shape[:n_in]))

    def base(x, w):
        return (x.reshape(*lead, k) @ w.reshape(k, -1)).reshape(*lead, *shape[n_in:])

    def plain(x, w, a, b):
        h = x.reshape(*lead, k) @ a.reshape(k, 3)
        return jnp.sum(c * (base(x, w) + (h @ b.reshape(3, -1) * 2.0).reshape(c.shape)))

    graphdef, params, rest = nnx.split(host, nnx.Param, ...)

    def ours(x, params):
        m = nnx.merge(graphdef, params, rest)
        return jnp.sum(c * project(m, "k", x, m.k[...], n_in, base))

    w0, a0, b0 = host.k[...], host.lora["k"].a[...], host.lora["k"].b[...]
    np.testing.assert_allclose(ours(x, params), plain(x, w0, a0, b0), rtol=1e-5)
    gx, gp = jax.grad(ours, (0, 1))(x, params)
    refs = jax.grad(plain, (0, 1, 2, 3))(x, w0, a0, b0)
    got = (gx, gp["k"][...], gp["lora"]["k"]["a"][...], gp["lora"]["k"]["b"][...])
    for g, r in zip(got, refs, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)
    # with the kernel frozen (LoRA), no kernel gradient is computed: one product fewer
    lora_only = nnx.split(host, nnx.LoRAParam, ...)
    frozen = jax.make_jaxpr(jax.grad(lambda p: jnp.sum(c * project(
        nnx.merge(lora_only[0], p, lora_only[2]), "k", x, w0, n_in, base))))(lora_only[1])
    full = jax.make_jaxpr(jax.grad(ours, 1))(x, params)
    assert str(full).count("dot_general[") == str(frozen).count("dot_general[") + 1
    assert calls  # the merged product was used


def test_merged_product_only_without_active_dropout(monkeypatch):
    """In training mode with dropout the adapter's input differs from the base's: the
    product stays split (base + adapter on the dropped-out input)."""
    monkeypatch.setattr(medsiglip.lora, "MERGE_ROWS", 1)
    host = _Host(1, (6, 5), dropout=0.5)
    host.lora["k"].dropout.deterministic = False
    x = jnp.ones((8, 6))
    y = np.asarray(project(host, "k", x, host.k[...], 1, lambda x, w: x @ w))
    base = np.asarray(x @ host.k[...])
    h = np.asarray(host.lora["k"].a[...])
    full = base + (np.ones((8, 6)) @ h) @ np.asarray(host.lora["k"].b[...]) * 2.0
    assert not np.allclose(y, full, atol=1e-4)  # dropped-out inputs changed the adapter part
    host.lora["k"].dropout.deterministic = True
    y = np.asarray(project(host, "k", x, host.k[...], 1, lambda x, w: x @ w))
    np.testing.assert_allclose(y, full, rtol=1e-5, atol=1e-5)


def test_dropout_mask_keeps_the_asked_share_and_the_mean():
    lora = _adapter(1, (512, 4), dropout=0.25)
    lora.dropout.deterministic = False
    x = jnp.ones((64, 512))
    y = lora.dropout(x)
    kept = np.asarray(y != 0)
    assert abs(kept.mean() - 0.75) < 0.01            # 32,768 draws: sd 0.0024
    np.testing.assert_allclose(np.asarray(y)[kept], 4 / 3, rtol=1e-6)  # 1 / (1 - rate)
    assert abs(float(y.mean()) - 1.0) < 0.02
    assert not np.array_equal(kept, np.asarray(lora.dropout(x) != 0))  # a new mask per call
    # rows and columns get independent masks (no repeated pattern from the bit packing)
    assert not np.array_equal(kept[:, 0::2], kept[:, 1::2])
    assert abs(np.corrcoef(kept[:, 0::2].ravel(), kept[:, 1::2].ravel())[0, 1]) < 0.03


def test_dropout_off_in_eval_and_odd_widths_fall_back():
    lora = _adapter(1, (5, 4), dropout=0.5)
    x = jnp.ones((3, 5))
    assert np.array_equal(np.asarray(lora.dropout(x)), np.asarray(x))  # deterministic
    lora.dropout.deterministic = False
    y = np.asarray(lora.dropout(jnp.ones((200, 5))))  # odd width: nnx.Dropout's own mask
    assert set(np.unique(y)) <= {0.0, 2.0} and 0.4 < (y != 0).mean() < 0.6
