"""Long sequences against transformers: the banded sliding-window path, the blocked
online-softmax path (global layers, image blocks), left padding, cached chunks, gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from medgemma_core import Gemma3Config, load_decoder
from medgemma_core import attention as attention_mod
from medgemma_core.checkpoints.multimodal import load_multimodal
from medgemma_core.checkpoints.names import text_specs
from medgemma_core.multimodal import image_blocks
from medgemma_core.testing import MM_TOKENS, save_tiny_causal_lm, save_tiny_mm
from medgemma_core.training import TrainBatch, next_token_loss
from medgemma_core.transformer import KVCache

# 7 layers (5 local, 1 global, 1 local); a window of 128 keys
LONG_CFG = dict(sliding_window=128, max_position_embeddings=16_384, vocab_size=512)


@pytest.fixture(scope="module")
def long_text(tmp_path_factory):
    folder = tmp_path_factory.mktemp("long_text")
    ref = save_tiny_causal_lm(folder, Gemma3Config.tiny(**LONG_CFG))
    return load_decoder(folder), ref


@pytest.fixture(scope="module")
def tiny_mm(tmp_path_factory):
    folder = tmp_path_factory.mktemp("long_mm")
    ref = save_tiny_mm(folder)
    return load_multimodal(folder), ref


def _ref_logits(ref, ids):
    with torch.no_grad():
        return ref(input_ids=torch.tensor(ids)).logits.float().numpy()


def _close(got, want, tol=1e-4):
    np.testing.assert_allclose(np.asarray(got), want, atol=tol, rtol=tol)


def _text_parity(model, ref, t, pad):
    """Row 0: t tokens; row 1: the same minus its first ``pad``, left-padded by ``pad``."""
    rng = np.random.default_rng(t)
    ids = rng.integers(3, model.config.vocab_size, size=(1, t))
    want = _ref_logits(ref, ids)[0]
    batch = np.concatenate([ids, ids], 0)
    batch[1, :pad] = 0
    start = np.array([0, pad])
    got, _ = jax.jit(lambda m, x, s: m(x, start=s))(model, batch, start)
    _close(got[0], want)
    _close(got[1, pad:], _ref_logits(ref, ids[:, pad:])[0])


def test_text_logits_match_at_2048_tokens(long_text):
    _text_parity(*long_text, 2048, 300)


@pytest.mark.slow
def test_text_logits_match_at_8192_tokens(long_text):
    _text_parity(*long_text, 8192, 1000)


@pytest.mark.slow
def test_cached_chunks_match_one_pass(long_text):
    """Two cached chunks (the second sees a full ring of the first) of a left-padded batch,
    as the engine's prefill runs them, equal transformers on the unpadded rows."""
    _chunk_parity(*long_text, 1700, 1100, 77)


def _chunk_parity(model, ref, t, first, pad):
    cfg = model.config
    rng = np.random.default_rng(5)
    ids = rng.integers(3, cfg.vocab_size, size=(1, t))
    batch = np.concatenate([ids, ids], 0)
    batch[1, :pad] = 0
    start = jnp.asarray([0, pad])
    cache = KVCache.create(cfg, 2, t + 20, start)
    step = jax.jit(lambda m, x, c: m(x, cache=c))
    a, cache = step(model, batch[:, :first], cache)
    b, cache = step(model, batch[:, first:], cache)
    got = np.concatenate([np.asarray(a), np.asarray(b)], 1)
    _close(got[0], _ref_logits(ref, ids)[0])
    _close(got[1, pad:], _ref_logits(ref, ids[:, pad:])[0])


def _mm_inputs(cfg, t, n_images, seed):
    """Token ids of length t with n_images image blocks spread over it, and pixels."""
    rng = np.random.default_rng(seed)
    ids = list(rng.integers(10, 5000, t))
    for i in range(n_images):
        at = 40 + i * (t - 80) // n_images
        ids[at:at + MM_TOKENS + 2] = ([cfg.boi_token_id] + [cfg.image_token_id] * MM_TOKENS
                                      + [cfg.eoi_token_id])
    s = cfg.vision.image_size
    pixels = rng.uniform(-1, 1, (n_images, s, s, 3)).astype(np.float32)
    return np.asarray(ids[:t], np.int64), pixels


def _mm_parity(model, ref, t, n_images):
    """Final hidden states (the logits would be [T, 262208]) with several image blocks; the
    window of 8 cuts each block of 16."""
    cfg = model.config
    ids, pixels = _mm_inputs(cfg, t, n_images, t)
    with torch.no_grad():
        want = ref.model(input_ids=torch.tensor(ids)[None],
                         pixel_values=torch.tensor(pixels).permute(0, 3, 1, 2),
                         token_type_ids=torch.tensor(ids == cfg.image_token_id)[None].long())
    want = want.last_hidden_state[0].float().numpy()

    @jax.jit
    def hidden(m, x, px):
        h, _ = m.decoder(x, embeddings=m.embed(x, m.encode_images(px)),
                         image_id=image_blocks(x, cfg.image_token_id), logits_at="none")
        return h

    got = hidden(model, jnp.asarray(ids)[None], pixels)[0]
    _close(got, want)


def test_image_text_matches_at_2048_tokens(tiny_mm):
    _mm_parity(*tiny_mm, 2048, 5)


@pytest.mark.slow
def test_image_text_matches_at_8192_tokens(tiny_mm):
    _mm_parity(*tiny_mm, 8192, 12)


def test_gradients_match_transformers_at_1024_tokens(long_text):
    model, ref = long_text
    cfg = model.config
    rng = np.random.default_rng(3)
    tokens = rng.integers(3, cfg.vocab_size, (1, 1024)).astype(np.int32)
    labels = np.where(rng.random(tokens.shape) < 0.1, -100, tokens).astype(np.int32)
    batch = TrainBatch(tokens, labels, np.ones_like(tokens))
    ref.train().zero_grad()
    out = ref(input_ids=torch.tensor(tokens).long(), labels=torch.tensor(labels).long())
    out.loss.backward()
    want = {n: p.grad.double().numpy() for n, p in ref.named_parameters()}
    ref.eval()

    def mean(m):
        total, n = next_token_loss(m, batch, chunk=256)
        return total / n

    loss, grads = nnx.jit(nnx.value_and_grad(mean))(model)
    assert abs(float(loss) - float(out.loss.detach())) < 1e-5
    ours = {tuple(p): np.asarray(v.get_value() if hasattr(v, "get_value") else v.value)
            for p, v in nnx.to_flat_state(grads)}
    checked = 0
    for s in text_specs(cfg, "model."):
        if s.name.endswith("k_proj.bias") or s.name not in want:
            continue
        w = np.asarray(s.convert(want[s.name]))
        scale = np.max(np.abs(w))
        assert scale > 0, s.name
        err = np.max(np.abs(ours[tuple(s.path)] - w)) / scale
        assert err < 1e-4, (s.name, err)
        checked += 1
    assert checked >= 7 * 4  # every layer's attention projections at least


def test_small_blocks_cover_padding_and_images(long_text, tiny_mm, monkeypatch):
    """With blocks of 16 the short parity cases run through every blocked path."""
    for name in ("QUERY_BLOCK", "LOCAL_BLOCK", "FLASH_BLOCK"):
        monkeypatch.setattr(attention_mod, name, 16)
    _text_parity(*long_text, 300, 37)
    _mm_parity(*tiny_mm, 300, 3)
    _chunk_parity(*long_text, 300, 170, 29)
