"""Repetition control (repetition penalty, no-repeat n-grams) against transformers' own logits
processors, and greedy generation with both against transformers' ``generate``."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
)

from medgemma_core import Engine, Gemma3Config, Sampling, load_decoder
from medgemma_core.sampling import ban_repeated_ngrams, control_repetition, repetition_penalty
from medgemma_core.testing import save_tiny_causal_lm


def _case(seed: int, b: int = 3, length: int = 40, vocab: int = 12):
    rng = np.random.default_rng(seed)
    history = rng.integers(0, vocab, size=(b, length))  # a small vocabulary: many repeats
    logits = rng.normal(size=(b, vocab)).astype(np.float32) * 3  # both signs
    return history, logits


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_matches_transformers(penalty):
    history, logits = _case(0)
    want = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor(history),
                                                     torch.tensor(logits)).numpy()
    ours = repetition_penalty(jnp.asarray(logits), jnp.asarray(history),
                              jnp.ones(history.shape, bool), penalty)
    np.testing.assert_allclose(np.asarray(ours), want, rtol=1e-6)
    assert not np.allclose(want, logits)  # the case exercises the penalty


def test_penalty_without_the_prompt_matches_prompt_ignore_length():
    history, logits = _case(1, vocab=40)
    prompt = 25
    want = RepetitionPenaltyLogitsProcessor(1.5, prompt_ignore_length=prompt)(
        torch.tensor(history), torch.tensor(logits)).numpy()
    ours = control_repetition(jnp.asarray(logits), jnp.asarray(history),
                              jnp.full((3,), prompt), jnp.int32(history.shape[1]),
                              penalty=1.5, ngram=0)
    np.testing.assert_allclose(np.asarray(ours), want, rtol=1e-6)
    full = RepetitionPenaltyLogitsProcessor(1.5)(torch.tensor(history), torch.tensor(logits))
    assert not np.allclose(full.numpy(), want)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_no_repeat_ngrams_match_transformers(n):
    history, logits = _case(2 + n, length=4 if n == 1 else 40,
                            vocab={1: 6, 2: 6, 3: 4, 4: 3}[n])
    want = NoRepeatNGramLogitsProcessor(n)(torch.tensor(history),
                                           torch.tensor(logits).clone()).numpy()
    ours = ban_repeated_ngrams(jnp.asarray(logits), jnp.asarray(history),
                               jnp.zeros((3,), jnp.int32), jnp.int32(history.shape[1]), n)
    np.testing.assert_array_equal(np.asarray(ours), want)
    assert np.isinf(want).any() and np.isfinite(want).any()


def test_left_padding_and_a_shorter_history_are_not_counted():
    """Row b's sequence is history[b, first[b]:end]: pads before it and slots after it (not yet
    generated) are ignored; each row equals transformers on that row alone."""
    rng = np.random.default_rng(7)
    vocab, length, end = 8, 30, 24
    lengths = [24, 15, 3]
    history = np.full((3, length), 5, np.int64)  # junk everywhere outside the sequences
    for b, n in enumerate(lengths):
        history[b, end - n:end] = rng.integers(0, vocab, size=n)
    logits = rng.normal(size=(3, vocab)).astype(np.float32)
    first = jnp.asarray([end - n for n in lengths], jnp.int32)
    ours = np.asarray(control_repetition(jnp.asarray(logits), jnp.asarray(history), first,
                                         jnp.int32(end), penalty=1.4, ngram=2))
    for b, n in enumerate(lengths):
        row = torch.tensor(history[b:b + 1, end - n:end])
        want = RepetitionPenaltyLogitsProcessor(1.4)(row, torch.tensor(logits[b:b + 1]))
        want = NoRepeatNGramLogitsProcessor(2)(row, want).numpy()[0]
        np.testing.assert_allclose(ours[b], want, rtol=1e-6)  # -inf where transformers has it


def test_bad_settings_name_the_range():
    with pytest.raises(ValueError, match="repetition_penalty must be > 0"):
        Sampling(repetition_penalty=0)
    with pytest.raises(ValueError, match="no_repeat_ngram_size must be >= 0"):
        Sampling(no_repeat_ngram_size=-1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cfg = Gemma3Config.tiny()
    folder = tmp_path_factory.mktemp("tiny-rep")
    ref = save_tiny_causal_lm(folder, cfg)
    return cfg, Engine(load_decoder(folder)), ref


def _hf_greedy(ref, row, n, **kw):
    with torch.no_grad():
        out = ref.generate(input_ids=torch.tensor([row]), max_new_tokens=n, do_sample=False,
                           eos_token_id=[1, 106], pad_token_id=0, **kw)
    ids = []
    for tok in out[0, len(row):].tolist():
        ids.append(tok)
        if tok in (1, 106):
            break
    return ids


def test_greedy_generation_with_repetition_control_matches_transformers(tiny):
    cfg, engine, ref = tiny
    rng = np.random.default_rng(3)
    rows = [rng.integers(3, cfg.vocab_size, size=n).tolist() for n in (9, 20, 4)]
    s = Sampling(repetition_penalty=1.6, no_repeat_ngram_size=2)
    ours = engine.generate(rows, max_new_tokens=30, sampling=s).token_ids  # one padded batch
    for row, got in zip(rows, ours):
        assert got == _hf_greedy(ref, row, 30, repetition_penalty=1.6, no_repeat_ngram_size=2)
        assert len(set(zip(got, got[1:]))) == len(got) - 1  # no bigram twice in the answer
    assert ours[0] != _hf_greedy(ref, rows[0], 30)  # the settings changed the answer
