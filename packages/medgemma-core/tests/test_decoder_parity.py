"""Numerical parity of our decoder with transformers' Gemma3ForCausalLM on tiny checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medgemma_core import Engine, Gemma3Config, load_decoder
from medgemma_core.testing import save_tiny_causal_lm


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cfg = Gemma3Config.tiny()
    folder = tmp_path_factory.mktemp("tiny")
    ref = save_tiny_causal_lm(folder, cfg)
    return cfg, folder, ref


def _ref_logits(ref, ids, mask=None):
    with torch.no_grad():
        out = ref(input_ids=torch.tensor(ids), attention_mask=None if mask is None
                  else torch.tensor(mask))
    return out.logits.float().numpy()


def test_logits_match_beyond_the_sliding_window(tiny):
    cfg, folder, ref = tiny
    model = load_decoder(folder)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, cfg.vocab_size, size=(2, 4 * cfg.sliding_window + 3))  # > window
    ours, _ = model(ids)
    np.testing.assert_allclose(np.asarray(ours), _ref_logits(ref, ids), atol=1e-4, rtol=1e-4)


def test_left_padded_rows_match_unpadded_reference(tiny):
    cfg, folder, ref = tiny
    model = load_decoder(folder)
    rng = np.random.default_rng(1)
    lengths = [29, 17]
    t = max(lengths)
    ids = np.zeros((2, t), np.int64)
    start = np.array([t - n for n in lengths])
    rows = [rng.integers(3, cfg.vocab_size, size=n) for n in lengths]
    for b, row in enumerate(rows):
        ids[b, start[b]:] = row
    ours, _ = model(ids, start=start)
    for b, row in enumerate(rows):
        want = _ref_logits(ref, row[None])[0]
        np.testing.assert_allclose(np.asarray(ours[b, start[b]:]), want, atol=1e-4, rtol=1e-4)


def _hf_greedy(ref, rows, n):
    """transformers' greedy generation for a left-padded batch; generated ids per row."""
    t = max(len(r) for r in rows)
    ids = np.zeros((len(rows), t), np.int64)
    mask = np.zeros((len(rows), t), np.int64)
    for b, r in enumerate(rows):
        ids[b, t - len(r):] = r
        mask[b, t - len(r):] = 1
    with torch.no_grad():
        out = ref.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                           max_new_tokens=n, do_sample=False, eos_token_id=[1, 106],
                           pad_token_id=0)
    result = []
    for row in out[:, t:].tolist():
        ids_ = []
        for tok in row:
            ids_.append(tok)
            if tok in (1, 106):
                break
        result.append(ids_)
    return result


def test_greedy_generation_matches_transformers_batched(tiny):
    cfg, folder, ref = tiny
    engine = Engine(load_decoder(folder))
    rng = np.random.default_rng(2)
    rows = [rng.integers(3, cfg.vocab_size, size=n).tolist() for n in (21, 5, 12)]
    ours = engine.generate(rows, max_new_tokens=32)
    want = _hf_greedy(ref, rows, 32)
    assert ours.token_ids == want
    assert all(len(r) == 32 or r[-1] in (1, 106) for r in want)
    for row in rows:  # each row alone gives the same as in the batch
        assert engine.generate([row], max_new_tokens=32).token_ids[0] == _hf_greedy(ref, [row], 32)[0]
