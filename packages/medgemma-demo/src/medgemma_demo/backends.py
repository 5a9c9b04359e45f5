"""Backends of the :class:`~.batching.Batcher`: medgemma-core batches (:class:`CoreBackend`)
and any chat model one request at a time (:class:`SerialBackend`)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from .batching import LENGTH, STOP, Request
from .prompting import BASE


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
    takes_joiners = True

    def warm(self, request: Request) -> None:
        """Compile what serving ``request``-like questions uses: every batch size (1, 2, 4,
        ... max_batch rows), every shrink between them, and rows joining a running batch."""
        sizes = [1]
        while sizes[-1] < self.max_batch:
            sizes.append(min(sizes[-1] * 2, self.max_batch))
        for size in sizes:
            for _ in self.run([request] * size, incoming=lambda n, room: ()):
                pass
            prompts = self.prompts([request] * size)
            if prompts.embeddings is not None:
                continue
            engine, limit = self.model.engine, request.max_new_tokens
            st = engine.start(prompts.ids, max_new_tokens=self.room(limit),
                              sampling=request.sampling, prefix=self.prefix())
            for smaller in sizes[:sizes.index(size) + 1]:
                engine.keep(st, [0] * smaller)
                new = engine.start(prompts.ids[:smaller], max_new_tokens=limit,
                                   sampling=request.sampling, prefix=self.prefix())
                engine.join(engine.keep(st, list(range(size))), list(range(smaller)), new)
            for larger in sizes[sizes.index(size) + 1:]:
                engine.keep(st, [0] * larger)

    @staticmethod
    def room(limit: int) -> int:
        """Tokens a batch that rows may join is started for; rows can join while its step is
        at most ``room - limit + 1``. The decode loop's own power-of-two bucket of ``limit``
        (no larger cache: 48 -> 64, joins until step 17), or twice ``limit`` when that bucket
        leaves less than a quarter of it free (a larger cache: +8% per 8-row step of the
        270M at 128 + 128 slots instead of 128 + 64)."""
        from medgemma_core.generate import DECODE_BUCKETS, bucket

        b = bucket(limit, DECODE_BUCKETS)
        return b if b - limit >= limit // 4 else 2 * limit

    def run(self, requests: Sequence[Request],
            finished: Callable[[], Sequence[bool]] | None = None,
            incoming: Callable[[int, int], Sequence[Request]] | None = None
            ) -> Iterator[list[tuple[str, str | None]]]:
        """``finished()``: which requests have ended on the caller's side (stop strings,
        Stop); once at most half the rows go on, the batch shrinks to them.
        ``incoming(n, room)``: up to ``n`` more requests of the same group and sampling, none
        asking for more than ``room`` new tokens, asked for between chunks (continuous
        batching; text prompts): they join the running batch, and every later chunk has a
        row for each of them too (in the order they came)."""
        yield from self._run(list(requests), finished, incoming)

    def _run(self, requests: list[Request], finished: Callable[[], Sequence[bool]] | None,
             incoming: Callable[[int, int], Sequence[Request]] | None
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
        timing: dict[str, Any] = {
            "padded": batch_bucket(len(requests), self.max_batch),
            "tokens": bucket(max(len(p) for p in prompts.ids)),
            "tail": engine.prefill_tail(prompts.ids, prefix) if prefix is not None else None,
            "prompt_s": round(time.perf_counter() - began, 3), "prefill_s": 0.0,
            "decode_s": 0.0, "chunks": 0, "steps": 0, "shrunk": [], "joined": []}
        self.last_timing = timing

        def ended() -> list[bool]:
            done = list(finished()) if finished is not None else []
            return done + [False] * (len(requests) - len(done))

        def add(new: Sequence[Request]) -> list[int]:
            first = len(requests)
            requests.extend(new)
            decoders.extend(tok.stream_decoder() for _ in new)
            counts.extend(0 for _ in new)
            state.extend(None for _ in new)
            return list(range(first, len(requests)))

        can_join = incoming is not None and prompts.embeddings is None
        pieces = self._pieces(engine, prompts, requests, prefix, state, ended,
                              incoming if can_join else None, add, timing)
        try:
            yield from self._texts(pieces, requests, timing, decoders, counts, state, stops)
        finally:
            pieces.close()
            timing["host_s"] = round(time.perf_counter() - began - timing["prefill_s"]
                                     - timing["decode_s"] - timing["prompt_s"], 3)
            timing["prefill_s"] = round(timing["prefill_s"], 3)
            timing["decode_s"] = round(timing["decode_s"], 3)
        yield [("" if s is not None else d.flush(), s or LENGTH) for d, s in zip(decoders, state)]

    def _pieces(self, engine: Any, prompts: Any, requests: Sequence[Request], prefix: Any,
                state: list[str | None], ended: Callable[[], list[bool]],
                incoming: Callable[[int, int], Sequence[Request]] | None,
                add: Callable[[Sequence[Request]], list[int]],
                timing: dict[str, Any]) -> Iterator[list[list[int]]]:
        """``Engine.stream`` over the step API, dropping rows that ended and taking in
        ``incoming`` ones: each chunk, the new ids of every request (empty for rows no
        longer decoded). Batches are padded to a power of two (repeating the last row):
        1, 2, 4, 8... rows, so that few batch shapes are ever compiled."""
        n = len(requests)
        limit = max(r.max_new_tokens for r in requests)
        cap = limit if incoming is None else self.room(limit)
        sampling = requests[0].sampling
        size = batch_bucket(n, self.max_batch)
        ids = list(prompts.ids) + [prompts.ids[-1]] * (size - n)
        emb, img = prompts.embeddings, prompts.image_id
        if emb is not None and size > n:
            emb = np.concatenate([emb, np.repeat(emb[-1:], size - n, 0)])
            img = np.concatenate([img, np.repeat(img[-1:], size - n, 0)])
        st = engine.start(ids, max_new_tokens=cap, sampling=sampling, embeddings=emb,
                          image_id=img, prefix=prefix)
        live = [*range(n), *[n - 1] * (size - n)]  # request of each engine row
        emit = [0] * size  # per engine row: the first column not yet passed on
        while True:
            produced = min(st.step, cap)
            block = np.asarray(st.tokens[:, :produced]).tolist()
            piece: list[list[int]] = [[] for _ in requests]
            for i, r in enumerate(live):
                if i == live.index(r):  # rows repeated as padding: the first one
                    piece[r] = block[i][emit[i]:]
            emit = [produced] * len(live)
            yield piece
            if produced >= cap:
                return
            done = ended()
            going = [r for r in dict.fromkeys(live) if state[r] is None and not done[r]]
            free = self.max_batch - len(going)
            new: Sequence[Request] = []
            if incoming is not None and free > 0:  # a power of two of them fits
                new = list(incoming(1 << (free.bit_length() - 1), cap - produced + 1))
            if not going and not new:
                return
            size = batch_bucket(len(going) + batch_bucket(len(new), self.max_batch),
                                self.max_batch) if new else batch_bucket(len(going), len(live))
            if size != len(live) or new:
                rows = [live.index(r) for r in going] or [0]
                rows = (rows + [rows[-1]] * size)[:size]
                st = engine.keep(st, rows)
                live = [live[i] for i in rows]
                emit = [emit[i] for i in rows]
                if not new:
                    timing["shrunk"].append([produced, size])
            if new:
                st, live, emit = self._join(engine, st, live, emit, len(going), new,
                                            add(new), prefix, produced, timing)
            st = engine.decode(st, produced + self.chunk)

    def _join(self, engine: Any, st: Any, live: list[int], emit: list[int], going: int,
              new: Sequence[Request], idx: list[int], prefix: Any, produced: int,
              timing: dict[str, Any]) -> tuple[Any, list[int], list[int]]:
        """Prefill ``new`` (requests ``idx``; padded to a power of two by repeating the last)
        and join them into the rows after the first ``going`` ones of ``st``; their ids
        start at column ``produced - 1``."""
        limit = max(r.max_new_tokens for r in new)
        ids = list(self.prompts(new).ids)
        q = batch_bucket(len(ids), self.max_batch)
        fresh = engine.start(ids + [ids[-1]] * (q - len(ids)), max_new_tokens=limit,
                             sampling=new[0].sampling, prefix=prefix)
        places = list(range(going, going + q))
        st = engine.join(st, places, fresh)
        for p, r in zip(places, idx + [idx[-1]] * (q - len(idx))):
            live[p] = r
            emit[p] = produced - 1
        timing["joined"].append([produced, len(ids)])
        return st, live, emit

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
