"""The sigmoid pairwise loss: a direct numpy reference, transformers, chunked == unchunked."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import jit_call, nchw, pixels

import medsiglip
from medsiglip import chunked_sigmoid_loss, sigmoid_loss


def _embeds(b: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a, t = rng.normal(size=(b, d)), rng.normal(size=(b, d))
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    return a.astype(np.float32), t.astype(np.float32)


def _reference(img: np.ndarray, txt: np.ndarray, t: float, b: float) -> float:
    """Written out pair by pair: -sum_ij log sigmoid(y_ij z_ij) / B."""
    n = len(img)
    total = 0.0
    for i in range(n):
        for j in range(n):
            z = float(img[i].astype(np.float64) @ txt[j]) * np.exp(t) + b
            y = 1.0 if i == j else -1.0
            total += np.log1p(np.exp(-y * z))
    return total / n


def test_matches_pairwise_reference():
    img, txt = _embeds(6, 8, 0)
    got = sigmoid_loss(jnp.asarray(img), jnp.asarray(txt), jnp.log(10.0), -10.0)
    assert float(got) == pytest.approx(_reference(img, txt, np.log(10.0), -10.0), rel=1e-5)


def test_matches_transformers_return_loss(hf_siglip_dir, hf_siglip):
    model = medsiglip.load_siglip(hf_siglip_dir)
    x = pixels(4, 32, seed=3)
    ids = np.random.default_rng(0).integers(0, 90, (4, 16))
    with torch.no_grad():
        ref = hf_siglip(input_ids=torch.from_numpy(ids), pixel_values=nchw(x), return_loss=True)
    out = jit_call(model, "__call__", x, ids)
    got = sigmoid_loss(out.image_embeds, out.text_embeds, model.logit_scale[...][0],
                       model.logit_bias[...][0])
    assert float(got) == pytest.approx(float(ref.loss), rel=1e-4)


@pytest.mark.parametrize("chunk", [1, 4, 16])
def test_chunked_equals_unchunked_with_gradients(chunk):
    img, txt = _embeds(16, 8, 1)
    args = (jnp.asarray(img), jnp.asarray(txt), jnp.asarray(1.7), jnp.asarray(-3.0))
    full, g_full = jax.value_and_grad(sigmoid_loss, argnums=(0, 1, 2, 3))(*args)

    def chunked(*a):
        return chunked_sigmoid_loss(*a, chunk_size=chunk)

    part, g_part = jax.value_and_grad(chunked, argnums=(0, 1, 2, 3))(*args)
    assert abs(float(full) - float(part)) < 1e-5 * max(1.0, abs(float(full)))
    for a, b in zip(g_full, g_part):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_chunked_never_builds_the_full_matrix():
    """No [B, B] intermediate appears in the compiled program."""
    b, d, c = 64, 8, 8
    img, txt = _embeds(b, d, 2)
    fn = jax.jit(jax.grad(lambda i, t: chunked_sigmoid_loss(i, t, 1.0, 0.0, chunk_size=c)))
    hlo = fn.lower(jnp.asarray(img), jnp.asarray(txt)).as_text()
    assert f"{b}x{b}x" not in hlo
    full = jax.jit(jax.grad(lambda i, t: sigmoid_loss(i, t, 1.0, 0.0)))
    assert f"{b}x{b}x" in full.lower(jnp.asarray(img), jnp.asarray(txt)).as_text()


def test_chunk_must_divide_batch():
    img, txt = _embeds(6, 4, 3)
    with pytest.raises(ValueError, match="multiple of chunk_size"):
        chunked_sigmoid_loss(jnp.asarray(img), jnp.asarray(txt), 1.0, 0.0, chunk_size=4)
