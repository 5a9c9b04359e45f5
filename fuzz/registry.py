"""Every fuzz target, by name (``data.*``, ``demo.*``, ``core.*``, ``siglip.*``)."""

from __future__ import annotations

from .engine import Target


def targets() -> list[Target]:
    from . import targets_core, targets_data

    return [*targets_data.TARGETS, *targets_core.TARGETS]


def find(name: str) -> Target:
    for t in targets():
        if t.name == name:
            return t
    known = ", ".join(t.name for t in targets())
    raise SystemExit(f"fuzz: no target {name!r} (targets: {known})")
