"""Typed records a plugin registers, and what the host reports about plugins.

A plugin describes each modality it adds with a :class:`ModalitySpec` and hands it to the
``register`` callback of the ``medgemma_register_modalities`` hook. The host fills in the
plugin's distribution and version and exposes them as :class:`PluginInfo`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .errors import OptionError
from .sample import Sample

_NAME = re.compile(r"^[a-z][a-z0-9_-]*$")

#: ``detect(path) -> score``: 0 when the path is not for this modality, otherwise a confidence
#: in 1..100 (100: certain, e.g. a DICOM Modality tag that names it; 10: a generic fallback).
Detector = Callable[[Path], int]
#: ``load(path, options) -> samples``; ``options`` holds every declared option as a string.
Loader = Callable[[Path, Mapping[str, str]], list[Sample]]


@dataclass(frozen=True)
class Option:
    """One loader option: its name, its default (a string, as typed on the command line) and help."""

    name: str
    default: str
    help: str

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"option name {self.name!r} must be lower-case [a-z0-9_-]")


@dataclass(frozen=True)
class ModalitySpec:
    """A modality a plugin adds.

    ``name``: unique lower-case name (``ct``, ``wsi``...); ``description``: one line;
    ``claims``: human-readable patterns of the inputs it takes (``"*.dcm (Modality CT)"``,
    ``"folder of DICOM slices"``); ``detect``: scores a path (see :data:`Detector`);
    ``load``: turns a path into samples (see :data:`Loader`); ``options``: what ``load``
    accepts, with defaults.
    """

    name: str
    description: str
    claims: tuple[str, ...]
    detect: Detector
    load: Loader
    options: tuple[Option, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ValueError(f"modality name {self.name!r} must be lower-case [a-z0-9_-]")
        if not callable(self.detect) or not callable(self.load):
            raise TypeError(f"modality {self.name!r}: detect and load must be callables")
        object.__setattr__(self, "claims", tuple(self.claims))
        object.__setattr__(self, "options", tuple(self.options))
        names = [o.name for o in self.options]
        if len(names) != len(set(names)):
            raise ValueError(f"modality {self.name!r} declares an option twice: {names}")

    def resolve_options(self, given: Mapping[str, str] | None) -> dict[str, str]:
        """Defaults overlaid with ``given``; an unknown name raises :class:`OptionError`."""
        resolved = {o.name: o.default for o in self.options}
        for key, value in (given or {}).items():
            if key not in resolved:
                known = ", ".join(sorted(resolved)) or "none"
                raise OptionError(f"modality {self.name!r} has no option {key!r} "
                                  f"(its options: {known})")
            resolved[key] = str(value)
        return resolved


@dataclass(frozen=True)
class PluginInfo:
    """A registered modality as the host sees it (what ``medgemma-data plugins`` lists)."""

    name: str
    version: str
    distribution: str
    plugin: str
    claims: tuple[str, ...]
    description: str
    options: tuple[Option, ...]


@dataclass(frozen=True)
class PluginProblem:
    """A plugin that failed to load or register, or two plugins that claim one name."""

    plugin: str
    distribution: str
    message: str


# Option parsing helpers for loaders (options arrive as strings).

def opt_int(options: Mapping[str, str], name: str, *, minimum: int | None = None) -> int:
    """Parse an integer option; raise :class:`OptionError` naming the option otherwise."""
    raw = options[name]
    try:
        value = int(raw)
    except ValueError:
        raise OptionError(f"option {name}={raw!r} must be an integer") from None
    if minimum is not None and value < minimum:
        raise OptionError(f"option {name}={raw!r} must be at least {minimum}")
    return value


def opt_float(options: Mapping[str, str], name: str, *, positive: bool = False) -> float | None:
    """Parse a float option (``""`` or ``"none"`` gives ``None``)."""
    raw = options[name].strip()
    if raw.lower() in ("", "none"):
        return None
    try:
        value = float(raw)
    except ValueError:
        raise OptionError(f"option {name}={raw!r} must be a number") from None
    if positive and not value > 0:
        raise OptionError(f"option {name}={raw!r} must be positive")
    return value


def opt_bool(options: Mapping[str, str], name: str) -> bool:
    """Parse a boolean option: true/false, yes/no, on/off, 1/0."""
    raw = options[name].strip().lower()
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off", ""):
        return False
    raise OptionError(f"option {name}={options[name]!r} must be true or false")
