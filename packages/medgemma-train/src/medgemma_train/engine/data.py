"""Training rows from files: chat JSONL, label manifests over medgemma-data plugins, QA sets.

Every source is read and checked up front (:func:`read_source`): a row that does not parse,
has no answer, or names an image file that is missing or unreadable is a :class:`BadRow`
with its file and line. :func:`check_bad_rows` turns them into one :class:`DataError` line
(the run stops before it starts) unless ``skip_bad`` drops them.

* ``chat``: JSON lines ``{"messages": [{"role": "user", "content": [{"type": "image",
  "image": "cxr/1.png"}, {"type": "text", "text": "Findings?"}]}, {"role": "assistant",
  "content": "..."}]}``; image paths are relative to the file's folder (``path`` works
  as the key too).
* ``manifest``: JSONL or CSV with ``path, question, answer`` and optional ``split``; each
  ``path`` (relative to the manifest) is read by the medgemma-data plugin that claims it
  (or ``modality``), so DICOMs, series folders, slides and third-party formats all work.
* ``qa``: a QA set medgemma-data parses (MedQA-style JSON lines, VQA JSON); the answer is
  each item's label.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .config import SourceConfig

__all__ = ["BadRow", "DataError", "Example", "Source", "check_bad_rows", "read_source",
           "source_kind"]


class DataError(ValueError):
    """Bad training data (one line naming the file, line and fix)."""


@dataclasses.dataclass(frozen=True)
class BadRow:
    where: str  # "file:line"
    reason: str

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


@dataclasses.dataclass(frozen=True)
class Example:
    """One training row: ``messages`` (chat format; image items hold paths) or a file to load
    through medgemma-data (``load_path`` + ``question`` + ``answer``). ``where``: file:line."""

    where: str
    messages: tuple = ()
    load_path: str = ""
    question: str = ""
    answer: str = ""
    modality: str = ""
    options: tuple = ()
    images: int = 0


@dataclasses.dataclass(frozen=True)
class Source:
    name: str
    path: str
    kind: str
    weight: float
    examples: tuple[Example, ...]
    bad: tuple[BadRow, ...]


def source_kind(path: Path, given: str = "auto") -> str:
    """``chat``, ``manifest`` or ``qa`` from the configured kind or the file's first row."""
    if given != "auto":
        if given not in ("chat", "manifest", "qa"):
            raise DataError(f"data source kind {given!r}: use chat, manifest, qa or auto")
        return given
    if path.suffix.lower() == ".csv":
        return "manifest"
    if path.suffix.lower() == ".json":
        return "qa"
    first = None
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip():
                try:
                    first = json.loads(line)
                except json.JSONDecodeError:
                    first = None
                break
    if isinstance(first, dict):
        if "messages" in first:
            return "chat"
        if {"question", "options"} <= set(first):
            return "qa"
        if "path" in first:
            return "manifest"
    raise DataError(f"{path}: cannot tell its kind from the first row (a chat row has "
                    f"'messages', a manifest row 'path, question, answer', a QA row "
                    f"'question, options'); set kind: chat|manifest|qa for this source")


def _image_ok(path: Path) -> str | None:
    """None when ``path`` is a readable image file, else the reason."""
    if not path.is_file():
        return f"image {path} not found"
    try:
        from PIL import Image

        with Image.open(path) as im:
            im.size  # noqa: B018 (reads the header)
    except Exception as exc:  # noqa: BLE001 (any decoder error is a bad row)
        return f"image {path} cannot be read ({type(exc).__name__}: {str(exc)[:80]})"
    return None


def _chat_row(row: Any, base: Path, where: str) -> Example | BadRow:
    from medgemma_core.chat import format_chat

    if not isinstance(row, dict) or not isinstance(row.get("messages"), list):
        return BadRow(where, "expected an object with a 'messages' list")
    messages = []
    images = 0
    for m in row["messages"]:
        if not isinstance(m, dict):
            return BadRow(where, "each message must be an object with role and content")
        content = m.get("content")
        if isinstance(content, list):
            items = []
            for item in content:
                if isinstance(item, dict) and item.get("type") == "image":
                    ref = item.get("image", item.get("path"))
                    if not isinstance(ref, str) or not ref:
                        return BadRow(where, "an image item needs a file path under 'image'")
                    p = Path(ref).expanduser()
                    p = p if p.is_absolute() else base / p
                    problem = _image_ok(p)
                    if problem:
                        return BadRow(where, problem)
                    items.append({"type": "image", "image": str(p)})
                    images += 1
                else:
                    items.append(item)
            content = items
        messages.append({**m, "content": content})
    try:
        format_chat(messages, add_generation_prompt=False)
    except ValueError as exc:
        return BadRow(where, str(exc))
    last = messages[-1] if messages else {}
    if last.get("role") not in ("assistant", "model"):
        return BadRow(where, "the last message must be the assistant's answer")
    answer = last.get("content")
    text = answer if isinstance(answer, str) else " ".join(
        i.get("text", "") for i in answer if isinstance(i, dict))
    if not text.strip():
        return BadRow(where, "empty answer")
    return Example(where, messages=tuple(messages), images=images)


def manifest_rows(path: Path, columns: str = "path, question, answer (and optionally split)"
                  ) -> list[tuple[int, Any]]:
    """``(line number, row)`` of a JSONL or CSV manifest; a line that is not JSON is a
    ``BadRow``. ``columns`` names the header a CSV needs (in the error when it lacks ``path``)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text; save it as UTF-8") from None
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        if not reader.fieldnames or "path" not in reader.fieldnames:
            raise DataError(f"{path}: a CSV manifest needs a header with {columns}")
        return [(n + 2, row) for n, row in enumerate(reader)]
    out: list[tuple[int, Any]] = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append((n, json.loads(line)))
        except json.JSONDecodeError as exc:
            out.append((n, BadRow(f"{path}:{n}", f"not JSON ({exc.msg})")))
    return out


def _manifest_row(row: Any, base: Path, where: str, cfg: SourceConfig) -> Example | BadRow:
    if not isinstance(row, dict) or not isinstance(row.get("path"), str) or not row["path"]:
        return BadRow(where, "expected path, question, answer")
    answer = row.get("answer")
    if answer is None or not str(answer).strip():
        return BadRow(where, "empty answer")
    p = Path(row["path"]).expanduser()
    p = p if p.is_absolute() else base / p
    if not p.exists():
        return BadRow(where, f"file {p} not found")
    question = str(row.get("question") or cfg.question or "")
    return Example(where, load_path=str(p), question=question, answer=str(answer).strip(),
                   modality=cfg.modality, options=tuple(sorted(cfg.options.items())), images=-1)


def _qa_examples(path: Path, cfg: SourceConfig) -> tuple[list[Example], list[BadRow]]:
    import medgemma_data

    try:
        samples = medgemma_data.load(path, modality=cfg.modality or "qa",
                                     options=cfg.options or None)
    except medgemma_data.MedgemmaDataError as exc:
        return [], [BadRow(str(path), str(exc))]
    good, bad = [], []
    for s in samples:
        where = s.provenance.source
        if not s.label or not str(s.label).strip():
            bad.append(BadRow(where, "no answer (label) in this QA item"))
            continue
        question = "\n\n".join(t for t in s.texts if t.strip())
        images = tuple(s.images)
        messages: list[dict] = [{"role": "user", "content": question}]
        if images:
            messages = [{"role": "user", "content": [{"type": "text", "text": question},
                                                     *({"type": "image", "image": im}
                                                       for im in images)]}]
        messages.append({"role": "assistant", "content": str(s.label).strip()})
        good.append(Example(where, messages=tuple(messages), images=len(images)))
    return good, bad


def read_source(cfg: SourceConfig, index: int = 0) -> Source:
    """Read and check every row of one configured source (images opened, not decoded)."""
    if not cfg.path:
        raise DataError("a data source has no path; set data.train (e.g. --data train.jsonl)")
    path = Path(cfg.path).expanduser()
    if not path.exists():
        raise DataError(f"data file {path} not found; check the path (--data / data.train)")
    if path.is_file() and path.stat().st_size == 0:
        raise DataError(f"data file {path} is empty")
    kind = source_kind(path, cfg.kind) if path.is_file() else "qa"
    name = cfg.name or path.stem or f"source{index}"
    good: list[Example] = []
    bad: list[BadRow] = []
    if kind == "qa":
        good, bad = _qa_examples(path, cfg)
    elif kind == "chat":
        with open(path, "rb") as f:
            raw_lines = f.read().splitlines()
        for n, raw in enumerate(raw_lines, start=1):
            where = f"{path}:{n}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                bad.append(BadRow(where, "not UTF-8 text"))
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                bad.append(BadRow(where, f"not JSON ({exc.msg})"))
                continue
            out = _chat_row(row, path.parent, where)
            (bad if isinstance(out, BadRow) else good).append(out)
    else:
        for n, row in manifest_rows(path):
            if isinstance(row, BadRow):
                bad.append(row)
                continue
            if cfg.split and isinstance(row, dict) and str(row.get("split", "")) != cfg.split:
                continue
            out = _manifest_row(row, path.parent, f"{path}:{n}", cfg)
            (bad if isinstance(out, BadRow) else good).append(out)
    return Source(name, str(path), kind, float(cfg.weight), tuple(good), tuple(bad))


def check_bad_rows(sources: Sequence[Source], *, skip_bad: bool) -> list[BadRow]:
    """Every bad row; a :class:`DataError` (one line) unless ``skip_bad``. A source left with
    no rows is an error either way."""
    bad = [b for s in sources for b in s.bad]
    if bad and not skip_bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise DataError(f"{len(bad)} bad data row(s): {bad[0]}{more}; fix them or pass "
                        f"--skip-bad to drop them")
    for s in sources:
        if not s.examples:
            raise DataError(f"data source {s.name} ({s.path}) has no usable rows")
    return bad


def medical_mixture(sources: list[Source], share: float) -> tuple[list[Source], bool]:
    """The report's default mixture: when no source was given a weight (all 1.0) and some
    sources are named ``medical...`` and some not, the medical ones together get ``share`` of
    the draws (split evenly among them) and the rest ``1 - share``. Otherwise the sources
    unchanged. Returns ``(sources, applied)``."""
    import dataclasses as dc

    medical = [s.name.lower().startswith("medical") for s in sources]
    if not (0.0 < share < 1.0) or all(medical) or not any(medical) or any(
            s.weight != 1.0 for s in sources):
        return sources, False
    n_med = sum(medical)
    n_gen = len(sources) - n_med
    out = [dc.replace(s, weight=share / n_med if m else (1.0 - share) / n_gen)
           for s, m in zip(sources, medical, strict=True)]
    return out, True

