"""grain pipelines: rows -> fixed-shape :class:`~medgemma_core.training.TrainBatch` es.

Training: each source is shuffled by the seed and repeated (reshuffled each epoch), the
sources are mixed by weight (``MapDataset.mix``: a small set repeats rather than ending the
mixture), ``batch_size * grad_accum`` rows are taken per step, and this process encodes its
share of them (``Processor`` + ``Processor.collate`` + ``TrainBatch.from_collated``): arrays
``[grad_accum, batch_size / processes, seq_len]`` (images ``[..., slots, S, S, 3]``). The
iterator's state (:meth:`Pipeline.get_state`) goes into the checkpoint, so a resumed run
sees exactly the rows it would have seen.

Evaluation: every row once, in order; the last batch is filled with rows that carry no loss.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from .data import BadRow, DataError, Example, Source

__all__ = ["Encoder", "EvalPipeline", "Pipeline", "mixture_table"]


class Encoder:
    """Rows -> this process's fixed-shape arrays of a step: a dict with TrainBatch's fields
    (``tokens``, ``labels``, ``attention_mask`` ``[A, b, T]``; ``pixels``, ``image_mask`` for
    image-text models), ``A`` micro-batches of ``b`` rows. Given tuples of rows (the planned
    sequences of ``data.pack``, :mod:`.packing`), one packed sequence per tuple, with
    ``segment_ids``.

    ``image_text``: the model reads images (else image parts are dropped, as
    ``to_messages(images=False)``); ``slots``: image slots per row."""

    def __init__(self, processor: Any, *, seq_len: int, slots: int, image_text: bool,
                 mask_prompt: bool = False, system: str = "", skip_bad: bool = False):
        self.processor = processor
        self.seq_len = int(seq_len)
        self.slots = int(slots) if image_text else 0
        self.image_text = image_text
        self.mask_prompt = mask_prompt
        self.system = system
        self.skip_bad = skip_bad
        self.bad: list[BadRow] = []
        self._marker: list[int] | None = None

    def messages(self, ex: Example) -> list[dict]:
        if ex.messages:
            msgs = [dict(m) for m in ex.messages]
            if not self.image_text:
                for m in msgs:
                    if isinstance(m["content"], list):
                        m["content"] = "\n\n".join(i["text"] for i in m["content"]
                                                   if i.get("type") == "text")
        else:
            import medgemma_data

            samples = medgemma_data.load(ex.load_path, modality=ex.modality or None,
                                         options=dict(ex.options) or None)
            msgs = medgemma_data.to_messages(samples, ex.question, answer=ex.answer,
                                             images=self.image_text)
        if self.system and msgs[0]["role"] != "system":
            msgs = [{"role": "system", "content": self.system}, *msgs]
        return msgs

    def process(self, ex: Example) -> Any:
        """One row -> ``Processed`` (or raises DataError naming the row)."""
        try:
            p = self.processor(self.messages(ex), add_generation_prompt=False)
        except Exception as exc:  # noqa: BLE001 (decoder errors name the row)
            raise DataError(f"{ex.where}: {type(exc).__name__}: {str(exc)[:160]}") from None
        n = len(p.pixel_values)
        if n > self.slots and self.image_text:
            raise DataError(f"{ex.where}: {n} images but data.image_slots={self.slots}; raise "
                            f"data.image_slots")
        problem = self.cut_problem(p.input_ids)
        if problem:
            raise DataError(f"{ex.where}: {problem}; raise data.seq_len")
        return p

    def token_text(self, ex: Example) -> str | None:
        """The text whose tokens :meth:`process` makes of the row, each image as its soft
        tokens (no pan-and-scan crops; nothing decoded); None for a manifest row (its images
        are known once loaded)."""
        if not ex.messages:
            return None
        from medgemma_core.chat import BOI, format_chat

        text = format_chat(self.messages(ex), add_generation_prompt=False)
        return text.replace(BOI, self.processor.image_sequence) if self.image_text else text

    def token_ids(self, ex: Example) -> list[int] | None:
        """:meth:`token_text`'s token ids (None for a manifest row)."""
        text = self.token_text(ex)
        return None if text is None else self.processor.tokenizer.encode(text)

    def answer_start(self, ids: Sequence[int]) -> int | None:
        """The index of the final answer's first token (just after the last
        ``<start_of_turn>model\\n``), as ``Processor.collate(mask_prompt=True)`` finds it."""
        if self._marker is None:
            self._marker = list(self.processor.tokenizer.encode("<start_of_turn>model\n"))
        k = len(self._marker)
        ids = list(ids)
        for i in range(len(ids) - k, -1, -1):
            if ids[i:i + k] == self._marker:
                return i + k
        return None

    def cut_problem(self, ids: Sequence[int]) -> str | None:
        """Why cutting ``ids`` to ``seq_len`` makes the row bad (None when it does not): an
        image past the cut, or the whole final answer past it (the token at ``seq_len - 1`` is
        the last one the loss predicts)."""
        n, t = len(ids), self.seq_len
        if n <= t:
            return None
        if self.image_text and self.processor.image_token_id in list(ids[t:]):
            return f"{n} tokens; cutting it to data.seq_len={t} would cut an image"
        start = self.answer_start(ids)
        if start is not None and start >= t:
            return (f"{n} tokens and its answer starts at token {start}: cut to data.seq_len="
                    f"{t} it has no answer left")
        return None

    def _safe(self, ex: Example) -> tuple[Any, bool]:
        try:
            return self.process(ex), True
        except DataError as exc:
            if not self.skip_bad:
                raise
            self.bad.append(BadRow(ex.where, str(exc).split(": ", 1)[-1]))
            return None, False

    def __call__(self, rows: Sequence[Example], accum: int = 1) -> Any:
        from medgemma_core.processor import IGNORE_INDEX
        from medgemma_core.training import TrainBatch

        if rows and isinstance(rows[0], tuple):  # planned sequences of packed rows
            from .packing import encode_packs

            return encode_packs(self, rows, accum)
        done = [self._safe(ex) for ex in rows]
        filler = next((p for p, ok in done if ok), None)
        if filler is None:
            raise DataError(f"every row of a batch failed (first: {rows[0].where}); "
                            f"check the data")
        processed = [p if ok else filler for p, ok in done]
        batch = self.processor.collate(processed, max_length=self.seq_len,
                                       pad_to_multiple_of=self.seq_len,
                                       mask_prompt=self.mask_prompt)
        for r, (_, ok) in enumerate(done):
            if not ok:  # a dropped row keeps its place but carries no loss
                batch.labels[r] = IGNORE_INDEX
        tb = TrainBatch.from_collated(batch, slots=self.slots,
                                      mm_tokens_per_image=self.processor.config.mm_tokens_per_image
                                      if self.image_text else None,
                                      image_token_id=self.processor.image_token_id)
        b = len(rows) // accum

        out = {}
        for f in dataclasses.fields(tb):
            x = getattr(tb, f.name)
            if x is not None:
                out[f.name] = np.asarray(x).reshape(accum, b, *np.shape(x)[1:])
        return out


def _local_rows(rows: Sequence[Any], accum: int, batch: int, process: int, processes: int
                ) -> list[Any]:
    """This process's rows of a global step: micro-batch ``a`` is rows ``a*B .. a*B+B``;
    process ``p`` holds ``B/P`` consecutive rows of each."""
    share = batch // processes
    out = []
    for a in range(accum):
        start = a * batch + process * share
        out += list(rows[start:start + share])
    return out


class Pipeline:
    """The training batches of a mixture of sources (infinite; see the module docstring).
    ``encoder(rows, accum) -> dict of arrays``: an :class:`Encoder` or a stage's own
    (:class:`~medgemma_train.engine.stages.DataSpec`)."""

    def __init__(self, sources: Sequence[Source], encoder: Any, *, batch_size: int,
                 accum: int = 1, seed: int = 0, process: int = 0, processes: int = 1):
        import grain

        if batch_size % processes:
            raise DataError(f"data.batch_size={batch_size} does not divide among "
                            f"{processes} processes; make it a multiple of {processes}")
        self.sources = list(sources)
        self.encoder = encoder
        self.batch_size, self.accum = int(batch_size), int(accum)
        self.process, self.processes = process, processes
        parts = [grain.MapDataset.source(list(s.examples)).shuffle(seed=seed + 7919 * i)
                 .repeat(None) for i, s in enumerate(self.sources)]
        ds = parts[0] if len(parts) == 1 else grain.MapDataset.mix(
            parts, [s.weight for s in self.sources])
        per_step = self.batch_size * self.accum
        ds = ds.batch(per_step, drop_remainder=True, batch_fn=list)
        ds = ds.map(lambda rows: self.encoder(
            _local_rows(rows, self.accum, self.batch_size, self.process, self.processes),
            self.accum))
        self._dataset = ds.to_iter_dataset()
        self._iter = iter(self._dataset)

    @property
    def rows(self) -> int:
        return sum(len(s.examples) for s in self.sources)

    def steps_per_epoch(self) -> int:
        return max(1, math.ceil(self.rows / (self.batch_size * self.accum)))

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        return next(self._iter)

    def get_state(self) -> dict:
        return dict(self._iter.get_state())

    def set_state(self, state: dict) -> None:
        self._iter.set_state(state)


class EvalPipeline:
    """Every row of the eval sources once, in order, ``batch_size`` rows per batch.

    ``pad``: the last batch is filled with copies whose labels carry no loss; ``pad=False``
    (a stage's own encoder, whose batches have no labels to mask) leaves the rows past the
    last whole batch out instead."""

    def __init__(self, sources: Sequence[Source], encoder: Any, *, batch_size: int,
                 process: int = 0, processes: int = 1, pad: bool = True):
        self.rows = [ex for s in sources for ex in s.examples]
        self.encoder, self.batch_size = encoder, int(batch_size)
        self.process, self.processes = process, processes
        self.pad = pad

    def __iter__(self) -> Iterator[Any]:
        from medgemma_core.processor import IGNORE_INDEX

        b = self.batch_size
        for start in range(0, len(self.rows), b):
            rows = self.rows[start:start + b]
            real = len(rows)
            if real < b and not self.pad:
                break
            rows = rows + [rows[0]] * (b - real)
            local = _local_rows(rows, 1, b, self.process, self.processes)
            batch = self.encoder(local, 1)
            share = b // self.processes
            first = self.process * share
            mask = np.arange(first, first + share) >= real
            if mask.any():
                batch["labels"][0, mask] = IGNORE_INDEX
            yield batch


def mixture_table(sources: Sequence[Source], rows_per_step: int, steps: int) -> list[dict]:
    """Per source: rows, weight share, rows seen in ``steps`` and the epochs that makes."""
    total_w = sum(s.weight for s in sources) or 1.0
    out = []
    for s in sources:
        share = s.weight / total_w
        seen = share * rows_per_step * steps
        out.append({"name": s.name, "path": s.path, "kind": s.kind, "rows": len(s.examples),
                    "bad_rows": len(s.bad), "weight": round(share, 4),
                    "rows_seen": int(round(seen)),
                    "epochs": round(seen / max(1, len(s.examples)), 3)})
    return out
