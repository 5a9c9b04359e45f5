"""Packed text rows (segment ids): one packed batch gives the summed loss, the token count,
every parameter's gradient and each row's logits of transformers' Gemma3ForCausalLM run on
each row alone (the independent reference), through the dense, banded and blocked flash
paths."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from medgemma_core import Gemma3Config, load_decoder
from medgemma_core import attention as attention_mod
from medgemma_core.checkpoints.names import text_specs
from medgemma_core.testing import save_tiny_causal_lm
from medgemma_core.training import (
    IGNORE_INDEX,
    TrainBatch,
    naive_next_token_loss,
    next_token_loss,
    pack_rows,
)
from medgemma_core.transformer import KVCache

PAD = 0
LOCAL, GLOBAL = "sliding_attention", "full_attention"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A tiny config of 3 layers (local, global, local; window 8: few layers compile fast) and
    transformers' model."""
    folder = tmp_path_factory.mktemp("packing")
    cfg = Gemma3Config.tiny(num_layers=3, layer_types=(LOCAL, GLOBAL, LOCAL))
    ref = save_tiny_causal_lm(folder, cfg, seed=3)
    return load_decoder(folder), ref


def _rows(lengths, seed):
    """(input_ids, labels) rows; labels -100 on a 'prompt' of the first third of each row."""
    rng = np.random.default_rng(seed)
    rows = []
    for n in lengths:
        ids = rng.integers(3, 512, n)
        labels = ids.copy()
        labels[: n // 3] = IGNORE_INDEX
        rows.append((ids.tolist(), labels.tolist()))
    return rows


def _packed(rows, seq_len):
    ids, labels, mask, seg = pack_rows(rows, seq_len, PAD)
    return TrainBatch(ids, labels, mask, segment_ids=seg), seg


def _ref_logits(ref, ids):
    with torch.no_grad():
        return ref(input_ids=torch.tensor([ids])).logits[0].float().numpy()


def _flat(grads):
    return {tuple(p): np.asarray(v.get_value() if hasattr(v, "get_value") else v.value)
            for p, v in nnx.to_flat_state(grads)}


def _ref_rows(ref, rows, grads: bool):
    """transformers on each row alone: the summed loss, the token count and (``grads``) the
    summed gradients by parameter name."""
    total, count = 0.0, 0
    ref.zero_grad()
    for ids, labels in rows:
        n = sum(x >= 0 for x in labels[1:])
        with torch.set_grad_enabled(grads):
            out = ref(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]))
            loss = out.loss * n
        if grads:
            loss.backward()
        total, count = total + float(loss.detach()), count + n
    want = {k: p.grad.double().numpy() for k, p in ref.named_parameters()} if grads else None
    ref.zero_grad()
    return total, count, want


def _check_packed(model, ref, rows, seq_len, grads: bool, **kw):
    """The packed batch's losses (chunked, and naive when no gradients are asked), its token
    count, its gradients (``grads``) and every row's logits against transformers run on each
    row alone."""
    packed, seg = _packed(rows, seq_len)
    assert packed.tokens.shape[0] < len(rows)  # some rows really share a sequence
    want, n_tokens, want_grads = _ref_rows(ref, rows, grads)
    # the first token of each row is never predicted (neither from another row)
    assert n_tokens == sum(sum(x >= 0 for x in lab[1:]) for _, lab in rows)
    if grads:
        fn = nnx.jit(nnx.value_and_grad(
            lambda m, b: next_token_loss(m, b, chunk=16, **kw), has_aux=True))
        (got, count), g = fn(model, packed)
        ours = _flat(g)
        checked = 0
        for s in text_specs(model.config, "model."):
            if s.name not in want_grads:
                continue
            w = np.asarray(s.convert(want_grads[s.name]))
            scale = np.max(np.abs(w))
            assert scale > 0, s.name
            err = np.max(np.abs(ours[tuple(s.path)] - w)) / scale
            assert err < 1e-4, (s.name, err)
            checked += 1
        assert checked == len(ours) == 2 + 13 * model.config.num_layers  # every parameter
        np.testing.assert_allclose(float(got), want, rtol=1e-5)
        assert int(count) == n_tokens

    @jax.jit
    def forward(m, b):
        losses = (next_token_loss(m, b, chunk=16), None if grads else naive_next_token_loss(m, b))
        return m(b.tokens, segment_ids=b.segment_ids)[0], losses

    logits, losses = forward(model, packed)
    for got, count in filter(None, losses):
        np.testing.assert_allclose(float(got), want, rtol=1e-5)
        assert int(count) == n_tokens
    logits = np.asarray(logits)
    where = {tuple(ids): i for i, (ids, _) in enumerate(rows)}
    seen = []
    for r in range(seg.shape[0]):
        for s in range(1, seg[r].max() + 1):
            at = np.flatnonzero(seg[r] == s)
            row = packed.tokens[r, at].tolist()
            seen.append(where[tuple(row)])
            np.testing.assert_allclose(logits[r, at], _ref_logits(ref, row), atol=1e-4,
                                       rtol=1e-4)
    assert sorted(seen) == list(range(len(rows)))


def test_packed_dense_path_equals_rows_alone(pair):
    """Loss, count and every gradient; segments longer than the window of 8 (the window
    counts within a segment)."""
    _check_packed(*pair, _rows([5, 13, 9, 20, 3, 17, 11], 0), 32, grads=True)


def _small_blocks(monkeypatch):
    for name in ("QUERY_BLOCK", "LOCAL_BLOCK", "FLASH_BLOCK"):
        monkeypatch.setattr(attention_mod, name, 16)


LONG_ROWS = [21, 30, 7, 40, 12, 50, 9, 19]


def test_packed_banded_and_flash_paths_equal_rows_alone(pair, monkeypatch):
    """64 tokens with blocks of 16: local layers take the band, the global one the blocked
    online softmax (segments cross block boundaries and whole block pairs are skipped)."""
    _small_blocks(monkeypatch)
    _check_packed(*pair, _rows(LONG_ROWS, 1), 64, grads=False)


@pytest.mark.slow
def test_packed_banded_and_flash_gradients_equal_rows_alone(pair, monkeypatch):
    """The same through the backward pass, with remat and the scanned layers of training."""
    _small_blocks(monkeypatch)
    _check_packed(*pair, _rows(LONG_ROWS, 1), 64, grads=True, remat="full", scan=True)


def test_positions_restart_at_each_segment(pair):
    """[a] and [b] packed: b gets the logits of b alone (transformers), not those of b
    after a (which is what the same tokens give without segment ids)."""
    model, ref = pair
    (a, _), (b, _) = _rows([10, 12], 2)
    tokens = np.array([a + b], np.int32)
    seg = np.array([[1] * 10 + [2] * 12], np.int32)
    fwd = jax.jit(lambda m, x, s: m(x, segment_ids=s)[0])
    got = np.asarray(fwd(model, tokens, seg))[0]
    np.testing.assert_allclose(got[10:], _ref_logits(ref, b), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(got[:10], _ref_logits(ref, a), atol=1e-4, rtol=1e-4)
    plain = np.asarray(jax.jit(lambda m, x: m(x)[0])(model, tokens))[0]
    assert np.max(np.abs(plain[10:] - got[10:])) > 1e-2


def test_loss_never_scores_across_segments(pair):
    """Labels concatenated as given (segment starts not ignored): the loss still skips the
    target at each segment start and padding, so it equals the rows alone (transformers)."""
    model, ref = pair
    rows = _rows([6, 9, 4], 4)
    ids = np.array([sum((r[0] for r in rows), []) + [PAD] * 5], np.int32)
    labels = np.array([sum((r[1] for r in rows), []) + [7] * 5], np.int32)  # labelled padding
    seg = np.array([[1] * 6 + [2] * 9 + [3] * 4 + [0] * 5], np.int32)
    packed = TrainBatch(ids, labels, (seg > 0).astype(np.int32), segment_ids=seg)
    got = jax.jit(lambda m, b: next_token_loss(m, b))(model, packed)
    want, n_tokens, _ = _ref_rows(ref, rows, grads=False)
    np.testing.assert_allclose(float(got[0]), want, rtol=1e-5)
    assert int(got[1]) == n_tokens


def test_pack_rows_first_fit_by_hand():
    rows = [([1, 2, 3], [1, 2, 3]), ([4, 5, 6, 7, 8], [-100, 5, 6, 7, 8]), ([9, 10], [9, 10]),
            ([11, 12, 13, 14], [11, 12, 13, 14]), ([15], [15])]
    ids, labels, mask, seg = pack_rows(rows, 8, pad_id=0)
    assert ids.dtype == labels.dtype == mask.dtype == seg.dtype == np.int32
    assert ids.tolist() == [[1, 2, 3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15, 0]]
    assert seg.tolist() == [[1, 1, 1, 2, 2, 2, 2, 2], [1, 1, 2, 2, 2, 2, 3, 0]]
    assert mask.tolist() == [[1] * 8, [1] * 7 + [0]]
    assert labels.tolist() == [[-100, 2, 3, -100, 5, 6, 7, 8],
                               [-100, 10, -100, 12, 13, 14, -100, -100]]
    # first fit: a later short row fills an earlier sequence's gap
    _, _, _, seg = pack_rows([([1] * 6, [1] * 6), ([2] * 5, [2] * 5), ([3] * 2, [3] * 2)], 8, 0)
    assert seg.tolist() == [[1] * 6 + [2] * 2, [1] * 5 + [0] * 3]


def test_bad_packing_inputs_say_the_fix(pair):
    with pytest.raises(ValueError, match="raise seq_len or truncate"):
        pack_rows([([1] * 9, [1] * 9)], 8, 0)
    with pytest.raises(ValueError, match="labels"):
        pack_rows([([1, 2], [1])], 8, 0)
    with pytest.raises(ValueError, match="empty"):
        pack_rows([([], [])], 8, 0)
    ids = np.ones((1, 6), np.int32)
    with pytest.raises(ValueError, match="in order, each one contiguous run"):
        TrainBatch(ids, ids, ids, segment_ids=np.array([[1, 1, 2, 2, 1, 0]], np.int32))
    with pytest.raises(ValueError, match="segment_ids has shape"):
        TrainBatch(ids, ids, ids, segment_ids=np.ones((1, 5), np.int32))
    model, _ = pair
    cache = KVCache.create(model.config, 1, 16, jnp.zeros((1,), jnp.int32))
    with pytest.raises(ValueError, match="without a KV cache"):
        model(jnp.ones((1, 4), jnp.int32), cache=cache, segment_ids=jnp.ones((1, 4), jnp.int32))
