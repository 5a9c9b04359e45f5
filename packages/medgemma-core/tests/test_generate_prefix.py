"""A cached prompt prefix (Engine.cache_prefix / start(prefix=)): the same cache and the same
answers as prefilling every row in full, for rows that share all, part or none of it.

The reference is the plain prefill (one forward pass over each whole left-padded prompt); the
cached path copies the prefix's keys and values into each row at its own offset and runs
only the last columns. Two windows: one the block overruns (the ring is rotated) and one it
does not (slots still empty, written one by one).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
from flax import nnx

from medgemma_core import Engine, Gemma3, Gemma3Config, Sampling
from medgemma_core.generate import bucket

RNG = np.random.default_rng(7)
PREFIX = [2, *RNG.integers(3, 128, size=39).tolist()]  # 40 tokens, > the window of 8
OTHER = RNG.integers(3, 128, size=16).tolist()


def _prompts():
    return [
        PREFIX + OTHER[:3],                      # the whole prefix, then 3 tokens
        PREFIX + OTHER[:13],                     # the whole prefix, then 13
        PREFIX[:30] + OTHER[3:8],                # 30 of it, then others
        PREFIX[:25],                             # shorter than the prefix
        PREFIX[:38] + [OTHER[0]] + OTHER[5:15],  # diverges at its 39th token
    ]


# repetition control over the prompt: the history holds the whole prompt, prefix included
REPEAT = Sampling(repetition_penalty=1.3, no_repeat_ngram_size=2)


@functools.cache
def _engine(window: int) -> Engine:
    cfg = Gemma3Config.tiny(vocab_size=128, sliding_window=window)
    return Engine(Gemma3(cfg, rngs=nnx.Rngs(3)), stop_ids=(1,), pad_id=0)


def test_the_prefix_path_runs_only_the_uncovered_columns():
    engine = _engine(8)
    prefix = engine.cache_prefix(PREFIX)
    prompts = _prompts()
    assert [prefix.shared(p) for p in prompts] == [40, 40, 30, 25, 38]
    assert bucket(max(map(len, prompts))) == 64
    assert engine.prefill_tail(prompts, prefix) == 16  # so start() takes the cached path
    assert engine.prefill_tail(prompts, None) == 64
    # a row that shares too little to fit in the tail: the whole batch prefills in full
    assert engine.prefill_tail([*prompts, OTHER + PREFIX], prefix) == 64


@pytest.mark.parametrize("window", [8, 64])
def test_cached_prefix_fills_the_cache_as_the_full_prefill_does(window):
    """Window 8: the 16 columns overrun the ring (a rotation); 64: they do not, and some ring
    slots are still empty after the prefix's 48 columns."""
    engine = _engine(window)
    prefix = engine.cache_prefix(PREFIX)
    prompts = _prompts()
    # the settings of the next test (its compiled prefills are these)
    plain = engine.start(prompts, max_new_tokens=20, sampling=REPEAT, ignore_eos=True).carry
    cached = engine.start(prompts, max_new_tokens=20, sampling=REPEAT, ignore_eos=True,
                          prefix=prefix).carry
    assert np.array_equal(np.asarray(cached.cache.ring_index),
                          np.asarray(plain.cache.ring_index))
    start = np.asarray(plain.cache.start)
    assert np.array_equal(np.asarray(cached.cache.start), start)
    assert int(cached.cache.length) == int(plain.cache.length) == 64
    ring = np.asarray(plain.cache.ring_index)
    cfg = engine.config
    for i, ((pk, pv), (ck, cv)) in enumerate(zip(plain.cache.layers, cached.cache.layers)):
        pk, pv, ck, cv = map(np.asarray, (pk, pv, ck, cv))
        idx = ring if cfg.is_local(i) else np.arange(pk.shape[2])
        for b in range(len(prompts)):  # the slots a row can see: its real tokens
            seen = (idx >= start[b]) & (idx < 64)
            assert seen.sum() == (min(len(prompts[b]), cfg.sliding_window)
                                  if cfg.is_local(i) else len(prompts[b]))
            np.testing.assert_allclose(ck[b][:, seen], pk[b][:, seen], atol=2e-5, rtol=2e-5)
            np.testing.assert_allclose(cv[b][:, :, seen], pv[b][:, :, seen], atol=2e-5,
                                       rtol=2e-5)
    assert np.array_equal(np.asarray(cached.token), np.asarray(plain.token))


@pytest.mark.parametrize(("window", "sampling"), [
    (8, REPEAT), pytest.param(64, REPEAT, marks=pytest.mark.slow),
    pytest.param(8, Sampling(), marks=pytest.mark.slow),
    pytest.param(8, Sampling(repetition_penalty=1.3, no_repeat_ngram_size=3,
                             penalize_prompt=False), marks=pytest.mark.slow)],
    ids=["repetition", "repetition-window64", "greedy", "answer-only"])
def test_greedy_answers_with_the_cached_prefix_equal_the_full_prefill(window, sampling):
    engine = _engine(window)
    prefix = engine.cache_prefix(PREFIX)
    prompts = _prompts()
    want = engine.generate(prompts, max_new_tokens=20, sampling=sampling, ignore_eos=True)
    got = engine.generate(prompts, max_new_tokens=20, sampling=sampling, ignore_eos=True,
                          prefix=prefix)
    assert engine._prefill_cached._cache_size() > 0
    assert got.token_ids == want.token_ids
    assert all(len(r) == 20 for r in got.token_ids)


@pytest.mark.slow
def test_a_row_alone_through_the_prefix_answers_as_in_the_batch():
    engine = _engine(8)
    prefix = engine.cache_prefix(PREFIX)
    prompts = _prompts()
    want = engine.generate(prompts, max_new_tokens=20, ignore_eos=True)
    alone = engine.generate([prompts[1]], max_new_tokens=20, ignore_eos=True, prefix=prefix)
    assert alone.token_ids[0] == want.token_ids[1]


def test_a_prefix_needs_tokens():
    engine = _engine(8)
    with pytest.raises(ValueError, match="at least one token"):
        engine.cache_prefix([])


def test_rows_kept_after_others_ended_go_on_as_in_the_full_batch():
    """Engine.keep: a smaller batch of some rows (one repeated) continues each row exactly."""
    engine = _engine(8)
    prompts = _prompts()[:4]
    want = engine.generate(prompts, max_new_tokens=20, sampling=REPEAT, ignore_eos=True)
    state = engine.start(prompts, max_new_tokens=20, sampling=REPEAT, ignore_eos=True)
    state = engine.decode(state, 7)
    head = np.asarray(state.tokens[:, :7])
    state = engine.keep(state, [2, 0, 0, 0])  # padded to a batch of 4 by repeating row 0
    assert state.prompt_tokens == (35, 43, 43, 43)
    state = engine.decode(state, 20)
    tail = np.asarray(state.tokens[:, 7:20])
    assert head[2].tolist() + tail[0].tolist() == want.token_ids[2]
    assert head[0].tolist() + tail[1].tolist() == want.token_ids[0]
    assert tail[2].tolist() == tail[1].tolist()
    with pytest.raises(ValueError, match="indices of the 4 rows"):
        engine.keep(state, [4])
