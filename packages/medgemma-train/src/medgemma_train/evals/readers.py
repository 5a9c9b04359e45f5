"""Data readers: data files -> :class:`EvalItem` records, corrupt items skipped and counted.

* :func:`mcq_reader`: multiple-choice JSON lines (MedQA, MedMCQA, PubMedQA, MMLU, AfriMed-QA as
  MedAgentsBench prepares them: ``question``, ``options`` letter -> text or a list,
  ``answer_idx``), read by medgemma-data's ``qa`` plugin.
* :func:`vqa_reader`: VQA-RAD / SLAKE-style JSON (a list of ``question``, ``answer``,
  ``image_name``, optional ``answer_type`` and ``q_lang``) with an image folder, read by the
  ``qa`` plugin.
* :func:`cxr_labels_reader`, :func:`cxr_report_reader`: chest X-ray manifests (JSON lines or
  CSV, image paths relative to the manifest) whose images the ``radiograph`` plugin reads
  when the item is scored.

medgemma-data's ``qa`` plugin stops at the first corrupt item of a file. These readers give it
the file, and when it names a corrupt line (``file:line ...``) or item (``file: item i ...``)
they record it as skipped, blank it out (line numbers are kept) and give the plugin the rest.
"""

from __future__ import annotations

import csv
import json
import re
import string
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .spec import EvalError, EvalItem, ImageRef, Reader, ReadResult, Skipped

_ITEM = re.compile(r": item (\d+)")


def _too_many(path: Path, skipped: list[Skipped], total: int, what: str) -> None:
    if total and len(skipped) > max(10, total // 2):
        first = skipped[0]
        raise EvalError(f"{path}: {len(skipped)} of {total} items are unreadable (first: "
                        f"{first.where}: {first.reason}); is this a {what} file?")


def _normal_options(opts: Any) -> dict[str, str] | None:
    """The qa plugin's rule: a list becomes A, B, C...; keys and values as stripped strings,
    sorted by letter."""
    if isinstance(opts, list):
        opts = dict(zip(string.ascii_uppercase, opts))
    if not isinstance(opts, dict) or not opts:
        return None
    return {str(k): str(v).strip() for k, v in sorted(opts.items())}


def mcq_reader(num_options: int | None = None) -> Reader:
    """A reader of multiple-choice JSON lines; ``num_options``: items with another number of
    options are skipped (MedQA's 4- and 5-option variants are separate tasks)."""

    def read(path: Path) -> ReadResult:
        return read_mcq(path, num_options=num_options)

    return read


def read_mcq(path: Path, *, num_options: int | None = None) -> ReadResult:
    import medgemma_data
    from medgemma_data import InvalidInputError

    try:
        raw_lines = path.read_bytes().splitlines()
    except OSError as exc:
        raise EvalError(f"{path}: cannot read ({exc.strerror or exc})") from None
    lines: list[str] = []
    raw: dict[int, dict] = {}
    skipped: list[Skipped] = []
    for lineno, data in enumerate(raw_lines, start=1):  # cheap checks first: JSON objects
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            skipped.append(Skipped(f"{path}:{lineno}", f"not UTF-8 text (byte "
                                   f"0x{data[exc.start]:02x} at column {exc.start + 1})"))
            lines.append("")
            continue
        if not text.strip():
            lines.append("")
            continue
        try:
            item = json.loads(text)
        except json.JSONDecodeError as exc:
            item, why = None, f"not JSON ({exc.msg})"
        else:
            why = "not a JSON object"
        if not isinstance(item, dict):
            skipped.append(Skipped(f"{path}:{lineno}", why))
            lines.append("")
            continue
        raw[lineno] = item
        lines.append(text)
    if not raw:
        raise EvalError(f"{path}: no multiple-choice item found; expected JSON lines with "
                        "question, options and answer_idx")
    first = raw[min(raw)]
    if not {"question", "options"} <= set(first):
        raise EvalError(f"{path} is not a multiple-choice JSONL file (its first item has keys "
                        f"{sorted(first)[:6]}; expected question, options, answer_idx)")
    dataset = _dataset_name(path)
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / f"{dataset}.jsonl"
        while True:
            copy.write_text("\n".join(lines) + "\n", encoding="utf-8")
            try:
                samples = medgemma_data.load(copy, modality="qa", options={"dataset": dataset})
                break
            except InvalidInputError as exc:
                msg, head = str(exc), f"{copy}:"
                m = re.match(r"(\d+):? (.*)", msg[len(head):]) if msg.startswith(head) else None
                if m is None or not 1 <= int(m.group(1)) <= len(lines):
                    raise EvalError(msg.replace(str(copy), str(path))) from None
                lineno = int(m.group(1))
                skipped.append(Skipped(f"{path}:{lineno}", m.group(2)))
                lines[lineno - 1] = ""
                raw.pop(lineno, None)
                _too_many(path, skipped, len(raw) + len(skipped), "multiple-choice JSONL")
    items: list[EvalItem] = []
    seen: dict[str, int] = {}
    for sample in samples:
        lineno = int(sample.provenance.source.rsplit(":", 1)[1])
        item = raw[lineno]
        options = _normal_options(item["options"]) or {}
        if num_options is not None and len(options) != num_options:
            skipped.append(Skipped(f"{path}:{lineno}", f"{len(options)} options; this task "
                                   f"takes {num_options}"))
            continue
        if sample.label is None:
            skipped.append(Skipped(f"{path}:{lineno}", "no answer_idx"))
            continue
        base = str(item.get("realidx", item.get("id", f"line{lineno}")))
        seen[base] = seen.get(base, 0) + 1
        item_id = base if seen[base] == 1 else f"{base}#{seen[base]}"
        meta = {k: sample.metadata[k] for k in ("subject", "dataset") if k in sample.metadata}
        items.append(EvalItem(item_id, str(item["question"]).strip(), sample.label, options,
                              meta=meta, where=f"{path}:{lineno}"))
    _too_many(path, skipped, len(items) + len(skipped), "multiple-choice JSONL")
    return ReadResult(items, skipped)


def _dataset_name(path: Path) -> str:
    stem = path.stem.lower().replace("-", "_")
    known = ("medqa", "medmcqa", "pubmedqa", "mmlu", "afrimedqa", "vqa_rad", "slake")
    return next((k for k in known if stem.startswith(k)), re.sub(r"[^a-z0-9_]", "_", stem) or "qa")


def vqa_reader(language: str = "en") -> Reader:
    """A reader of VQA-RAD / SLAKE JSON; ``language``: keep items whose ``q_lang`` is this."""

    def read(path: Path) -> ReadResult:
        return read_vqa(path, language=language)

    return read


def _image_folder(path: Path) -> Path:
    """Where the qa plugin looks for a VQA set's images: images/, imgs/ or the JSON's folder."""
    return next((path.parent / n for n in ("images", "imgs") if (path.parent / n).is_dir()),
                path.parent)


def _named_image(entry: Any, folder: str) -> str:
    name = next((entry[k] for k in ("image_name", "img_name", "image")
                 if isinstance(entry, dict) and k in entry), None)
    return str(Path(folder) / str(name)) if name is not None else "\0"


def read_vqa(path: Path, *, language: str = "en") -> ReadResult:
    import medgemma_data
    from medgemma_data import InvalidInputError

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EvalError(f"{path} is not a VQA JSON file ({exc}); expected a JSON list of "
                        "question / answer / image_name items") from None
    if not isinstance(data, list) or not data or not isinstance(data[0], dict) or not (
            {"question", "answer"} <= set(data[0])):
        raise EvalError(f"{path} is not a VQA JSON file; expected a JSON list of question / "
                        "answer / image_name items")
    keep = list(range(len(data)))  # original index of each item still given to the plugin
    skipped: list[Skipped] = []
    options = {"dataset": _dataset_name(path), "images": str(_image_folder(path).resolve()),
               "language": language}
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "vqa.json"
        while True:
            copy.write_text(json.dumps([data[i] for i in keep]), encoding="utf-8")
            try:
                samples = medgemma_data.load(copy, modality="qa", options=options)
                break
            except InvalidInputError as exc:
                msg = str(exc)
                m = _ITEM.search(msg)
                if m is not None and 0 <= int(m.group(1)) < len(keep):
                    at = int(m.group(1))
                    reason = msg.split(f"item {m.group(1)}", 1)[1].lstrip(": ")
                else:  # an unreadable image: the message names its file
                    at = next((k for k, i in enumerate(keep)
                               if _named_image(data[i], options["images"]) in msg), -1)
                    reason = msg
                if at < 0:
                    raise EvalError(msg.replace(str(copy), str(path))) from None
                original = keep.pop(at)
                skipped.append(Skipped(f"{path}: item {original}", reason))
                _too_many(path, skipped, len(data), "VQA JSON")
    items = []
    for sample in samples:
        original = keep[int(sample.provenance.source.rsplit(":", 1)[1])]
        entry = data[original]
        base = str(entry.get("qid", entry.get("id", original)))
        meta = {"answer_type": str(sample.metadata.get("answer_type", "")).upper() or
                ("CLOSED" if str(sample.label).lower() in ("yes", "no") else "OPEN")}
        items.append(EvalItem(base, sample.texts[0], str(sample.label),
                              images=tuple(sample.images), meta=meta,
                              where=f"{path}: item {original}"))
    return ReadResult(items, skipped)


# ---- chest X-ray manifests ----------------------------------------------------------------
IMAGE_COLUMNS = ("image", "path", "Path", "image_path", "file")


def _manifest_rows(path: Path) -> list[tuple[str, dict[str, Any] | None, str]]:
    """``(where, row or None, why)`` for each row of a JSONL or CSV manifest."""
    rows: list[tuple[str, dict[str, Any] | None, str]] = []
    try:
        if path.suffix.lower() == ".csv":
            with open(path, newline="", encoding="utf-8") as f:
                for n, row in enumerate(csv.DictReader(f), start=2):
                    rows.append((f"{path}:{n}", dict(row), ""))
            return rows
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                rows.append((f"{path}:{n}", None, f"not JSON ({exc.msg})"))
                continue
            ok = isinstance(row, dict)
            rows.append((f"{path}:{n}", row if ok else None, "" if ok else "not a JSON object"))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise EvalError(f"{path}: cannot read the manifest ({exc})") from None
    return rows


def _image_of(row: dict[str, Any], folder: Path) -> Path | None:
    key = next((k for k in IMAGE_COLUMNS if row.get(k)), None)
    if key is None:
        return None
    image = Path(str(row[key]))
    return image if image.is_absolute() else folder / image


def _manifest_reader(path: Path, what: str, gold_of: Callable[[dict[str, Any]], Any],
                     unwrap: bool = False) -> ReadResult:
    """``gold_of(row)``: the gold tuple, or a string saying why the row is unusable."""
    rows = _manifest_rows(path)
    good = [r for _, r, _ in rows if r is not None]
    if not good or _image_of(good[0], path.parent) is None or isinstance(gold_of(good[0]), str):
        why = ("no image path (" + " / ".join(IMAGE_COLUMNS[:2]) + ")" if good and
               _image_of(good[0], path.parent) is None else
               gold_of(good[0]) if good else "no rows")
        raise EvalError(f"{path} is not a {what} manifest (first row: {why})")
    items, skipped = [], []
    for where, row, why in rows:
        if row is None:
            skipped.append(Skipped(where, why))
            continue
        image, gold = _image_of(row, path.parent), gold_of(row)
        if image is None or isinstance(gold, str):
            skipped.append(Skipped(where, gold if isinstance(gold, str) else "no image path"))
            continue
        if not image.is_file():
            skipped.append(Skipped(where, f"image {image} not found"))
            continue
        item_id = str(row.get("id", where.rsplit(":", 1)[-1]))
        items.append(EvalItem(item_id, "", gold[0] if unwrap else gold,
                              images=(ImageRef(str(image)),), where=where))
    _too_many(path, skipped, len(rows), what)
    return ReadResult(items, skipped)


def cxr_labels_reader(labels: Sequence[str]) -> Reader:
    """Chest X-ray multi-label manifest: JSON lines ``{"image": "a.png", "labels": [...]}`` or a
    CSV with an image column and one column per label (CheXpert style: 1 present; 0, -1
    (uncertain) and blank count as absent, the U-zeros convention)."""
    canon = {_key(lab): lab for lab in labels}
    order = {lab: i for i, lab in enumerate(labels)}

    def gold_of(row: dict[str, Any]) -> tuple[str, ...] | str:
        if "labels" in row:
            value = row["labels"]
            if isinstance(value, str):
                value = [v for v in re.split(r"[|;,]", value) if v.strip()]
            if not isinstance(value, list):
                return "'labels' must be a list of label names"
            present = set()
            for v in value:
                if _key(str(v)) == _key("No Finding"):
                    continue
                if _key(str(v)) not in canon:
                    return f"unknown label {str(v)[:40]!r} (labels: {', '.join(labels)})"
                present.add(canon[_key(str(v))])
            return tuple(sorted(present, key=order.__getitem__))
        if not any(lab in row for lab in labels):
            return f"needs 'labels' or one column per label ({', '.join(labels)})"
        present = []
        for lab in labels:
            cell = str(row.get(lab, "") or "").strip()
            try:
                if cell and float(cell) == 1.0:
                    present.append(lab)
            except ValueError:
                return f"column {lab!r}: {cell[:20]!r} is not a number"
        return tuple(present)

    def read(path: Path) -> ReadResult:
        return _manifest_reader(path, "chest X-ray label", gold_of)

    return read


def _key(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", label.lower()).strip()


def cxr_report_reader() -> Reader:
    """Chest X-ray report manifest: JSON lines or CSV with an image path and ``report`` (or
    ``findings``) text."""

    def gold_of(row: dict[str, Any]) -> tuple[str] | str:
        text = row.get("report", row.get("findings"))
        if isinstance(text, str) and text.strip():
            return (text.strip(),)
        return "needs a non-empty 'report' (or 'findings') text"

    def read(path: Path) -> ReadResult:
        return _manifest_reader(path, "chest X-ray report", gold_of, unwrap=True)

    return read
