"""Rows longer than ``data.seq_len``: found at start-up, before anything compiles.

Every row is padded or cut to ``data.seq_len`` tokens. :func:`scan_lengths` tokenizes the
rows whose messages are known (chat and QA rows: the chat template, each image counted as its
soft tokens without decoding it) and sorts the long ones into

* **cut** rows: longer than ``seq_len`` but some of their final answer survives the cut
  (reported in one warning line with the count, the first ``file:line`` and the fix, raise
  ``data.seq_len``);
* **bad** rows: the whole final answer (or an image) lies past ``seq_len``. Such a row would
  train on nothing (``data.mask_prompt``) or on its prompt alone, so it is a bad row like a
  missing image: an error naming it unless ``--skip-bad`` drops it.

Manifest rows (files read by a medgemma-data plugin) are checked the same way when they are
encoded (:meth:`~medgemma_train.engine.pipeline.Encoder.process`), since their images are only
known once loaded; pan-and-scan crops are likewise counted only then (the scan counts each image
without its crops).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from .data import BadRow, DataError, Source

__all__ = ["LengthReport", "drop_bad_lengths", "scan_lengths"]


@dataclasses.dataclass(frozen=True)
class LengthReport:
    """``cut``: ``(file:line, tokens)`` of every row longer than ``seq_len`` (the bad ones
    included); ``bad``: the rows whose whole answer (or an image) is past ``seq_len``;
    ``lengths``: per source, each row's token count (None where not known up front)."""

    seq_len: int
    scanned: int
    cut: tuple[tuple[str, int], ...]
    bad: tuple[BadRow, ...]
    lengths: tuple[tuple[int | None, ...], ...]
    bad_index: tuple[tuple[int, int], ...] = ()  # (source, row) of each bad row

    @property
    def longest(self) -> int:
        return max((n for ls in self.lengths for n in ls if n is not None), default=0)

    def warning(self) -> str | None:
        """One line, or None when no row is cut."""
        if not self.cut:
            return None
        where, n = self.cut[0]
        lost = (f"; {len(self.bad)} of them are bad rows (their answer or an image is past "
                f"the cut)" if self.bad else "")
        return (f"warning: {len(self.cut)} of {self.scanned} row(s) are longer than "
                f"data.seq_len={self.seq_len} and are cut (first {where}: {n} tokens; the "
                f"longest has {self.longest}){lost}; raise data.seq_len (--seq-len "
                f"{_round_up(self.longest)}) to keep them whole")

    def as_dict(self) -> dict:
        return {"cut_rows": len(self.cut), "cut_first": self.cut[0][0] if self.cut else None,
                "answer_cut_rows": len(self.bad), "longest_row_tokens": self.longest}


def _round_up(n: int) -> int:
    return -(-n // 64) * 64


def scan_lengths(encoder: Any, sources: Sequence[Source]) -> LengthReport:
    """Token counts of every row of ``sources`` through ``encoder`` (an
    :class:`~medgemma_train.engine.pipeline.Encoder`); see the module docstring."""
    seq_len = encoder.seq_len
    cut: list[tuple[str, int]] = []
    bad: list[BadRow] = []
    lengths = []
    index: list[tuple[int, int]] = []
    scanned = 0
    tok = encoder.processor.tokenizer
    for i, s in enumerate(sources):
        ls: list[int | None] = []
        texts = [encoder.token_text(ex) for ex in s.examples]
        known = [t for t in texts if t is not None]
        encoded = iter(tok.encode_batch(known) if known else [])  # SentencePiece's threads
        for j, (ex, text) in enumerate(zip(s.examples, texts, strict=True)):
            ids = None if text is None else next(encoded)
            ls.append(None if ids is None else len(ids))
            if ids is None:
                continue
            scanned += 1
            if len(ids) <= seq_len:
                continue
            cut.append((ex.where, len(ids)))
            problem = encoder.cut_problem(ids)
            if problem:
                bad.append(BadRow(ex.where, problem))
                index.append((i, j))
        lengths.append(tuple(ls))
    return LengthReport(seq_len, scanned, tuple(cut), tuple(bad), tuple(lengths), tuple(index))


def drop_bad_lengths(sources: Sequence[Source], report: LengthReport, *, skip_bad: bool
                     ) -> tuple[list[Source], list[tuple[int | None, ...]]]:
    """The sources without the report's bad rows (they join each source's ``bad``) and the
    kept rows' lengths, or a :class:`DataError` (one line) when there are bad rows and
    ``skip_bad`` is off."""
    if not report.bad:
        return list(sources), list(report.lengths)
    if not skip_bad:
        first = report.bad[0]
        more = f" (and {len(report.bad) - 1} more)" if len(report.bad) > 1 else ""
        raise DataError(f"{len(report.bad)} bad data row(s) at data.seq_len={report.seq_len}: "
                        f"{first}{more}; raise data.seq_len (the longest row has "
                        f"{report.longest} tokens) or pass --skip-bad to drop them")
    gone = dict(zip(report.bad_index, report.bad, strict=True))
    out, lengths = [], []
    for i, s in enumerate(sources):
        kept = tuple(ex for j, ex in enumerate(s.examples) if (i, j) not in gone)
        lost = tuple(gone[i, j] for j in range(len(s.examples)) if (i, j) in gone)
        out.append(dataclasses.replace(s, examples=kept, bad=s.bad + lost))
        lengths.append(tuple(n for j, n in enumerate(report.lengths[i]) if (i, j) not in gone))
        if not kept:
            raise DataError(f"data source {s.name} ({s.path}) has no usable rows at "
                            f"data.seq_len={report.seq_len}; raise data.seq_len")
    return out, lengths
