"""Finding and registering evaluation tasks (built-in and third-party) with pluggy.

The built-in tasks (:mod:`medgemma_train.evals.tasks`) are a plugin like any other: they go
through the same manager and the same hook. Third-party plugins come from the entry-point
group ``medgemma.eval_tasks``. Each plugin loads and registers in its own try/except: a broken
plugin is reported (``medgemma-train tasks`` lists it), never fatal. Two plugins registering
one task name are both named in the error.

``MEDGEMMA_EVAL_PLUGINS``: comma-separated allow-list of plugin names (the built-ins are
``builtin``); ``MEDGEMMA_EVAL_DISABLE_PLUGINS``: plugin names never to load.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import ModuleType

import pluggy

from ..plugins import Failure, PluginSource, entry_point_sources, load_plugins
from . import hookspecs
from .spec import EvalError, EvalTask, TaskInfo

ENTRY_POINT_GROUP = "medgemma.eval_tasks"
ENV_ALLOW = "MEDGEMMA_EVAL_PLUGINS"
ENV_DENY = "MEDGEMMA_EVAL_DISABLE_PLUGINS"
DISTRIBUTION = "medgemma-train"
BUILTIN = ("builtin", "medgemma_train.evals.tasks")


@dataclass(frozen=True)
class PluginProblem:
    """A plugin that failed to load or register, or a task name claimed twice."""

    plugin: str
    distribution: str
    problem: str


@dataclass
class Registry:
    """The loaded plugin manager and every task registered through it."""

    pm: pluggy.PluginManager
    tasks: dict[str, TaskInfo] = field(default_factory=dict)
    problems: list[PluginProblem] = field(default_factory=list)
    conflicts: dict[str, str] = field(default_factory=dict)

    def get(self, name: str) -> EvalTask:
        """Task ``name``; an :class:`EvalError` naming the known ones otherwise."""
        if name in self.conflicts:
            raise EvalError(self.conflicts[name])
        if name not in self.tasks:
            known = ", ".join(sorted(self.tasks)) or "none loaded"
            raise EvalError(f"unknown task {name!r} (available: {known}); see "
                            "`medgemma-train tasks`")
        return self.tasks[name].task


def _version(dist: str) -> str:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "0+unknown"


def _sources() -> list[PluginSource]:
    own = _version(DISTRIBUTION)
    return [PluginSource(BUILTIN[0], DISTRIBUTION, own,
                         lambda: importlib.import_module(BUILTIN[1])),
            *entry_point_sources(ENTRY_POINT_GROUP, unknown="unknown")]


def build_registry(extra: Iterable[tuple[str, ModuleType, str, str]] = ()) -> Registry:
    """Load every allowed plugin and collect the tasks it registers. ``extra``: ``(name,
    module, distribution, version)`` registered as if from an entry point (tests)."""
    sources = _sources() + [PluginSource(n, d, v, (lambda m=m: m)) for n, m, d, v in extra]
    loaded = load_plugins(hookspecs.PROJECT, hookspecs, "medgemma_eval_tasks", EvalTask, sources,
                          allow_env=ENV_ALLOW, deny_env=ENV_DENY, unique_names=True,
                          check_pending=True)
    registry = Registry(loaded.pm)
    claimed: dict[str, list[TaskInfo]] = {}
    for event in loaded.events:
        src = event.source
        if isinstance(event, Failure):
            what = "failed to load" if event.phase == "load" else "failed to register"
            registry.problems.append(PluginProblem(src.name, src.distribution,
                                                   f"{what}: {event.text}"))
            continue
        task = event.record
        claimed.setdefault(task.name, []).append(TaskInfo(task, src.name, src.distribution,
                                                          src.version))
    for task_name, infos in claimed.items():
        if len(infos) == 1:
            registry.tasks[task_name] = infos[0]
            continue
        who = " and ".join(f"{i.distribution} {i.version} (plugin {i.plugin!r})" for i in infos)
        msg = (f"task {task_name!r} is registered by both {who}; uninstall one, or disable one "
               f"with {ENV_DENY}=<plugin name>")
        registry.conflicts[task_name] = msg
        registry.problems.append(PluginProblem(",".join(i.plugin for i in infos),
                                               " and ".join(i.distribution for i in infos), msg))
    return registry


_REGISTRY: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry, built on first use."""
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = build_registry()
    return _REGISTRY


def set_registry(registry: Registry | None) -> Registry | None:
    """Install ``registry`` as the process-wide one (None: rebuild on next use); returns the
    previous one (tests)."""
    global _REGISTRY
    previous, _REGISTRY = _REGISTRY, registry
    return previous


def get_task(name: str) -> EvalTask:
    """The registered task ``name`` (:class:`EvalError` if unknown or claimed twice)."""
    return get_registry().get(name)


def list_tasks() -> list[TaskInfo]:
    """Every registered task, by name."""
    return [get_registry().tasks[k] for k in sorted(get_registry().tasks)]
