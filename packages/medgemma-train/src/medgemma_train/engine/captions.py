"""Caption manifests: image-text pairs for the ``siglip`` and ``pretrain`` stages.

A caption manifest is JSON lines or a CSV with ``path, caption`` (``text`` works as the
caption's name too) and optionally ``label`` (the row's class for zero-shot validation) and
``split``. Each ``path`` (relative to the manifest) is any file a medgemma-data plugin reads
(PNG, JPEG, DICOM, ...; third-party plugins included). A source is a caption manifest when
its ``kind`` is ``caption`` or, with ``kind: auto``, when its first row has a caption; any
other source is read as the ``sft`` stage reads it (chat, manifest, QA), so that pretraining
mixes image-caption pairs with text-only rows.

Bad rows (not JSON, no path, a missing file, an empty caption) are counted with their file and
line, as every source's are (:func:`~medgemma_train.engine.data.check_bad_rows`).
"""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

from .config import SourceConfig
from .data import BadRow, DataError, Example, Source, manifest_rows, read_source

__all__ = ["CaptionExample", "is_caption_source", "read_caption_source"]

CAPTION_KEYS = ("caption", "text")


@dataclasses.dataclass(frozen=True)
class CaptionExample(Example):
    """One image-caption pair: ``load_path`` the image file, ``answer`` the caption,
    ``label`` its class (zero-shot validation; "" when the manifest has none)."""

    label: str = ""


def _caption(row: dict) -> str:
    for key in CAPTION_KEYS:
        if row.get(key) is not None:
            return str(row[key]).strip()
    return ""


def is_caption_source(cfg: SourceConfig) -> bool:
    """``kind: caption``, or ``auto`` and the first row holds ``path`` and a caption."""
    if cfg.kind == "caption":
        return True
    path = Path(cfg.path).expanduser()
    if cfg.kind != "auto" or not path.is_file() or path.suffix.lower() == ".json":
        return False
    if path.suffix.lower() == ".csv":
        with open(path, encoding="utf-8", errors="replace") as f:
            header = next(csv.reader(f), [])
        return "path" in header and any(k in header for k in CAPTION_KEYS)
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip():
                try:
                    first = json.loads(line)
                except json.JSONDecodeError:
                    return False
                return (isinstance(first, dict) and "path" in first
                        and any(k in first for k in CAPTION_KEYS) and "messages" not in first)
    return False


def read_caption_source(cfg: SourceConfig, index: int = 0) -> Source:
    """One configured source: a caption manifest (see the module docstring) or, for any
    other kind, :func:`~medgemma_train.engine.data.read_source`."""
    if not cfg.path:
        raise DataError("a data source has no path; set data.train (e.g. --data captions.jsonl)")
    path = Path(cfg.path).expanduser()
    if not path.exists():
        raise DataError(f"data file {path} not found; check the path (--data / data.train)")
    if path.is_file() and path.stat().st_size == 0:
        raise DataError(f"data file {path} is empty")
    if not is_caption_source(cfg):
        return read_source(cfg, index)
    good: list[Example] = []
    bad: list[BadRow] = []
    for n, row in manifest_rows(path, "path, caption"):
        where = f"{path}:{n}"
        if isinstance(row, BadRow):
            bad.append(row)
            continue
        if not isinstance(row, dict) or not isinstance(row.get("path"), str) or not row["path"]:
            bad.append(BadRow(where, "expected path, caption"))
            continue
        if cfg.split and str(row.get("split", "")) != cfg.split:
            continue
        caption = _caption(row)
        if not caption:
            bad.append(BadRow(where, "empty caption"))
            continue
        p = Path(row["path"]).expanduser()
        p = p if p.is_absolute() else path.parent / p
        if not p.exists():
            bad.append(BadRow(where, f"file {p} not found"))
            continue
        good.append(CaptionExample(where, load_path=str(p), question=cfg.question,
                                   answer=caption, modality=cfg.modality,
                                   options=tuple(sorted(cfg.options.items())), images=-1,
                                   label=str(row.get("label") or "").strip()))
    name = cfg.name or path.stem or f"source{index}"
    return Source(name, str(path), "caption", float(cfg.weight), tuple(good), tuple(bad))
