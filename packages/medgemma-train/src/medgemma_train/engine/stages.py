"""Training stages are plugins: a pluggy hook registers typed :class:`StageSpec` records.

A package adds a stage with an entry point in the group ``medgemma.train_stages`` naming a
light module with a hook implementation::

    # pyproject.toml: [project.entry-points."medgemma.train_stages"] mystage = "my_pkg.stage"
    from medgemma_train.engine.stages import StageSpec, hookimpl

    @hookimpl
    def medgemma_train_stages(register):
        register(StageSpec(name="mystage", description="...", prepare=prepare, loss=loss))

The built-in ``sft`` stage registers through the same manager (plugin name ``builtin``).
Each plugin loads in its own try/except: a broken one is listed by ``medgemma-train stages``,
never fatal. ``MEDGEMMA_TRAIN_PLUGINS`` allow-lists plugin names (the built-ins are
``builtin``), ``MEDGEMMA_TRAIN_DISABLE_PLUGINS`` lists names never to load. Two plugins
registering one stage name are both named in the error.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from typing import Any

import pluggy

__all__ = ["ENTRY_POINT_GROUP", "DataSpec", "Prepared", "StageInfo", "StageSpec", "get_stage", "hookimpl",
           "hookspec", "list_stages", "stage_problems"]

PROJECT = "medgemma_train"
ENTRY_POINT_GROUP = "medgemma.train_stages"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)
#: the built-in plugin's name and its modules (each registers its stages through the hook)
BUILTIN = ("builtin", ("medgemma_train.engine.sft", "medgemma_train.engine.distill",
                       "medgemma_train.engine.rl", "medgemma_train.engine.siglip",
                       "medgemma_train.engine.pretrain"))


@dataclasses.dataclass
class Prepared:
    """What a stage's ``prepare(cfg)`` returns: the model (adapters attached), its
    ``Processor``, the nnx filter of the parameters that train, whether it reads images, and
    anything the stage's ``finish`` needs (``extra``)."""

    model: Any
    processor: Any
    trainable: Any
    image_text: bool
    extra: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """How a stage reads its rows and makes its batches, when not as ``sft`` does.

    ``read(source_config, index) -> data.Source``: one configured source, every row checked
    (None: :func:`~medgemma_train.engine.data.read_source`, chat / manifest / QA rows).
    ``encoder(cfg, prepared, sources) -> encode``: ``encode(rows, accum)`` turns this process's
    rows of a step into a dict of arrays ``[accum, rows / accum, ...]`` named by ``keys``
    (None: ``Processor.collate`` rows as :class:`~medgemma_core.training.TrainBatch` fields);
    ``keys`` may be a callable ``(cfg, prepared) -> keys`` when they depend on the run
    (``distill``: images or not, offline teacher logits or not).
    The stage's ``loss`` then gets that dict as its batch (not a ``TrainBatch``); the step
    counts ``tokens_key``'s non-zero entries as input tokens (None: one per row, so the
    logged ``tokens_per_s`` is rows per second). An eval batch of such a stage is never
    padded: eval rows past the last whole batch are left out of ``eval_loss``."""

    read: Callable[[Any, int], Any] | None = None
    encoder: Callable[[Any, Any, Any], Callable[..., dict]] | None = None
    keys: tuple[str, ...] | Callable[[Any, Any], tuple[str, ...]] = ()
    tokens_key: str | None = None


@dataclasses.dataclass(frozen=True)
class StageSpec:
    """One training stage.

    ``prepare(cfg) -> Prepared``; ``loss(model, batch, cfg) -> (loss_sum, n_tokens)`` (traced
    inside the jitted step); ``defaults``: dotted config overrides the stage applies before the
    user's (e.g. ``{"optimizer.lr": 2e-4}``); ``evaluate(model, cfg) -> dict`` extra validation
    metrics (optional); ``eval_batch(model, batch, cfg) -> {name: (numerator, denominator)}``
    per-batch sums traced in the jitted eval step beside the loss, summed over the eval data
    and reported as ``name = sum(numerator) / sum(denominator)`` (``sft``:
    ``eval_token_accuracy``; optional); ``finish(model, prepared, cfg, run_dir) -> dict`` after training
    (exports; optional); ``settings``: a frozen dataclass of the stage's own settings, read
    from the config section named after the stage (``mystage: {alpha: 0.5}`` or
    ``--set mystage.alpha=0.5``; unknown keys are errors) into ``cfg.options``; ``run``: a
    stage that brings its own loop (GRPO: rollouts between updates) sets
    ``run(cfg, stage, dry_run=..., say=...) -> summary``, and the trainer hands the whole run
    to it (``loss`` then documents the stage's objective on one batch); ``data``: a
    :class:`DataSpec` for a stage whose rows or batches differ from sft's (``siglip``:
    image / caption pairs); ``optimizer(cfg, total_steps) -> (optax transformation,
    schedule)`` replaces :func:`~medgemma_train.engine.step.make_optimizer` (``pretrain``:
    its own learning rate for the vision tower)."""

    name: str
    description: str
    prepare: Callable[[Any], Prepared]
    loss: Callable[[Any, Any, Any], tuple[Any, Any]]
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    evaluate: Callable[[Any, Any], dict] | None = None
    eval_batch: Callable[[Any, Any, Any], dict] | None = None
    finish: Callable[..., dict] | None = None
    settings: type | None = None
    run: Callable[..., dict] | None = None
    data: DataSpec | None = None
    optimizer: Callable[[Any, int], tuple[Any, Any]] | None = None

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"stage name {self.name!r}: use letters, digits, - and _")
        for attr in ("prepare", "loss"):
            if not callable(getattr(self, attr)):
                raise TypeError(f"StageSpec({self.name}).{attr} must be callable")
        if self.settings is not None and not (isinstance(self.settings, type)
                                              and dataclasses.is_dataclass(self.settings)):
            raise TypeError(f"StageSpec({self.name}).settings must be a dataclass class")
        if self.data is not None and self.data.encoder is not None and not self.data.keys:
            raise TypeError(f"StageSpec({self.name}).data: a custom encoder needs its keys")


@dataclasses.dataclass(frozen=True)
class StageInfo:
    name: str
    description: str
    plugin: str
    distribution: str
    version: str


@dataclasses.dataclass(frozen=True)
class StageProblem:
    plugin: str
    distribution: str
    problem: str


class _Hooks:
    @hookspec
    def medgemma_train_stages(self, register: Callable[[StageSpec], None]) -> None:
        """Register stages by calling ``register(StageSpec(...))`` (keywords only)."""


@dataclasses.dataclass
class _Registry:
    specs: dict[str, tuple[StageSpec, StageInfo]] = dataclasses.field(default_factory=dict)
    problems: list[StageProblem] = dataclasses.field(default_factory=list)
    conflicts: dict[str, str] = dataclasses.field(default_factory=dict)


_REGISTRY: _Registry | None = None


def _names(env: str) -> set[str] | None:
    from medgemma_train.plugins import env_names

    return env_names(env)


def _plugins() -> list[Any]:
    """The built-ins' and the entry points' :class:`~medgemma_train.plugins.PluginSource` s."""
    from medgemma_train import __version__
    from medgemma_train.plugins import PluginSource, entry_point_sources

    out = [PluginSource(BUILTIN[0], "medgemma-train", __version__,
                        lambda m=module: importlib.import_module(m)) for module in BUILTIN[1]]
    return out + entry_point_sources(ENTRY_POINT_GROUP)


def _load() -> _Registry:
    from medgemma_train.plugins import Failure, load_plugins

    reg = _Registry()
    loaded = load_plugins(PROJECT, _Hooks, "medgemma_train_stages", StageSpec, _plugins(),
                          allow_env="MEDGEMMA_TRAIN_PLUGINS",
                          deny_env="MEDGEMMA_TRAIN_DISABLE_PLUGINS")
    for event in loaded.events:
        plugin, dist = event.source.name, event.source.distribution
        if isinstance(event, Failure):
            reg.problems.append(StageProblem(plugin, dist, event.text))
            continue
        spec = event.record
        info = StageInfo(spec.name, spec.description, plugin, dist, event.source.version)
        if spec.name in reg.specs:
            other = reg.specs[spec.name][1]
            msg = (f"stage {spec.name!r} is registered by both {other.distribution} "
                   f"({other.plugin}) and {dist} ({plugin}); disable one with "
                   f"MEDGEMMA_TRAIN_DISABLE_PLUGINS")
            reg.conflicts[spec.name] = msg
            reg.problems.append(StageProblem(plugin, dist, msg))
            continue
        reg.specs[spec.name] = (spec, info)
    for name in reg.conflicts:
        reg.specs.pop(name, None)
    return reg


def registry(reload: bool = False) -> _Registry:
    global _REGISTRY
    if _REGISTRY is None or reload:
        _REGISTRY = _load()
    return _REGISTRY


def list_stages() -> list[StageInfo]:
    return [info for _, (_, info) in sorted(registry().specs.items())]


def stage_problems() -> list[StageProblem]:
    return list(registry().problems)


def get_stage(name: str) -> StageSpec:
    reg = registry()
    if name in reg.conflicts:
        raise ValueError(reg.conflicts[name])
    if name not in reg.specs:
        known = ", ".join(sorted(reg.specs)) or "none loaded"
        raise ValueError(f"unknown stage {name!r} (available: {known}); see "
                         f"`medgemma-train stages`")
    return reg.specs[name][0]
