"""Reward functions of the ``rl`` stage are plugins: a pluggy hook registers :class:`RewardSpec`.

A package adds a reward with an entry point in the group ``medgemma.train_rewards`` naming a
module with a hook implementation::

    # pyproject.toml: [project.entry-points."medgemma.train_rewards"] mine = "my_pkg.rewards"
    from medgemma_train.engine.rewards import RewardSpec, hookimpl

    @hookimpl
    def medgemma_train_rewards(register):
        register(RewardSpec(name="length", description="...", fn=lambda s: len(s.completion)))

and a run names it: ``--set rl.rewards=[letter,length]`` (weights ``rl.reward_weights``). The
built-ins register through the same manager (plugin ``builtin``) and reuse the evaluation
harness's scorers (:mod:`medgemma_train.evals`):

* ``letter``: multiple-choice letter match (``parse_choice`` of the completion against the
  row's ``options``, default A-E, equals the gold letter);
* ``exact``: exact match after SQuAD normalisation (``parse_short`` + ``normalize_answer``);
* ``token_f1``: SQuAD token F1 against the gold answer;
* ``cxr_f1``: F1 of the CXR label set the completion names (``parse_labels``, negations
  respected) against the gold label set (the labels named in the gold answer);
* ``format``: 1 when the generation stopped by itself with a non-empty answer of at most
  ``max_lines`` lines and no unfinished thinking block, else 0.

Each reward maps a :class:`Sample` to a float. Loading follows the stage plugins: a broken
plugin is reported, never fatal; ``MEDGEMMA_TRAIN_PLUGINS`` / ``MEDGEMMA_TRAIN_DISABLE_PLUGINS``
allow- and deny-list plugin names; two plugins registering one name are both named.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pluggy

from .stages import PROJECT

__all__ = ["CXR_LABELS", "ENTRY_POINT_GROUP", "RewardSpec", "Sample", "get_reward", "hookimpl",
           "list_rewards", "reward_problems", "score"]

ENTRY_POINT_GROUP = "medgemma.train_rewards"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

#: The CheXpert findings the ``cxr_f1`` reward looks for when a row names no ``labels``.
CXR_LABELS = ("atelectasis", "cardiomegaly", "consolidation", "edema", "pleural effusion",
              "pneumonia", "pneumothorax", "lung opacity", "lung lesion", "fracture",
              "enlarged cardiomediastinum", "pleural other", "support devices", "no finding")


@dataclasses.dataclass(frozen=True)
class Sample:
    """One rollout to score: the prompt's text, the completion's text (stop token removed),
    the row's gold answer, whether generation stopped by itself, and the row's extra fields
    (``options`` for letters, ``labels`` for CXR sets)."""

    prompt: str
    completion: str
    gold: str
    stopped: bool = True
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class RewardSpec:
    name: str
    description: str
    fn: Callable[[Sample], float]

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"reward name {self.name!r}: use letters, digits, - and _")
        if not callable(self.fn):
            raise TypeError(f"RewardSpec({self.name}).fn must be callable")


# ---- the built-ins ---------------------------------------------------------------------------
def _letter(s: Sample) -> float:
    from ..evals.parse import parse_choice

    options = dict(s.meta.get("options") or {k: k for k in "ABCDE"})
    return float(parse_choice(s.completion, options) == s.gold.strip().upper()[:1])


def _exact(s: Sample) -> float:
    from ..evals.metrics import normalize_answer
    from ..evals.parse import parse_short

    return float(normalize_answer(parse_short(s.completion, s.gold)) == normalize_answer(s.gold))


def _token_f1(s: Sample) -> float:
    from ..evals.metrics import token_f1
    from ..evals.parse import strip_thinking

    return float(token_f1(strip_thinking(s.completion) or "", s.gold))


def _cxr_f1(s: Sample) -> float:
    from ..evals.parse import parse_labels

    labels = tuple(s.meta.get("labels") or CXR_LABELS)
    pred, gold = set(parse_labels(s.completion, labels)), set(parse_labels(s.gold, labels))
    if not pred and not gold:
        return 1.0
    tp = len(pred & gold)
    return 2.0 * tp / (len(pred) + len(gold))


def _format(s: Sample) -> float:
    from ..evals.parse import strip_thinking

    body = strip_thinking(s.completion)
    lines = [line for line in (body or "").strip().splitlines() if line.strip()]
    return float(s.stopped and body is not None and 0 < len(lines)
                 <= int(s.meta.get("max_lines", 1)))


BUILTINS = (
    RewardSpec("letter", "multiple-choice letter match (evals parse_choice)", _letter),
    RewardSpec("exact", "exact match after SQuAD normalisation", _exact),
    RewardSpec("token_f1", "SQuAD token F1 against the gold answer", _token_f1),
    RewardSpec("cxr_f1", "F1 of the CXR label set named (negations respected)", _cxr_f1),
    RewardSpec("format", "stopped, non-empty, at most max_lines lines, no open thinking",
               _format),
)


class _Builtin:
    @hookimpl
    def medgemma_train_rewards(self, register: Callable[[RewardSpec], None]) -> None:
        for spec in BUILTINS:
            register(spec)


class _Hooks:
    @hookspec
    def medgemma_train_rewards(self, register: Callable[[RewardSpec], None]) -> None:
        """Register rewards by calling ``register(RewardSpec(...))``."""


# ---- the registry ----------------------------------------------------------------------------
@dataclasses.dataclass
class _Registry:
    specs: dict[str, tuple[RewardSpec, str]] = dataclasses.field(default_factory=dict)
    problems: list[str] = dataclasses.field(default_factory=list)
    conflicts: dict[str, str] = dataclasses.field(default_factory=dict)


_REGISTRY: _Registry | None = None


def _plugins() -> list[Any]:
    from medgemma_train import __version__
    from medgemma_train.plugins import PluginSource, entry_point_sources

    return [PluginSource("builtin", "medgemma-train", __version__, lambda: _Builtin),
            *entry_point_sources(ENTRY_POINT_GROUP)]


def _load() -> _Registry:
    from medgemma_train.plugins import Failure, load_plugins

    reg = _Registry()
    loaded = load_plugins(PROJECT, _Hooks, "medgemma_train_rewards", RewardSpec, _plugins(),
                          allow_env="MEDGEMMA_TRAIN_PLUGINS",
                          deny_env="MEDGEMMA_TRAIN_DISABLE_PLUGINS", instantiate=True)
    for event in loaded.events:
        plugin, dist = event.source.name, event.source.distribution
        if isinstance(event, Failure):
            reg.problems.append(f"reward plugin {plugin} ({dist}): {event.text}")
            continue
        spec = event.record
        if spec.name in reg.specs:
            other = reg.specs[spec.name][1]
            msg = (f"reward {spec.name!r} is registered by both {other} and {dist} "
                   f"({plugin}); disable one with MEDGEMMA_TRAIN_DISABLE_PLUGINS")
            reg.conflicts[spec.name] = msg
            reg.problems.append(msg)
            continue
        reg.specs[spec.name] = (spec, f"{dist} ({plugin})")
    for name in reg.conflicts:
        reg.specs.pop(name, None)
    return reg


def registry(reload: bool = False) -> _Registry:
    global _REGISTRY
    if _REGISTRY is None or reload:
        _REGISTRY = _load()
    return _REGISTRY


def list_rewards() -> list[tuple[str, str, str]]:
    """``(name, description, "distribution (plugin)")`` of every loaded reward."""
    return [(n, s.description, who) for n, (s, who) in sorted(registry().specs.items())]


def reward_problems() -> list[str]:
    return list(registry().problems)


def get_reward(name: str) -> RewardSpec:
    reg = registry()
    if name in reg.conflicts:
        raise ValueError(reg.conflicts[name])
    if name not in reg.specs:
        raise ValueError(f"unknown reward {name!r} (available: {', '.join(sorted(reg.specs))}); "
                         f"set rl.rewards to registered names")
    return reg.specs[name][0]


def score(samples: Sequence[Sample], names: Sequence[str],
          weights: Sequence[float] = ()) -> tuple[list[float], dict[str, list[float]]]:
    """The weighted sum of the named rewards per sample, and each reward's values."""
    specs = [get_reward(n) for n in names]
    w = list(weights) or [1.0] * len(specs)
    if len(w) != len(specs):
        raise ValueError(f"rl.reward_weights has {len(w)} values for {len(specs)} rewards")
    parts = {s.name: [float(s.fn(x)) for x in samples] for s in specs}
    total = [sum(wi * parts[s.name][i] for wi, s in zip(w, specs)) for i in range(len(samples))]
    return total, parts
