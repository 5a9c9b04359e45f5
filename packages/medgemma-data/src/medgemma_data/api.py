"""The public functions: :func:`detect`, :func:`load`, :func:`list_plugins`."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path

from .errors import (
    DetectionError,
    InvalidInputError,
    MedgemmaDataError,
    PluginFailedError,
    is_rust_panic,
)
from .manager import get_registry, trace
from .sample import Sample
from .spec import PluginInfo, PluginProblem


def _existing(path: str | os.PathLike[str]) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise InvalidInputError(f"no such file or folder: {p}")
    if p.is_dir() and not any(p.iterdir()):
        raise InvalidInputError(f"folder {p} is empty; point at a folder of files")
    if p.is_file() and p.stat().st_size == 0:
        raise InvalidInputError(f"file {p} is empty")
    return p


def detection_scores(path: str | os.PathLike[str]) -> list[tuple[str, int]]:
    """Every loaded modality's score for ``path`` (0..100), highest first."""
    p = _existing(path)
    scores = []
    for name, (spec, info) in get_registry().specs.items():
        try:
            score = int(spec.detect(p))
        except BaseException as exc:  # a broken detector must not hide the others
            if not (isinstance(exc, Exception) or is_rust_panic(exc)):
                raise  # KeyboardInterrupt, SystemExit
            trace(f"detect {name} ({info.distribution}) raised {exc!r}; counted as 0")
            score = 0
        trace(f"detect {name}: {score}")
        scores.append((name, max(0, min(100, score))))
    return sorted(scores, key=lambda s: -s[1])


def detect(path: str | os.PathLike[str]) -> str:
    """The name of the modality whose plugin recognises ``path`` best.

    Raises :class:`DetectionError` when none does, or when two tie.
    """
    scores = [s for s in detection_scores(path) if s[1] > 0]
    if not scores:
        known = ", ".join(sorted(get_registry().specs)) or "none loaded"
        raise DetectionError(f"no plugin recognises {path}; pass the modality explicitly "
                             f"(--modality / modality=, one of: {known}) or install a plugin "
                             "that reads it")
    if len(scores) > 1 and scores[0][1] == scores[1][1]:
        tied = [n for n, s in scores if s == scores[0][1]]
        raise DetectionError(f"{path} is claimed equally by {', '.join(tied)}; pass the "
                             "modality explicitly (--modality / modality=)")
    return scores[0][0]


def load(path: str | os.PathLike[str], *, modality: str | None = None,
         options: Mapping[str, str] | None = None) -> list[Sample]:
    """Load ``path`` into model-ready samples.

    ``modality``: a registered name; detected from the file when ``None``.
    ``options``: the plugin's options as strings (``{"max_slices": "40"}``); unknown names
    raise :class:`~medgemma_data.errors.OptionError`. Every user-facing failure raises a
    :class:`~medgemma_data.errors.MedgemmaDataError` with a one-line message.
    """
    p = _existing(path)
    registry = get_registry()
    name = modality if modality is not None else detect(p)
    spec, info = registry.get(name)
    resolved = spec.resolve_options(options)
    start = time.perf_counter()
    try:
        samples = spec.load(p, resolved)
    except MedgemmaDataError:
        raise
    except BaseException as exc:
        if is_rust_panic(exc):  # a decoder in Rust panicked on this file: a corrupt input
            detail = " ".join(str(exc).split())[:200]
            raise InvalidInputError(f"{p}: a decoder crashed reading it (the {name} plugin's "
                                    f"reader panicked: {detail}); the file is corrupt or not "
                                    "what it claims to be") from None
        if not isinstance(exc, Exception):
            raise  # KeyboardInterrupt, SystemExit
        raise PluginFailedError(
            f"the {name!r} plugin ({info.distribution} {info.version}) failed on {p}: "
            f"{type(exc).__name__}: {exc}; this is a plugin bug, report it to "
            f"{info.distribution}") from exc
    trace(f"load {name} {p}: {len(samples)} samples in {time.perf_counter() - start:.3f} s")
    if not isinstance(samples, list) or not all(isinstance(s, Sample) for s in samples):
        raise PluginFailedError(f"the {name!r} plugin ({info.distribution}) returned "
                                f"{type(samples).__name__}, not a list of Sample")
    if not samples:
        raise InvalidInputError(f"{p}: the {name} plugin found nothing to load in it")
    wrong = {s.modality for s in samples} - {name}
    if wrong:
        raise PluginFailedError(f"the {name!r} plugin ({info.distribution}) returned samples "
                                f"labelled {sorted(wrong)}")
    try:
        registry.pm.hook.medgemma_samples_loaded(modality=name, path=p, samples=list(samples))
    except MedgemmaDataError:
        raise
    except Exception as exc:
        who = ", ".join(f"{i.plugin_name}" for i in
                        registry.pm.hook.medgemma_samples_loaded.get_hookimpls())
        raise PluginFailedError(f"a medgemma_samples_loaded hook (plugins: {who}) failed on "
                                f"{p}: {type(exc).__name__}: {exc}; this is a plugin bug, "
                                "disable it with MEDGEMMA_DATA_DISABLE_PLUGINS") from exc
    return samples


def list_plugins() -> list[PluginInfo]:
    """Every usable registered modality, sorted by name (name, version, distribution, claims)."""
    return [info for _, (_, info) in sorted(get_registry().specs.items())]


def plugin_problems() -> list[PluginProblem]:
    """Plugins that failed to load or register, and modality names claimed twice."""
    return list(get_registry().problems)
