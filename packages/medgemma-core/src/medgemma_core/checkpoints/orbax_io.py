"""Orbax save and restore of our own parameters (plus the config as JSON beside them)."""

from __future__ import annotations

import json
from pathlib import Path

from flax import nnx

from .build import CheckpointError

MARKER = "medgemma.json"


def save(model: nnx.Module, folder: str | Path, *, config: dict, kind: str) -> Path:
    """Write ``folder/params`` (Orbax) and ``folder/medgemma.json`` (kind + config)."""
    import orbax.checkpoint as ocp

    folder = Path(folder).absolute()
    folder.mkdir(parents=True, exist_ok=True)
    state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(folder / "params", state, force=True)
    (folder / MARKER).write_text(json.dumps({"kind": kind, "config": config}, indent=1))
    return folder


def is_orbax(folder: str | Path) -> bool:
    return (Path(folder) / MARKER).exists() and (Path(folder) / "params").is_dir()


def read_meta(folder: str | Path) -> dict:
    try:
        return json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{Path(folder) / MARKER}: unreadable ({exc})") from None


def restore(abstract: nnx.Module, folder: str | Path) -> nnx.Module:
    """Restore parameters saved by :func:`save` into a model built with ``nnx.eval_shape``."""
    import orbax.checkpoint as ocp

    folder = Path(folder).absolute()
    graphdef, state = nnx.split(abstract)
    target = nnx.to_pure_dict(state)
    try:
        with ocp.StandardCheckpointer() as ckpt:
            restored = ckpt.restore(folder / "params", target)
    except Exception as exc:
        raise CheckpointError(
            f"{folder / 'params'}: cannot restore the Orbax checkpoint ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); it does not match "
            f"{MARKER}'s config or is incomplete") from None
    nnx.replace_by_pure_dict(state, restored)
    return nnx.merge(graphdef, state)
