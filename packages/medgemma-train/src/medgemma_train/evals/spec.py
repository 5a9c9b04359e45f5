"""Typed records of the evaluation harness: what a task plugin registers and what readers return.

A task plugin hands an :class:`EvalTask` to the ``register`` callback of the
``medgemma_eval_tasks`` hook. A task names its data reader, its prompt (:class:`Prompt`, the
exact text), its scoring modes and its metrics (:class:`Metric`). Readers turn a data file into
:class:`EvalItem` records, skipping (and counting) corrupt items in a :class:`ReadResult`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

#: Scoring modes. ``loglik``: the option with the highest summed log-likelihood (base models,
#: as lm-evaluation-harness); ``generate``: a greedy answer, parsed; ``zeroshot``: MedSigLIP
#: image-text scores per label (an encoder-only mode, AUC).
MODES = ("loglik", "generate", "zeroshot")
#: Kinds of answer a task has, which decide how an output is parsed and compared with gold.
KINDS = ("mcq", "vqa", "multilabel", "report")

_NAME = re.compile(r"^[a-z][a-z0-9_-]*$")


class EvalError(ValueError):
    """A user mistake (unknown task, bad data file, unloadable checkpoint): one line, exit 2."""


@dataclass(frozen=True)
class ImageRef:
    """An image file read when the item is scored, through a medgemma-data modality plugin
    (``radiograph`` for chest X-rays: DICOM or PNG/JPEG). ``load()`` -> ``uint8 [H, W, 3]``."""

    path: str
    modality: str = "radiograph"

    def load(self) -> np.ndarray:
        import medgemma_data

        samples = medgemma_data.load(self.path, modality=self.modality)
        images = [img for s in samples for img in s.images]
        if len(images) != 1:
            raise medgemma_data.InvalidInputError(
                f"{self.path}: expected one image, the {self.modality} plugin gave {len(images)}")
        return images[0]


@dataclass(frozen=True, eq=False)
class EvalItem:
    """One question. ``id``: unique within the dataset; ``question``: its text (for MCQ without
    the options); ``options``: letter -> option text (MCQ) or empty; ``gold``: the answer letter
    (MCQ), the answer text (VQA), the labels present (multilabel, a tuple) or the reference
    report; ``images``: ``uint8 [H, W, 3]`` arrays or :class:`ImageRef` (read when scored);
    ``meta``: ``subject``, ``answer_type`` (OPEN / CLOSED), ...; ``where``: ``file:line``."""

    id: str
    question: str
    gold: str | tuple[str, ...]
    options: Mapping[str, str] = field(default_factory=dict)
    images: tuple[Any, ...] = ()
    meta: Mapping[str, Any] = field(default_factory=dict)
    where: str = ""

    def load_images(self) -> list[np.ndarray]:
        """The item's images as arrays (reading :class:`ImageRef` files now)."""
        return [img.load() if isinstance(img, ImageRef) else img for img in self.images]


@dataclass(frozen=True)
class Skipped:
    """A corrupt item left out: where it is (``file:line`` or ``file: item i``) and why."""

    where: str
    reason: str


@dataclass(frozen=True)
class ReadResult:
    """What a reader gives: the good items in file order and the corrupt ones it skipped."""

    items: list[EvalItem]
    skipped: list[Skipped] = field(default_factory=list)


#: ``reader(path) -> ReadResult``; raises :class:`EvalError` for a file of the wrong format.
Reader = Callable[[Path], ReadResult]


@dataclass(frozen=True)
class Prompt:
    """The exact prompt text of a task, as ``str.format`` templates.

    Placeholders: ``{question}``; ``{options}`` (one ``X. text`` line per option, letter
    order); ``{subject}`` (the item's subject with ``_`` as spaces, else ``medicine``);
    ``{labels}`` (the task's labels joined by ``", "``); ``{label}`` (zeroshot, one label).

    ``loglik``: the raw text after ``<bos>`` that the options continue; ``continuation``: each
    option's continuation (``{letter}``, ``{text}``); trailing spaces of the context move into
    the continuation and the continuation's tokens are those of ``tokenize(context +
    continuation)`` after ``tokenize(context)`` (lm-evaluation-harness' rule).
    ``generate``: the user turn, in the model's chat template; the item's images follow the
    text as image items. ``system``: an optional system message. ``zeroshot``: the text each
    label is scored with by MedSigLIP.
    """

    loglik: str = ""
    continuation: str = " {letter}"
    generate: str = ""
    system: str = ""
    zeroshot: str = ""


@dataclass(frozen=True)
class Metric:
    """A metric over scored records (the rows of ``items.jsonl``).

    ``per_item(records) -> float [N]``: when the metric is the mean of a per-item score
    (accuracy, token F1, ROUGE-L, RadGraph F1), which makes bootstrapping cheap. Otherwise
    ``compute(records) -> float`` (macro F1, BLEU, AUC), recomputed on each bootstrap resample.
    ``available()``: None when it can run, else one line saying how to install what it needs.
    ``resampled(records, idx [B, N]) -> float [B]``, optional beside ``compute``: the metric on
    every bootstrap resample at once (``records[idx[b]]``), equal to ``compute`` on each.
    """

    name: str
    description: str
    per_item: Callable[[Sequence[Mapping[str, Any]]], np.ndarray] | None = None
    compute: Callable[[Sequence[Mapping[str, Any]]], float] | None = None
    available: Callable[[], str | None] = lambda: None
    resampled: Callable[[Sequence[Mapping[str, Any]], np.ndarray], np.ndarray] | None = None

    def __post_init__(self) -> None:
        if (self.per_item is None) == (self.compute is None):
            raise ValueError(f"metric {self.name!r}: give exactly one of per_item or compute")

    def __call__(self, records: Sequence[Mapping[str, Any]]) -> float:
        if not records:
            return float("nan")
        if self.per_item is not None:
            return float(np.mean(self.per_item(records)))
        return float(self.compute(records))  # type: ignore[misc]


@dataclass(frozen=True)
class EvalTask:
    """A benchmark a plugin registers.

    ``name``: unique, lower-case (``medqa``); ``description``: one line; ``kind``: one of
    :data:`KINDS`; ``reader``: data file -> items; ``prompt``: the exact text; ``modes``: the
    scoring modes it supports, the default first; ``metrics``: the first is the headline;
    ``metrics_by_mode``: other metric lists for some modes (zeroshot: AUC);
    ``groups``: item ``meta`` keys the summary breaks down by (``subject``, ``answer_type``);
    ``fixture``: a bundled data file (path) read when no ``--data`` is given, or None;
    ``data_help``: what ``--data`` takes; ``labels``: a multilabel task's label list;
    ``max_new_tokens``: the generate mode's default answer length.
    """

    name: str
    description: str
    kind: str
    reader: Reader
    prompt: Prompt
    modes: tuple[str, ...]
    metrics: tuple[Metric, ...]
    metrics_by_mode: Mapping[str, tuple[Metric, ...]] = field(default_factory=dict)
    groups: tuple[str, ...] = ()
    fixture: Path | None = None
    data_help: str = ""
    labels: tuple[str, ...] = ()
    max_new_tokens: int = 64

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ValueError(f"task name {self.name!r} must be lower-case [a-z0-9_-]")
        if self.kind not in KINDS:
            raise ValueError(f"task {self.name!r}: kind {self.kind!r} is not one of {KINDS}")
        if not self.modes or any(m not in MODES for m in self.modes):
            raise ValueError(f"task {self.name!r}: modes {self.modes!r} must come from {MODES}")
        if not self.metrics:
            raise ValueError(f"task {self.name!r}: give at least one metric")
        if "loglik" in self.modes and (self.kind != "mcq" or not self.prompt.loglik):
            raise ValueError(f"task {self.name!r}: loglik scoring needs an mcq task with a "
                             "prompt.loglik template")
        if "generate" in self.modes and not self.prompt.generate:
            raise ValueError(f"task {self.name!r}: generate scoring needs prompt.generate")
        if "zeroshot" in self.modes and (self.kind != "multilabel" or not self.prompt.zeroshot):
            raise ValueError(f"task {self.name!r}: zeroshot scoring needs a multilabel task "
                             "with a prompt.zeroshot template")

    def metrics_for(self, mode: str) -> tuple[Metric, ...]:
        """The metrics reported in ``mode`` (the headline first)."""
        return tuple(self.metrics_by_mode.get(mode, self.metrics))


@dataclass(frozen=True)
class TaskInfo:
    """What the host reports about a registered task: its record and the plugin it came from."""

    task: EvalTask
    plugin: str
    distribution: str
    version: str
