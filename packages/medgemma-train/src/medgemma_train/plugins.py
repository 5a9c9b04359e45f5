"""One pluggy plugin loader for the package's three plugin kinds: training stages
(:mod:`medgemma_train.engine.stages`), RL rewards (:mod:`medgemma_train.engine.rewards`) and
evaluation tasks (:mod:`medgemma_train.evals.registry`), as ``medgemma_data.manager`` loads
modalities.

Each kind names its built-in plugins and an entry-point group (:func:`entry_point_sources`);
:func:`load_plugins` puts every allowed one (an allow-list and a deny-list environment
variable) into one ``pluggy.PluginManager`` and calls the kind's hook on each plugin alone
with a ``register`` callback that takes the kind's record type. Each plugin loads and
registers in its own try/except: a broken plugin becomes a :class:`Failure` (its records, if
any, are dropped), never an exception. The result lists, in load order, every failure and
every claim (a record and the plugin that registered it); each kind turns those into its own
registry, its messages and its rule for two plugins claiming one name.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata as md
import os
from collections.abc import Callable, Sequence
from typing import Any

import pluggy

__all__ = ["Claim", "Failure", "Loaded", "PluginSource", "entry_point_sources", "env_names",
           "load_plugins"]


@dataclasses.dataclass(frozen=True)
class PluginSource:
    """A plugin to load: its name (what the allow/deny lists and messages use), the
    distribution and version that ship it, and ``load() -> module or object`` holding hook
    implementations."""

    name: str
    distribution: str
    version: str
    load: Callable[[], Any]


@dataclasses.dataclass(frozen=True)
class Claim:
    record: Any
    source: PluginSource


@dataclasses.dataclass(frozen=True)
class Failure:
    """``phase``: ``load`` (import or registration with the manager) or ``register`` (the
    hook call)."""

    source: PluginSource
    phase: str
    error: BaseException

    @property
    def text(self) -> str:
        return f"{type(self.error).__name__}: {self.error}"


@dataclasses.dataclass
class Loaded:
    pm: pluggy.PluginManager
    events: list[Claim | Failure] = dataclasses.field(default_factory=list)

    @property
    def claims(self) -> list[Claim]:
        return [e for e in self.events if isinstance(e, Claim)]

    @property
    def failures(self) -> list[Failure]:
        return [e for e in self.events if isinstance(e, Failure)]


def env_names(var: str) -> set[str] | None:
    """The comma-separated names in environment variable ``var`` (None when unset)."""
    raw = os.environ.get(var)
    return None if raw is None else {n.strip() for n in raw.split(",") if n.strip()}


def entry_point_sources(group: str, unknown: str = "?") -> list[PluginSource]:
    """A :class:`PluginSource` per installed entry point of ``group`` (``unknown`` where the
    entry point has no distribution)."""
    out = []
    for ep in md.entry_points(group=group):
        dist = ep.dist.name if ep.dist is not None else unknown
        version = ep.dist.version if ep.dist is not None else unknown
        out.append(PluginSource(ep.name, dist, version, ep.load))
    return out


def load_plugins(project: str, hookspecs: Any, hook: str, record_type: type,
                 sources: Sequence[PluginSource | tuple], *, allow_env: str, deny_env: str,
                 unique_names: bool = False, check_pending: bool = False,
                 instantiate: bool = False) -> Loaded:
    """Load ``sources`` (see the module docstring). ``hookspecs``: the kind's hookspec module
    or class (project ``project``), ``hook`` the hook's name; ``register(record)`` rejects
    anything but a ``record_type`` with ``TypeError: register() takes a <type>, got <type>``.

    ``unique_names``: a second plugin of a name fails to load (``plugin name 'x' is already
    taken``; else both load); ``check_pending``: a plugin implementing a hook the kind does
    not know fails to load; ``instantiate``: a loaded class is instantiated first."""
    pm = pluggy.PluginManager(project)
    pm.add_hookspecs(hookspecs)
    out = Loaded(pm)
    allow, deny = env_names(allow_env), env_names(deny_env) or set()
    for n, source in enumerate(sources):
        if not isinstance(source, PluginSource):  # (name, distribution[, version], load)
            *head, load = source
            source = PluginSource(head[0], head[1], head[2] if len(head) > 2 else "?", load)
        name = source.name
        if name in deny or (allow is not None and name not in allow):
            continue
        key, registered = name, False
        try:
            obj = source.load()
            if instantiate and isinstance(obj, type):
                obj = obj()
            if pm.has_plugin(key):
                if unique_names:
                    raise ValueError(f"plugin name {name!r} is already taken")
                key = f"{name}#{n}"
            pm.register(obj, name=key)
            registered = True
            if check_pending:
                pm.check_pending()
        except Exception as exc:  # noqa: BLE001 (a broken plugin is reported, not fatal)
            if registered:
                pm.unregister(name=key)
            out.events.append(Failure(source, "load", exc))
            continue
        plugin = pm.get_plugin(key)
        others = [p for p in pm.get_plugins() if p is not plugin]
        caller = pm.subset_hook_caller(hook, remove_plugins=others)
        mine: list[Any] = []

        def register(record: Any, _mine: list = mine) -> None:
            if not isinstance(record, record_type):
                raise TypeError(f"register() takes a {record_type.__name__}, got "
                                f"{type(record).__name__}")
            _mine.append(record)

        try:
            caller(register=register)
        except Exception as exc:  # noqa: BLE001
            out.events.append(Failure(source, "register", exc))
            pm.unregister(plugin)
            continue
        out.events += [Claim(r, source) for r in mine]
    return out
