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
