"""Batched serving: requests that arrive together are decoded together.

A :class:`Batcher` owns one worker thread. :meth:`Batcher.submit` queues a :class:`Request`
and returns its :class:`Row` at once; the worker collects up to ``max_batch`` requests with
the same sampling settings (a batch starts ``gap_s`` after the last one came, at most
``window_s`` after the first) and runs them as one batch on the :class:`Backend` (for
medgemma-core, :mod:`.backends`: one compiled prefill and decode loop over all rows). A
backend may also sort requests into groups (``group``: medgemma-core's prompt-length bucket),
so that a short question is not padded to a long one's length: rows of a batch share their
group. Each row's text streams to its own :class:`Row` as it is produced; cancelling a row
(Stop) ends that row only, and the batch ends when every row has ended. Rows that ended
leave the batch: once at most half of them go on, ``CoreBackend`` shrinks it to those
(``Engine.keep``), so a long last answer is decoded at batch 1 or 2, not 8. Continuous
batching (``join``, on by default): a request of the same settings and group that arrives
while a batch runs joins it at the next chunk, in a free row (``Engine.join``: its prompt is
prefilled alone and its cache moved into the batch's index frame), as long as the batch has
room for its tokens; otherwise it waits for the next batch.

In base mode every prompt begins with the same few-shot frame: ``CoreBackend`` prefills it
once (``Engine.cache_prefix``) and each batch prefills only the questions after it. Each
batch logs one ``batch timing {json}`` line (INFO): rows, the wait of its first request and
the arrival spread, prefill and decode seconds, the host time between chunks (text
decoding, streaming) and when each row ended; ``benchmarks/demo_load.py`` sums them per run.
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

from .prompting import cut_at_stop, held_back

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
                 window_s: float = 0.25, gap_s: float = GAP_S, join: bool = True):
        self._backend = backend
        self.max_batch = max(1, int(max_batch))
        self.window_s = float(window_s)
        self.gap_s = min(float(gap_s), self.window_s)
        self.join = join
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

    def _joiners(self, batch: list[Row], n: int, room: int) -> list[Request]:
        """Up to ``n`` waiting requests that may join ``batch`` (its settings and group, at
        most ``room`` new tokens), appended to it; the rest stay queued, in order."""
        key = batch[0]._key
        got: list[Row] = []
        for row in [r for r in self._held if self._key(r) == key]:
            if len(got) < n and row.request.max_new_tokens <= room:
                self._held.remove(row)
                got.append(row)
        while len(got) < n:
            try:
                row = self._queue.get_nowait()
            except queue.Empty:
                break
            if row.cancelled:
                row._end(CANCELLED)
            elif self._key(row) == key and row.request.max_new_tokens <= room:
                got.append(row)
            else:
                self._held.append(row)
        batch.extend(got)
        for row in got:
            row.batch_size = len(batch)
        if got:
            self.running = len([r for r in batch if not r.done])
        return [r.request for r in got]

    def _decode(self, backend: Backend, batch: list[Row]) -> None:
        requests = [r.request for r in batch]
        kwargs: dict[str, Any] = {}
        if getattr(backend, "takes_finished", False):  # it may drop the rows that ended
            kwargs["finished"] = lambda: [r.done or r.cancelled for r in batch]
        if self.join and getattr(backend, "takes_joiners", False):
            kwargs["incoming"] = lambda n, room: self._joiners(batch, n, room)
        chunks = backend.run(requests, **kwargs)
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
