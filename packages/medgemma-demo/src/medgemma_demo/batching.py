"""Batched serving: requests that arrive together are decoded together.

A :class:`Batcher` owns one worker thread. :meth:`Batcher.submit` queues a :class:`Request`
and returns its :class:`Row` at once; the worker collects up to ``max_batch`` requests with
the same sampling settings, waiting at most ``window_s`` after the first, and runs them as
one batch on the :class:`Backend` (for medgemma-core: one compiled prefill and decode loop
over all rows). A backend may also sort requests into groups (``group``: medgemma-core's
prompt-length bucket), so that a short question is not padded to a long one's length: rows of
a batch share their group. Each row's text streams to its own :class:`Row` as it is produced; cancelling
a row (Stop) ends that row only, and the batch ends when every row has ended. Rows that
ended leave the batch: once at most half of them go on, :class:`CoreBackend` shrinks it to
those (``Engine.keep``), so a long last answer is decoded at batch 1 or 2, not 8. A request
that arrives while a batch runs waits for the next one (no continuous batching: the rows of a
batch share one index frame from the prefill on, and joining one would mean copying its
prefilled cache into that frame at the running index).

In base mode every prompt begins with the same few-shot frame: :class:`CoreBackend` prefills
it once (``Engine.cache_prefix``) and each batch prefills only the questions after it.
Each batch logs one ``batch timing {json}`` line (INFO): rows, the wait of its first request,
prefill and decode seconds, the host time between chunks (text decoding, streaming) and when
each row ended; ``benchmarks/demo_load.py`` sums them per run.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from .prompting import BASE, cut_at_stop, held_back

log = logging.getLogger("medgemma_demo")

#: Row states a backend reports: still going (None), a stop token, its own token limit.
STOP, LENGTH, CANCELLED = "stop", "length", "cancelled"


@dataclass(frozen=True)
class Request:
    """One conversation to answer. ``prompt``: chat messages (chat mode) or the completion
    text (base mode); ``sampling``: a hashable settings object (rows of a batch share it);
    ``stops``: strings that end the answer (dropped from it)."""

    prompt: Any
    max_new_tokens: int
    sampling: Any
    stops: tuple[str, ...] = ()


class Backend(Protocol):
    """Runs a batch: yields, chunk by chunk, one ``(new text, state)`` per row, ``state`` None
    while the row goes on, else :data:`STOP` or :data:`LENGTH` (its last piece). Closing the
    iterator stops the work."""

    max_batch: int

    def run(self, requests: Sequence[Request]) -> Iterator[list[tuple[str, str | None]]]: ...

    # optional: ``group(request) -> hashable``; only requests of one group share a batch
    # optional: ``takes_finished = True``: ``run(requests, finished=f)``, ``f()`` telling
    # which rows have ended (a stop string, Stop) so that the backend may drop them


class RowError(RuntimeError):
    """The request failed; the message is one line for the page."""


class Row:
    """A request's answer as it is produced. Iterate :meth:`pieces` for the text; afterwards
    :attr:`finish` says why it ended (``stop``, ``length`` or ``cancelled``)."""

    def __init__(self, request: Request):
        self.request = request
        self.submitted = time.monotonic()
        self.finish: str | None = None
        self.batch_size = 0
        self._queue: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._cancel = threading.Event()
        self._text = ""      # produced, stop strings not yet ruled out
        self._sent = 0       # characters of _text already queued
        self._key: Any = None
        self.ended: float | None = None

    # ---- consumer side --------------------------------------------------------------------
    def cancel(self) -> None:
        """End this row (the other rows of its batch go on)."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def pieces(self, timeout: float | None = None) -> Iterator[str]:
        """Text pieces until the row ends; :class:`RowError` if it failed."""
        while True:
            kind, value = self._queue.get(timeout=timeout)
            if kind == "text":
                yield value
            elif kind == "error":
                raise RowError(value)
            else:
                return

    def text(self, timeout: float | None = None) -> str:
        return "".join(self.pieces(timeout))

    # ---- worker side ----------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.finish is not None

    def _feed(self, text: str, state: str | None) -> None:
        if self.done:
            return
        if self.cancelled:
            self._end(CANCELLED)
            return
        self._text += text
        stops = self.request.stops
        if stops:
            cut, found = cut_at_stop(self._text, stops)
            if found:
                self._text = cut
                self._flush(len(cut))
                self._end(STOP)
                return
        if state is not None:
            self._flush(len(self._text))
            self._end(state)
            return
        self._flush(len(self._text) - (held_back(self._text, stops) if stops else 0))

    def _flush(self, upto: int) -> None:
        if upto > self._sent:
            self._queue.put(("text", self._text[self._sent:upto]))
            self._sent = upto

    def _end(self, finish: str) -> None:
        self.finish = finish
        self.ended = time.monotonic()
        self._queue.put(("end", finish))

    def _fail(self, message: str) -> None:
        self.finish = "error"
        self._queue.put(("error", message))


#: A batch starts once no request arrived for this long (or its window ended, or it is full).
GAP_S = 0.05


class Batcher:
    """Collects requests into batches for ``backend()`` (called in the worker, so it may wait
    for a model still loading). ``max_batch``: rows per batch (the backend's own limit wins);
    ``window_s``: how long the first request of a batch waits for others at most; ``gap_s``:
    the batch starts sooner, once that long passed without a new request (a lone question
    waits ``gap_s``; a burst whose requests come in over a loaded server's few hundred
    milliseconds still shares one batch)."""

    def __init__(self, backend: Callable[[], Backend], *, max_batch: int = 8,
                 window_s: float = 0.25, gap_s: float = GAP_S):
        self._backend = backend
        self.max_batch = max(1, int(max_batch))
        self.window_s = float(window_s)
        self.gap_s = min(float(gap_s), self.window_s)
        self._queue: queue.Queue[Row] = queue.Queue()
        self._held: list[Row] = []  # taken from the queue but of other settings
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.batches: list[int] = []  # sizes of the batches run (recent ones)
        self.running = 0

    def submit(self, request: Request) -> Row:
        row = Row(request)
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="batcher", daemon=True)
                self._thread.start()
        self._queue.put(row)
        return row

    @property
    def waiting(self) -> int:
        return self._queue.qsize() + len(self._held)

    # ---- worker ---------------------------------------------------------------------------
    def _next_batch(self) -> list[Row]:
        first = self._held.pop(0) if self._held else self._queue.get()
        try:
            backend = self._backend()
            limit = min(self.max_batch, max(1, int(getattr(backend, "max_batch", 1))))
        except Exception:
            limit = 1
        batch = [first]
        key = self._key(first)
        same = [r for r in self._held if self._key(r) == key]
        for r in same[:limit - 1]:
            self._held.remove(r)
            batch.append(r)
        deadline = time.monotonic() + self.window_s
        last = time.monotonic()
        while len(batch) < limit:
            left = min(deadline, last + self.gap_s) - time.monotonic()
            try:
                row = self._queue.get(timeout=max(left, 0)) if left > 0 else \
                    self._queue.get_nowait()
            except queue.Empty:
                break
            last = time.monotonic()
            if self._key(row) == key:
                batch.append(row)
            else:
                self._held.append(row)
        return batch

    def _key(self, row: Row) -> Any:
        """What rows of one batch share: the sampling settings and the backend's group."""
        if row._key is None:
            group = None
            try:
                backend = self._backend()
                if hasattr(backend, "group"):
                    group = backend.group(row.request)
            except Exception:  # a bad prompt fails later, in its own batch
                group = ("error", id(row))
            row._key = (row.request.sampling, group)
        return row._key

    def _work(self) -> None:
        while True:
            batch = []
            for row in self._next_batch():
                if row.cancelled:  # stopped while it waited
                    row._end(CANCELLED)
                else:
                    batch.append(row)
            if not batch:
                continue
            self.running = len(batch)
            self.batches = [*self.batches[-99:], len(batch)]
            try:
                self._run(batch)
            except Exception as exc:  # never kill the worker
                log.error("batch of %d failed: %s", len(batch), type(exc).__name__)
                for row in batch:
                    if not row.done:
                        row._fail(_one_line(exc))
            finally:
                self.running = 0

    def _run(self, batch: list[Row]) -> None:
        try:
            backend = self._backend()
        except Exception as exc:
            for row in batch:
                row._fail(_one_line(exc))
            return
        for row in batch:
            row.batch_size = len(batch)
        began = time.monotonic()
        try:
            self._decode(backend, batch)
            _log_timing(backend, batch, began)
        except ValueError as exc:  # a prompt too long, an image for a text-only model, ...
            if len(batch) == 1:
                batch[0]._fail(_one_line(exc))
                return
            for row in batch:  # find whose it is: each alone
                if not row.done:
                    try:
                        self._decode(backend, [row])
                    except ValueError as one:
                        row._fail(_one_line(one))

    @staticmethod
    def _decode(backend: Backend, batch: list[Row]) -> None:
        requests = [r.request for r in batch]
        if getattr(backend, "takes_finished", False):  # it may drop the rows that ended
            chunks = backend.run(requests,  # type: ignore[call-arg]
                                 finished=lambda: [r.done or r.cancelled for r in batch])
        else:
            chunks = backend.run(requests)
        try:
            for chunk in chunks:
                for row, (text, state) in zip(batch, chunk):
                    row._feed(text, state)
                if all(r.done or r.cancelled for r in batch):
                    break
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()
        for row in batch:
            if not row.done:
                row._feed("", CANCELLED if row.cancelled else LENGTH)


def _log_timing(backend: Any, batch: list[Row], began: float) -> None:
    """One ``batch timing {json}`` line: the batcher's view (wait, total, row ends) and the
    backend's own ``last_timing`` (prefill, decode, host) when it keeps one."""
    end = time.monotonic()
    info: dict[str, Any] = {"rows": len(batch),
                            "wait_s": round(began - min(r.submitted for r in batch), 3),
                            "arrived_s": round(max(r.submitted for r in batch)
                                               - min(r.submitted for r in batch), 3),
                            "total_s": round(end - began, 3),
                            "row_ends_s": [round((r.ended or end) - began, 2) for r in batch]}
    info.update(getattr(backend, "last_timing", None) or {})
    log.info("batch timing %s", json.dumps(info))


def _one_line(exc: BaseException) -> str:
    message = getattr(exc, "message", None)  # gradio.Error keeps its text there
    text = (message if isinstance(message, str) else str(exc)).strip().splitlines()
    return text[0] if text else type(exc).__name__


# ---- backends -------------------------------------------------------------------------------

class CoreBackend:
    """Batches on a ``medgemma_core.MedGemma``: chat mode through its chat template (and
    images on image-text models), base mode from the completion text; one
    ``engine.stream`` per batch, each row stopping at a stop token or its own token limit."""

    def __init__(self, model: Any, mode: str, *, max_batch: int = 8, chunk: int = 4,
                 reuse_prefix: bool = True):
        self.model = model
        self.mode = mode
        self.max_batch = max_batch
        self.chunk = chunk
        self.reuse_prefix = reuse_prefix
        self._prefix: Any = None
        self._lock = threading.Lock()
        self.last_timing: dict[str, Any] | None = None

    def prefix(self) -> Any:
        """Base mode: the few-shot frame's ``CachedPrefix`` (made once), else None. The frame
        is the token prefix that base prompts of two different questions share, less its
        last token (the tokenizer may join that one to the question's first)."""
        if self.mode != BASE or not self.reuse_prefix:
            return None
        with self._lock:
            if self._prefix is None:
                from .prompting import Turn, base_prompt

                tok = self.model.tokenizer
                a, b = (tok.encode(base_prompt("", [], Turn(q, 0)), add_bos=True)
                        for q in ("What is a pneumothorax?", "Name a beta blocker."))
                n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                self._prefix = self.model.engine.cache_prefix(a[:max(n - 1, 1)])
            return self._prefix

    def group(self, request: Request) -> int:
        """The prompt-length bucket (text-only prompts; image-text ones share one group)."""
        from medgemma_core.generate import bucket

        if self.mode == BASE:
            return bucket(len(self.model.tokenizer.encode(request.prompt, add_bos=True)))
        if self.model.is_multimodal:
            return 0
        return bucket(len(self.model.encode_chat(request.prompt)))

    def prompts(self, requests: Sequence[Request]) -> Any:
        from medgemma_core import Prompts

        if self.mode == BASE:
            tok = self.model.tokenizer
            return Prompts([tok.encode(r.prompt, add_bos=True) for r in requests])
        return self.model.chat_prompts([r.prompt for r in requests])

    takes_finished = True

    def warm(self, request: Request) -> None:
        """Compile what serving ``request``-like questions uses: every batch size (1, 2, 4,
        ... max_batch rows) and every shrink between them."""
        sizes = [1]
        while sizes[-1] < self.max_batch:
            sizes.append(min(sizes[-1] * 2, self.max_batch))
        for size in sizes:
            for _ in self.run([request] * size):
                pass
            prompts = self.prompts([request] * size)
            if prompts.embeddings is not None:
                continue
            st = self.model.engine.start(prompts.ids, max_new_tokens=request.max_new_tokens,
                                         sampling=request.sampling, prefix=self.prefix())
            for smaller in sizes[:sizes.index(size)]:
                self.model.engine.keep(st, [0] * smaller)

    def run(self, requests: Sequence[Request],
            finished: Callable[[], Sequence[bool]] | None = None
            ) -> Iterator[list[tuple[str, str | None]]]:
        """``finished()``: which requests have ended on the caller's side (stop strings,
        Stop); once at most half the rows go on, the batch shrinks to them."""
        n = len(requests)
        # Batches are padded to a power of two (repeating the last request, its rows
        # dropped): 1, 2, 4, 8... rows, so that few batch shapes are ever compiled.
        size = batch_bucket(n, self.max_batch)
        padded = list(requests) + [requests[-1]] * (size - n)

        def ended() -> list[bool]:
            return [*(finished() if finished is not None else [False] * n), *[True] * (size - n)]

        for chunk in self._run(padded, ended):
            yield chunk[:n]

    def _run(self, requests: Sequence[Request], ended: Callable[[], list[bool]]
             ) -> Iterator[list[tuple[str, str | None]]]:
        from medgemma_core.generate import bucket

        began = time.perf_counter()
        prompts = self.prompts(requests)
        prefix = self.prefix() if prompts.embeddings is None else None
        engine, tok = self.model.engine, self.model.tokenizer
        stops = set(engine.stop_ids)
        decoders = [tok.stream_decoder() for _ in requests]
        counts = [0] * len(requests)
        state: list[str | None] = [None] * len(requests)
        limit = max(r.max_new_tokens for r in requests)
        timing: dict[str, Any] = {
            "padded": len(requests), "tokens": bucket(max(len(p) for p in prompts.ids)),
            "tail": engine.prefill_tail(prompts.ids, prefix) if prefix is not None else None,
            "prompt_s": round(time.perf_counter() - began, 3), "prefill_s": 0.0,
            "decode_s": 0.0, "chunks": 0, "steps": 0, "shrunk": []}
        self.last_timing = timing
        pieces = self._pieces(engine, prompts, limit, requests[0].sampling, prefix, state,
                              ended, timing)
        try:
            yield from self._texts(pieces, requests, timing, decoders, counts, state, stops)
        finally:
            pieces.close()
            timing["host_s"] = round(time.perf_counter() - began - timing["prefill_s"]
                                     - timing["decode_s"] - timing["prompt_s"], 3)
            timing["prefill_s"] = round(timing["prefill_s"], 3)
            timing["decode_s"] = round(timing["decode_s"], 3)
        yield [("" if s is not None else d.flush(), s or LENGTH) for d, s in zip(decoders, state)]

    def _pieces(self, engine: Any, prompts: Any, limit: int, sampling: Any, prefix: Any,
                state: list[str | None], ended: Callable[[], list[bool]],
                timing: dict[str, Any]) -> Iterator[list[list[int]]]:
        """``Engine.stream`` over the step API, dropping rows that ended: each chunk, the
        new ids of every request (empty for rows no longer decoded)."""
        st = engine.start(prompts.ids, max_new_tokens=limit, sampling=sampling,
                          embeddings=prompts.embeddings, image_id=prompts.image_id,
                          prefix=prefix)
        live = list(range(len(state)))  # request of each engine row
        emitted = 0
        while True:
            produced = min(st.step, limit)
            block = np.asarray(st.tokens[:, emitted:produced]).tolist()
            piece: list[list[int]] = [[] for _ in state]
            for i, r in enumerate(live):
                if i == live.index(r):  # rows repeated as padding: the first one
                    piece[r] = block[i]
            emitted = produced
            yield piece
            if produced >= limit:
                return
            done = ended()
            going = [r for r in dict.fromkeys(live) if state[r] is None and not done[r]]
            if not going:
                return
            size = batch_bucket(len(going), len(live))
            if size < len(live):
                rows = [live.index(r) for r in going]
                rows += [rows[-1]] * (size - len(rows))
                st = engine.keep(st, rows)
                live = [live[i] for i in rows]
                timing["shrunk"].append([produced, size])
            st = engine.decode(st, produced + self.chunk)

    def _texts(self, pieces: Iterator[list[list[int]]], requests: Sequence[Request],
               timing: dict[str, Any], decoders: list, counts: list[int],
               state: list[str | None], stops: set[int]
               ) -> Iterator[list[tuple[str, str | None]]]:
        first = True
        while True:
            tick = time.perf_counter()
            piece = next(pieces, None)
            if piece is None:
                return
            spent = time.perf_counter() - tick
            if first:  # the prefill and each row's first token
                timing["prefill_s"], first = spent, False
            else:
                timing["decode_s"] += spent
                timing["chunks"] += 1
                timing["steps"] += max((len(ids) for ids in piece), default=0)
            out = []
            for r, ids in enumerate(piece):
                text = ""
                if state[r] is None:
                    for t in ids:
                        if t in stops:
                            state[r] = STOP
                            break
                        text += decoders[r].feed(t)
                        counts[r] += 1
                        if counts[r] >= requests[r].max_new_tokens:
                            state[r] = LENGTH
                            break
                    if state[r] is not None:
                        text += decoders[r].flush()
                out.append((text, state[r]))
            yield out


def batch_bucket(n: int, max_batch: int) -> int:
    """The batch size ``n`` rows are padded to: the next power of two, at most ``max_batch``
    (and never below ``n``)."""
    size = 1
    while size < n:
        size *= 2
    return max(n, min(size, max(max_batch, 1)))


class SerialBackend:
    """Any :class:`~medgemma_demo.host.ChatModel` (``chat_stream``), one row at a time."""

    max_batch = 1

    def __init__(self, model: Any):
        self.model = model

    def run(self, requests: Sequence[Request]) -> Iterator[list[tuple[str, str | None]]]:
        (request,) = requests
        pieces = self.model.chat_stream(request.prompt, max_new_tokens=request.max_new_tokens,
                                        sampling=request.sampling)
        try:
            for piece in pieces:
                yield [(piece, None)]
        finally:
            close = getattr(pieces, "close", None)
            if close is not None:
                close()
        yield [("", STOP)]
