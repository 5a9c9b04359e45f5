"""Continuous batching (Engine.join): rows that join a running batch answer as they do alone,
and the rows already running go on as in their own batch.

The references are plain generations (``Engine.generate``) of each prompt set on its own; the
join moves a fresh row's cache, history and first token into the running batch's index frame.
Window 8: local layers' rings wrap (the joining row's keys come from a rotated ring).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
from flax import nnx

from medgemma_core import Engine, Gemma3, Gemma3Config, Sampling

RNG = np.random.default_rng(11)
RUNNING = [RNG.integers(3, 128, size=n).tolist() for n in (35, 43, 38, 40)]  # bucket 64
REPEAT = Sampling(repetition_penalty=1.3, no_repeat_ngram_size=2)  # the prompt counted
ANSWER_ONLY = Sampling(repetition_penalty=1.2, no_repeat_ngram_size=3, penalize_prompt=False)


@functools.cache
def _engine(window: int) -> Engine:
    cfg = Gemma3Config.tiny(vocab_size=128, sliding_window=window)
    return Engine(Gemma3(cfg, rngs=nnx.Rngs(5)), stop_ids=(1,), pad_id=0)


def _check(engine, running, joining, sampling, at):
    want_run = engine.generate(running, max_new_tokens=40, sampling=sampling, ignore_eos=True)
    want_new = engine.generate(joining, max_new_tokens=20, sampling=sampling, ignore_eos=True)
    state = engine.start(running, max_new_tokens=40, sampling=sampling, ignore_eos=True)
    state = engine.decode(state, at)
    head = np.asarray(state.tokens[:, :at])
    new = engine.start(joining, max_new_tokens=20, sampling=sampling, ignore_eos=True)
    places = [1, 3][:len(joining)]
    state = engine.join(state, places, new)
    assert state.prompt_tokens[places[0]] == len(joining[0])
    state = engine.decode(state, 40)
    out = np.asarray(state.tokens)
    for r, want in zip(places, want_new.token_ids):
        assert out[r, at - 1:at + 19].tolist() == want
    for r in (0, 2):
        assert head[r].tolist() + out[r, at:40].tolist() == want_run.token_ids[r]


@pytest.mark.parametrize("sampling", [REPEAT, ANSWER_ONLY], ids=["prompt", "answer"])
def test_rows_joining_a_running_batch_answer_as_alone(sampling):
    joining = [RNG.integers(3, 128, size=n).tolist() for n in (12, 50)]  # bucket 64: shift +6
    _check(_engine(8), RUNNING, joining, sampling, at=7)


def test_a_row_from_a_longer_bucket_joins_a_short_batch():
    """Running prompts in bucket 32 at index 34; the joining one (33 tokens) in bucket 64:
    its frame moves back (a negative shift)."""
    running = [RNG.integers(3, 128, size=n).tolist() for n in (20, 25, 30, 28)]
    joining = [RNG.integers(3, 128, size=33).tolist()]
    _check(_engine(8), running, joining, REPEAT, at=3)


def test_join_refuses_what_does_not_fit():
    engine = _engine(8)
    state = engine.start(RUNNING, max_new_tokens=16, sampling=REPEAT, ignore_eos=True)
    new = engine.start([RUNNING[0]], max_new_tokens=16, sampling=REPEAT, ignore_eos=True)
    state = engine.decode(state, 3)
    with pytest.raises(ValueError, match="no room"):
        engine.join(state, [0], new)
    with pytest.raises(ValueError, match="distinct indices"):
        engine.join(state, [4], new)
    other = engine.start([RUNNING[0]], max_new_tokens=4, ignore_eos=True)
    with pytest.raises(ValueError, match="sampling and stop tokens"):
        engine.join(state, [0], other)
    long = engine.start([RNG.integers(3, 128, size=80).tolist()], max_new_tokens=4,
                        sampling=REPEAT, ignore_eos=True)
    with pytest.raises(ValueError, match="cannot join a batch at index 66"):
        engine.join(state, [0], long)
