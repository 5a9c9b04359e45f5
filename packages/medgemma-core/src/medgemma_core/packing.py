"""Packing of text-only training rows: several short rows in one sequence of ``seq_len``.

:func:`pack_rows` places rows first-fit in the order given (a row goes to the first packed
sequence with room for it, else opens a new one): deterministic, and it depends only on the
row lengths. The result feeds :class:`~medgemma_core.training.TrainBatch` with
``segment_ids``: the decoder restarts RoPE positions at each segment and lets a token see only
earlier tokens of its own segment; the loss never scores a segment's first token from the
previous segment's last position. Re-exported as ``medgemma_core.training.pack_rows``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .processor import IGNORE_INDEX

__all__ = ["check_segment_ids", "pack_rows"]


def pack_rows(rows: Sequence[tuple[Sequence[int], Sequence[int]]], seq_len: int,
              pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Pack ``rows`` of ``(input_ids, labels)`` (input-aligned labels, ``< 0``: no loss) into
    ``N`` sequences of ``seq_len``. Returns int32 ``input_ids, labels, attention_mask,
    segment_ids``, each ``[N, seq_len]``: segment ``1..n`` are the rows of a sequence in the
    order placed, ``0`` the right padding (``pad_id``, label ``IGNORE_INDEX``, mask 0). Each
    segment's first label is ``IGNORE_INDEX`` (never scored: an unpacked row's first token is
    not predicted either)."""
    seq_len = int(seq_len)
    if seq_len < 1:
        raise ValueError(f"seq_len must be a positive number of tokens, got {seq_len}")
    bins: list[list[int]] = []  # row numbers per packed sequence
    room: list[int] = []
    lengths = []
    for i, (ids, labels) in enumerate(rows):
        n = len(ids)
        if len(labels) != n:
            raise ValueError(f"row {i} has {n} input ids but {len(labels)} labels; give labels "
                             f"aligned with the input ids (IGNORE_INDEX where no loss)")
        if n == 0:
            raise ValueError(f"row {i} is empty; drop empty rows before packing")
        if n > seq_len:
            raise ValueError(f"row {i} has {n} tokens, more than seq_len={seq_len}; raise "
                             f"seq_len or truncate rows to at most {seq_len} tokens first")
        lengths.append(n)
        for j, free in enumerate(room):
            if free >= n:
                bins[j].append(i)
                room[j] -= n
                break
        else:
            bins.append([i])
            room.append(seq_len - n)
    shape = (len(bins), seq_len)
    input_ids = np.full(shape, pad_id, np.int32)
    out_labels = np.full(shape, IGNORE_INDEX, np.int32)
    mask = np.zeros(shape, np.int32)
    segments = np.zeros(shape, np.int32)
    for r, members in enumerate(bins):
        at = 0
        for s, i in enumerate(members, start=1):
            ids, labels = rows[i]
            n = lengths[i]
            input_ids[r, at:at + n] = np.asarray(ids, np.int64)
            out_labels[r, at:at + n] = np.asarray(labels, np.int64)
            out_labels[r, at] = IGNORE_INDEX
            mask[r, at:at + n] = 1
            segments[r, at:at + n] = s
            at += n
    return input_ids, out_labels, mask, segments


def check_segment_ids(segment_ids: np.ndarray) -> None:
    """Raise unless every row's nonzero segment ids are non-decreasing (each segment one
    contiguous run) and none is negative."""
    seg = np.asarray(segment_ids)
    if seg.size and seg.min() < 0:
        raise ValueError("segment_ids must be >= 0 (0 = padding); build them with pack_rows")
    for r, row in enumerate(seg):
        real = row[row > 0]
        if np.any(np.diff(real) < 0):
            raise ValueError(f"row {r}: segment_ids must number the packed sequences 1..n in "
                             f"order, each one contiguous run; build them with pack_rows")
