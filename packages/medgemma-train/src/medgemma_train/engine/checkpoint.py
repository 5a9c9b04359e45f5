"""Run checkpoints: one Orbax ``CheckpointManager`` in ``RUN/checkpoints/``.

Each step folder holds three items: ``params`` (the trainable parameters, by their model
paths), ``opt`` (the optax state) and ``meta`` (JSON: step, seed, the data iterator's state,
the metrics, the base checkpoint and the resolved config). Frozen parameters are not saved:
they are the base checkpoint's, reloaded on resume (a LoRA run's checkpoints hold only the
adapters). Dropout masks derive from the seed and step (see :mod:`.step`).

Saves are asynchronous (the step continues while the files are written); each is written to
a temporary folder and renamed when complete, so a process killed mid-save leaves the last
complete checkpoint as ``latest_step``. The last ``keep_last`` checkpoints are kept, plus the
``keep_best`` best by ``best_metric`` among those saved with metrics.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax

__all__ = ["Checkpoints", "flatten", "nest", "unnest"]


def _key(k: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def flatten(tree: Any) -> tuple[list[tuple[str, ...]], list[Any], Any]:
    """``(names, leaves, treedef)`` of a pytree; names are tuples of strings."""
    with_path, treedef = jax.tree_util.tree_flatten_with_path(tree)
    names = [tuple(_key(k) for k in path) for path, _ in with_path]
    if len(set(names)) != len(names):
        raise ValueError("two leaves share a path; cannot checkpoint this tree by name")
    return names, [leaf for _, leaf in with_path], treedef


def nest(names: list[tuple[str, ...]], leaves: list[Any]) -> dict:
    out: dict = {}
    for name, leaf in zip(names, leaves, strict=True):
        node = out
        for part in name[:-1]:
            node = node.setdefault(part, {})
        node[name[-1] if name else "value"] = leaf
    return out


def unnest(tree: Mapping, names: list[tuple[str, ...]]) -> list[Any]:
    out = []
    for name in names:
        node: Any = tree
        for part in name or ("value",):
            node = node[part]
        out.append(node)
    return out


def _abstract(leaf: Any) -> Any:
    sharding = getattr(leaf, "sharding", None)
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)


class Checkpoints:
    """The run's checkpoint manager (see the module docstring)."""

    def __init__(self, directory: str | Path, *, keep_last: int = 2, keep_best: int = 1,
                 best_metric: str = "eval_loss", best_mode: str = "min",
                 async_save: bool = True, read_only: bool = False):
        import orbax.checkpoint as ocp
        from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

        self.directory = Path(directory).absolute()
        self.best_metric, self.best_mode = best_metric, best_mode
        policies = [pp.LatestN(n=max(1, int(keep_last)))]
        if keep_best > 0:
            policies.append(pp.BestN(get_metric_fn=lambda m: float(m[best_metric]),
                                     reverse=best_mode == "min", n=int(keep_best),
                                     keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=pp.AnyPreservationPolicy(policies),
            # best_fn makes Orbax write each step's metrics and read them back when a run
            # resumes (without it BestN forgets the kept best ones and deletes them)
            best_fn=(lambda m: float(m[best_metric])) if keep_best > 0 else None,
            best_mode=best_mode,
            enable_async_checkpointing=async_save, cleanup_tmp_directories=not read_only,
            read_only=read_only, create=not read_only)
        self._mgr = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("params", "opt", "meta"))
        self._ocp = ocp

    # ---- saving ---------------------------------------------------------------------------
    def save(self, step: int, params: Any, opt_state: Any, meta: dict,
             metrics: Mapping[str, float] | None = None, *, wait: bool = False) -> bool:
        ocp = self._ocp
        p_names, p_leaves, _ = flatten(params)
        o_names, o_leaves, _ = flatten(opt_state)
        good = None
        numbers = {k: float(v) for k, v in (metrics or {}).items()
                   if isinstance(v, int | float) and not isinstance(v, bool)}
        if self.best_metric in numbers:
            good = numbers
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(nest(p_names, p_leaves)),
            opt=ocp.args.StandardSave(nest(o_names, o_leaves)),
            meta=ocp.args.JsonSave(dict(meta)))
        saved = self._mgr.save(int(step), args=args, metrics=good, force=True)
        if wait:
            self.wait()
        return bool(saved)

    def wait(self) -> None:
        self._mgr.wait_until_finished()

    def close(self) -> None:
        self._mgr.wait_until_finished()
        self._mgr.close()

    # ---- reading --------------------------------------------------------------------------
    def steps(self) -> list[int]:
        return sorted(self._mgr.all_steps())

    def latest_step(self) -> int | None:
        return self._mgr.latest_step()

    def best_step(self) -> int | None:
        """The kept step with the best ``best_metric`` (None when none has metrics)."""
        best = None
        for step in self.steps():
            m = self.metrics(step)
            if not m or self.best_metric not in m:
                continue
            v = float(m[self.best_metric])
            if best is None or (v < best[0] if self.best_mode == "min" else v > best[0]):
                best = (v, step)
        return None if best is None else best[1]

    def metrics(self, step: int) -> dict | None:
        meta = self.meta(step)
        return meta.get("metrics")

    def meta(self, step: int) -> dict:
        ocp = self._ocp
        out = self._mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out["meta"])

    def restore(self, step: int, params: Any, opt_state: Any = None) -> tuple[Any, Any, dict]:
        """``(params, opt_state, meta)`` of ``step``, shaped and placed like the given trees
        (``opt_state`` None: parameters only)."""
        ocp = self._ocp
        p_names, p_leaves, p_def = flatten(params)
        items = {"params": ocp.args.StandardRestore(nest(p_names, [_abstract(x)
                                                                    for x in p_leaves])),
                 "meta": ocp.args.JsonRestore()}
        if opt_state is not None:
            o_names, o_leaves, o_def = flatten(opt_state)
            items["opt"] = ocp.args.StandardRestore(nest(o_names, [_abstract(x)
                                                                   for x in o_leaves]))
        out = self._mgr.restore(step, args=ocp.args.Composite(**items))
        new_params = p_def.unflatten(unnest(out["params"], p_names))
        new_opt = None
        if opt_state is not None:
            new_opt = o_def.unflatten(unnest(out["opt"], o_names))
        return new_params, new_opt, dict(out["meta"])
