"""qa: medical question-answering sets -> one sample per question, the answer as the label.

* Multiple-choice JSON lines (MedQA, MedMCQA, PubMedQA, MMLU, AfriMed-QA as prepared by
  MedAgentsBench): ``question``, ``options`` (letter -> text, or a list), ``answer_idx``.
  Parts: one text with the question and the lettered options; label: the answer letter.
* Visual QA JSON (VQA-RAD / SLAKE style): a list of items with ``question``, ``answer`` and
  an image file name (``image_name``, ``img_name`` or ``image``) relative to an image folder.
  Parts: the question text, then the image; label: the answer.
"""

from __future__ import annotations

import json
import string
from collections.abc import Mapping
from pathlib import Path

from ..hookspecs import hookimpl
from ..limits import MAX_PIXELS_OPTION
from ..sample import ImagePart, Location, Provenance, Sample, TextPart
from ..spec import ModalitySpec, Option

NAME = "qa"
IMAGE_KEYS = ("image_name", "img_name", "image")
KNOWN_SETS = ("medqa", "medmcqa", "pubmedqa", "mmlu", "afrimedqa", "vqa_rad", "slake")


def _first_json_line(path: Path) -> object:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                return json.loads(line)
    return None


def detect(path: Path) -> int:
    """90 for MCQ JSON lines or a VQA JSON list of question/answer/image items."""
    if not path.is_file():
        return 0
    try:
        if path.suffix.lower() == ".jsonl":
            first = _first_json_line(path)
            return 90 if isinstance(first, dict) and {"question", "options"} <= set(first) else 0
        if path.suffix.lower() == ".json":
            with open(path, "rb") as f:
                if f.read(4096).lstrip()[:1] != b"[":
                    return 0
            data = json.loads(path.read_text(encoding="utf-8"))
            ok = (isinstance(data, list) and data and isinstance(data[0], dict)
                  and {"question", "answer"} <= set(data[0])
                  and any(k in data[0] for k in IMAGE_KEYS))
            return 90 if ok else 0
    except Exception:
        return 0
    return 0


def dataset_name(path: Path, given: str) -> str:
    """The ``dataset`` option, else a known set name at the start of the file name."""
    if given:
        return given
    stem = path.stem.lower().replace("-", "_")
    return next((k for k in KNOWN_SETS if stem.startswith(k)), stem.split("_")[0])


def format_question(question: str, options: Mapping[str, str]) -> str:
    """``Question: ...`` then one ``X. option`` line per option, in letter order."""
    lines = [f"Question: {question.strip()}"]
    lines += [f"{k}. {str(v).strip()}" for k, v in options.items()]
    return "\n".join(lines)


def _mcq(path: Path, options: Mapping[str, str]) -> list[Sample]:
    from ..errors import InvalidInputError

    dataset = dataset_name(path, options["dataset"])
    samples = []
    with open(path, "rb") as f:
        raw_lines = f.read().splitlines()
    for lineno, raw in enumerate(raw_lines, start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidInputError(f"{path}:{lineno} is not UTF-8 text (byte "
                                    f"0x{raw[exc.start]:02x} at column {exc.start + 1}); "
                                    "save the file as UTF-8") from None
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InvalidInputError(f"{path}:{lineno} is not JSON ({exc.msg}); fix or "
                                    "remove the line") from None
        if not isinstance(item, dict) or not isinstance(item.get("question"), str):
            raise InvalidInputError(f"{path}:{lineno} has no 'question' string")
        opts = item.get("options")
        if isinstance(opts, list):
            opts = dict(zip(string.ascii_uppercase, opts))
        if not isinstance(opts, dict) or not opts:
            raise InvalidInputError(f"{path}:{lineno} has no 'options' (letter -> text)")
        opts = {str(k): str(v) for k, v in sorted(opts.items())}
        label = item.get("answer_idx")
        if label is not None and str(label) not in opts:
            raise InvalidInputError(f"{path}:{lineno}: answer_idx {label!r} is not one of "
                                    f"the options {sorted(opts)}")
        meta: dict[str, object] = {"dataset": dataset, "question_index": lineno - 1,
                                   "num_options": len(opts)}
        subject = item.get("subject") or item.get("meta_info")
        if isinstance(subject, str) and subject:
            meta["subject"] = subject
        samples.append(Sample((TextPart(format_question(item["question"], opts)),), NAME,
                              Provenance(f"{path}:{lineno}"), meta,
                              label=None if label is None else str(label)))
    return samples


def _image_dir(path: Path, given: str) -> Path:
    from ..errors import InvalidInputError

    if given:
        folder = Path(given).expanduser()
        if not folder.is_absolute():
            folder = path.parent / folder
        if not folder.is_dir():
            raise InvalidInputError(f"option images={given!r}: no such folder {folder}")
        return folder
    for name in ("images", "imgs", "."):
        if (path.parent / name).is_dir():
            return path.parent / name
    return path.parent


def _vqa(path: Path, options: Mapping[str, str]) -> list[Sample]:
    from ..errors import InvalidInputError
    from ..imaging import read_image
    from ..limits import max_pixels

    limit = max_pixels(options)
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, list):
        raise InvalidInputError(f"{path} holds a JSON {type(data).__name__}, not a list of "
                                "question/answer/image items")
    folder = _image_dir(path, options["images"])
    language = options["language"].strip()
    dataset = dataset_name(path, options["dataset"])
    samples = []
    for i, item in enumerate(data):
        if language and item.get("q_lang", language) != language:
            continue
        key = next((k for k in IMAGE_KEYS if k in item), None)
        if key is None or "question" not in item or "answer" not in item:
            raise InvalidInputError(f"{path}: item {i} needs question, answer and an image "
                                    f"name ({' / '.join(IMAGE_KEYS)})")
        name = Path(str(item[key]))
        if name.is_absolute() or ".." in name.parts or not name.parts:
            raise InvalidInputError(f"{path}: item {i}: image name {str(name)[:80]!r} must be "
                                    "a path inside the image folder (no absolute paths, no ..)")
        image_path = folder / name
        if not image_path.is_file():
            raise InvalidInputError(f"{path}: item {i}: image {image_path} not found; pass "
                                    "--option images=FOLDER")
        image, _ = read_image(image_path, limit)
        meta: dict[str, object] = {"dataset": dataset, "question_index": i}
        if isinstance(item.get("answer_type"), str):
            meta["answer_type"] = item["answer_type"]
        samples.append(Sample(
            (TextPart(str(item["question"]).strip()), ImagePart(image)), NAME,
            Provenance(f"{path}:{i}", (Location(str(image_path)),)), meta,
            label=str(item["answer"]).strip()))
    return samples


def load(path: Path, options: Mapping[str, str]) -> list[Sample]:
    """Load every question of a QA file."""
    from ..errors import InvalidInputError

    if path.suffix.lower() == ".jsonl":
        return _mcq(path, options)
    if path.suffix.lower() == ".json":
        try:
            return _vqa(path, options)
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError, AttributeError) as exc:
            raise InvalidInputError(f"{path} is not a VQA JSON list ({exc})") from None
    raise InvalidInputError(f"{path}: the qa modality reads .jsonl (multiple choice) or .json "
                            "(visual QA) files")


@hookimpl
def medgemma_register_modalities(register) -> None:  # noqa: ANN001
    register(ModalitySpec(
        name=NAME,
        description="QA sets: MCQ JSON lines (MedQA, MedMCQA, PubMedQA, MMLU, AfriMed-QA) and "
                    "VQA-RAD/SLAKE-style JSON with images; the answer is the label",
        claims=("*.jsonl (question, options, answer_idx)",
                "*.json (list of question, answer, image_name) + image folder"),
        detect=detect,
        load=load,
        options=(
            Option("dataset", "", "dataset name (default: from the file name)"),
            Option("images", "", "image folder of a VQA set (default: images/, imgs/ or the "
                   "JSON's folder)"),
            Option("language", "en", "keep VQA items whose q_lang is this (empty: all)"),
            MAX_PIXELS_OPTION,
        ),
    ))
