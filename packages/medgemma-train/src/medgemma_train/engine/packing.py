"""Packing of text-only rows (``data.pack``, ``--pack``): several short rows per sequence.

The plan is made once, at start-up, from the row lengths that
:func:`~medgemma_train.engine.lengths.scan_lengths` measured: each source's rows are put in a
seeded order (``data.seed``) and placed first-fit (among the last :data:`WINDOW` open
sequences) into sequences of ``data.seq_len`` tokens; a row longer than that counts as cut to
it, and a row whose length is not known up front (a manifest row) gets a sequence of its own.
Each planned sequence is then one item of the grain pipeline: the sequences are shuffled per
epoch, mixed by the sources' weights and batched as rows are without packing, so the
iterator's state checkpoints and resumes the same way. A step takes
``batch_size * grad_accum`` sequences; steps per epoch count sequences.

Encoding a sequence encodes its rows as :meth:`Encoder.process` does (``mask_prompt``, the
cut at ``seq_len``, bad rows) and lays them out with :func:`medgemma_core.training.pack_rows`
(``segment_ids``: each row attended, positioned and scored as if alone). The same rows thus
give the same loss per token packed or not. Only text-only models pack: an image-text
checkpoint with ``data.pack`` is an error (its rows carry images, which packed batches do not
hold). Validation batches are never packed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from .data import Source

__all__ = ["WINDOW", "pack_sources", "plan_packs"]

#: open sequences a row may join (first-fit among the most recently opened ones)
WINDOW = 64


def plan_packs(lengths: Sequence[int | None], seq_len: int, order: Sequence[int]
               ) -> list[tuple[int, ...]]:
    """Rows (indices into ``lengths``, taken in ``order``) grouped into sequences of at most
    ``seq_len`` tokens, first-fit among the last :data:`WINDOW` open ones. A length of None
    (unknown) gets a sequence of its own; a longer row counts as ``seq_len``."""
    bins: list[list[int]] = []
    room: list[int] = []
    open_: list[int] = []
    for i in order:
        n = lengths[i]
        if n is None:
            bins.append([int(i)])
            room.append(0)
            continue
        n = min(int(n), seq_len)
        for j in open_:
            if room[j] >= n:
                bins[j].append(int(i))
                room[j] -= n
                if room[j] == 0:
                    open_.remove(j)
                break
        else:
            bins.append([int(i)])
            room.append(seq_len - n)
            if room[-1] > 0:
                open_.append(len(bins) - 1)
                if len(open_) > WINDOW:
                    open_.pop(0)
    return [tuple(b) for b in bins]


def pack_sources(sources: Sequence[Source], lengths: Sequence[Sequence[int | None]],
                 seq_len: int, seed: int) -> tuple[list[Source], dict]:
    """Each source with its ``examples`` replaced by planned sequences (tuples of examples),
    and the plan's counts for the run's plan (``rows``, ``sequences``, ``fill``: the share of
    the sequences' tokens that rows fill)."""
    out, rows, seqs, tokens = [], 0, 0, 0
    for i, (s, ls) in enumerate(zip(sources, lengths, strict=True)):
        order = np.random.default_rng(seed + 104729 * i).permutation(len(s.examples))
        plan = plan_packs(ls, seq_len, order)
        out.append(dataclasses.replace(s, examples=tuple(tuple(s.examples[j] for j in b)
                                                         for b in plan)))
        rows += len(s.examples)
        seqs += len(plan)
        tokens += sum(min(n, seq_len) for n in ls if n is not None)
    fill = tokens / max(1, seqs * seq_len)
    return out, {"rows": rows, "sequences": seqs, "fill": round(fill, 4)}


def encode_packs(encoder: Any, packs: Sequence[tuple], accum: int) -> dict:
    """This process's planned sequences of a step -> ``tokens``, ``labels``,
    ``attention_mask``, ``segment_ids`` ``[A, b, T]`` (see the module docstring)."""
    from medgemma_core.processor import IGNORE_INDEX
    from medgemma_core.training import pack_rows

    proc, t = encoder.processor, encoder.seq_len
    out: dict[str, list] = {"tokens": [], "labels": [], "attention_mask": [], "segment_ids": []}
    for pack in packs:
        rows = []
        for ex in pack:
            p, ok = encoder._safe(ex)
            if not ok:
                continue
            c = proc.collate([p], max_length=t, mask_prompt=encoder.mask_prompt)
            n = int(c.attention_mask[0].sum())
            rows.append((c.input_ids[0, :n], c.labels[0, :n]))
        if not rows:  # every row of it was bad (and skipped): one token with no loss
            rows = [(np.asarray([proc.pad_id]), np.asarray([IGNORE_INDEX]))]
        ids, labels, mask, seg = pack_rows(rows, t, proc.pad_id)
        if len(ids) != 1:
            raise AssertionError(f"a planned sequence of {len(pack)} rows did not fit "
                                 f"data.seq_len={t}")
        for k, v in zip(out, (ids, labels, mask, seg), strict=True):
            out[k].append(v[0])
    b = len(packs) // accum
    return {k: np.stack(v).reshape(accum, b, t) for k, v in out.items()}
