"""Finding, loading and registering plugins (built-in and third-party) with pluggy.

Built-in modalities are plugins like any other: they go through the same manager, the same
hook and the same allow/deny lists. Third-party plugins come from the entry-point group
``medgemma.modalities``. Each plugin is loaded and asked to register in its own try/except:
a broken plugin is reported (``medgemma-data plugins`` lists it), never fatal.

Environment variables:

``MEDGEMMA_DATA_PLUGINS``
    Comma-separated allow-list of plugin names (entry-point names; built-ins are named after
    their modality). When set, only these load; set it empty to load none.
``MEDGEMMA_DATA_DISABLE_PLUGINS``
    Comma-separated plugin names never to load.
``MEDGEMMA_DATA_TRACE``
    ``1`` prints every hook call, each detector's score and each load's time on stderr.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import os
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import ModuleType

import pluggy

from . import hookspecs
from .errors import PluginConflictError, UnknownModalityError
from .spec import ModalitySpec, PluginInfo, PluginProblem

ENTRY_POINT_GROUP = "medgemma.modalities"
ENV_ALLOW = "MEDGEMMA_DATA_PLUGINS"
ENV_DENY = "MEDGEMMA_DATA_DISABLE_PLUGINS"
ENV_TRACE = "MEDGEMMA_DATA_TRACE"
DISTRIBUTION = "medgemma-data"

#: Built-in plugin name -> module (each registers the modality of the same name).
BUILTINS: dict[str, str] = {
    name: f"medgemma_data.plugins.{name}"
    for name in ("radiograph", "ct", "mri", "wsi", "derm", "fundus", "ehr", "qa")
}


def tracing() -> bool:
    """Whether ``MEDGEMMA_DATA_TRACE`` asks for traces."""
    return os.environ.get(ENV_TRACE, "").strip().lower() not in ("", "0", "false", "no", "off")


def trace(message: str) -> None:
    """Print one trace line on stderr when tracing is on."""
    if tracing():
        print(f"medgemma-data trace: {message}", file=sys.stderr)


def _names(var: str) -> set[str] | None:
    raw = os.environ.get(var)
    if raw is None:
        return None
    return {n.strip() for n in raw.split(",") if n.strip()}


def _own_version() -> str:
    try:
        return md.version(DISTRIBUTION)
    except md.PackageNotFoundError:
        return "0+unknown"


@dataclass
class _Source:
    """A plugin the manager knows of: its name, where it comes from, and how to import it."""

    name: str
    distribution: str
    version: str
    load: object  # () -> module


@dataclass
class Registry:
    """The loaded plugin manager and every modality registered through it."""

    pm: pluggy.PluginManager
    specs: dict[str, tuple[ModalitySpec, PluginInfo]] = field(default_factory=dict)
    problems: list[PluginProblem] = field(default_factory=list)
    conflicts: dict[str, str] = field(default_factory=dict)

    def get(self, name: str) -> tuple[ModalitySpec, PluginInfo]:
        """The spec and info of modality ``name``; clear errors for conflicts and unknowns."""
        if name in self.conflicts:
            raise PluginConflictError(self.conflicts[name])
        if name not in self.specs:
            known = ", ".join(sorted(self.specs)) or "none loaded"
            raise UnknownModalityError(
                f"unknown modality {name!r} (available: {known}); check the spelling, or "
                f"install the plugin that provides it (see `medgemma-data plugins`)")
        return self.specs[name]


def _sources() -> list[_Source]:
    own = _own_version()
    found = [
        _Source(name, DISTRIBUTION, own, (lambda m=module: importlib.import_module(m)))
        for name, module in BUILTINS.items()
    ]
    for ep in md.entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist.name if ep.dist is not None else "unknown"
        version = ep.dist.version if ep.dist is not None else "unknown"
        found.append(_Source(ep.name, dist, version, ep.load))
    return found


def _monitor(pm: pluggy.PluginManager) -> None:
    starts: list[float] = []

    def before(hook_name: str, impls: list, kwargs: dict) -> None:
        starts.append(time.perf_counter())
        args = ", ".join(f"{k}={_short(v)}" for k, v in kwargs.items())
        who = ", ".join(i.plugin_name for i in impls)
        trace(f"call {hook_name}({args}) -> [{who}]")

    def after(outcome: object, hook_name: str, impls: list, kwargs: dict) -> None:
        ms = (time.perf_counter() - starts.pop()) * 1e3
        exc = getattr(outcome, "exception", None)
        trace(f"done {hook_name} in {ms:.1f} ms" + (f" raised {exc!r}" if exc else ""))

    pm.add_hookcall_monitoring(before, after)


def _short(value: object) -> str:
    if isinstance(value, list):
        return f"<{len(value)} items>"
    if callable(value):
        return f"<{getattr(value, '__name__', 'callable')}>"
    return repr(value)


def build_registry(extra: Iterable[tuple[str, ModuleType, str, str]] = ()) -> Registry:
    """Load every allowed plugin and collect what it registers.

    ``extra``: ``(plugin name, module, distribution, version)`` registered after the
    entry points as if they came from one; used by :mod:`medgemma_data.testing`.
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    if tracing():
        _monitor(pm)
    registry = Registry(pm)
    allow, deny = _names(ENV_ALLOW), _names(ENV_DENY) or set()
    sources = _sources() + [
        _Source(name, dist, version, (lambda m=mod: m)) for name, mod, dist, version in extra
    ]
    loaded: list[_Source] = []
    for src in sources:
        if (allow is not None and src.name not in allow) or src.name in deny:
            trace(f"skip plugin {src.name!r} ({src.distribution}): disabled by environment")
            continue
        try:
            module = src.load()  # type: ignore[operator]
            if pm.has_plugin(src.name):
                other = pm.get_plugin(src.name)
                raise ValueError(f"plugin name {src.name!r} is already taken by "
                                 f"{getattr(other, '__name__', other)}")
            pm.register(module, name=src.name)
        except Exception as exc:  # a broken plugin is reported, not fatal
            registry.problems.append(PluginProblem(src.name, src.distribution,
                                                   f"failed to load: {type(exc).__name__}: {exc}"))
            trace(f"plugin {src.name!r} failed to load: {exc!r}")
            continue
        loaded.append(src)
    while True:  # a hookimpl with no matching hookspec (a typo) disables its plugin
        try:
            pm.check_pending()
            break
        except pluggy.PluginValidationError as exc:
            bad = exc.plugin
            name = pm.get_name(bad) or "?"
            pm.unregister(bad)
            src = next((s for s in loaded if s.name == name), None)
            loaded = [s for s in loaded if s.name != name]
            registry.problems.append(PluginProblem(
                name, src.distribution if src else "unknown", f"unknown hook: {exc}"))
    claimed: dict[str, list[PluginInfo]] = {}
    specs: dict[str, ModalitySpec] = {}
    for src in loaded:
        plugin = pm.get_plugin(src.name)
        others = [p for p in pm.get_plugins() if p is not plugin]
        caller = pm.subset_hook_caller("medgemma_register_modalities", remove_plugins=others)
        mine: list[ModalitySpec] = []

        def register(spec: ModalitySpec, _mine: list[ModalitySpec] = mine) -> None:
            if not isinstance(spec, ModalitySpec):
                raise TypeError(f"register() takes a ModalitySpec, got {type(spec).__name__}")
            _mine.append(spec)

        try:
            caller(register=register)
        except Exception as exc:
            registry.problems.append(PluginProblem(
                src.name, src.distribution, f"failed to register: {type(exc).__name__}: {exc}"))
            trace(f"plugin {src.name!r} failed to register: {exc!r}")
            pm.unregister(plugin)
            continue
        for spec in mine:
            info = PluginInfo(spec.name, src.version, src.distribution, src.name,
                              spec.claims, spec.description, spec.options)
            claimed.setdefault(spec.name, []).append(info)
            specs.setdefault(spec.name, spec)
    for name, infos in claimed.items():
        if len(infos) == 1:
            registry.specs[name] = (specs[name], infos[0])
            continue
        who = " and ".join(f"{i.distribution} {i.version} (plugin {i.plugin!r})" for i in infos)
        msg = (f"modality {name!r} is registered by both {who}; uninstall one, or disable one "
               f"with {ENV_DENY}=<plugin name>")
        registry.conflicts[name] = msg
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


def reset_registry() -> None:
    """Forget the registry so the next call rebuilds it (after changing the environment)."""
    global _REGISTRY
    _REGISTRY = None


def set_registry(registry: Registry | None) -> Registry | None:
    """Install ``registry`` as the process-wide one (``None``: rebuild on next use); returns
    the previous one. For tests: see :func:`medgemma_data.testing.plugins_registered`."""
    global _REGISTRY
    previous, _REGISTRY = _REGISTRY, registry
    return previous
