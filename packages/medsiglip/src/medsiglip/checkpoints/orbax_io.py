"""Saving and restoring models as Orbax checkpoints.

Folder layout: ``medsiglip.json`` (kind, config in the HF dict form, dtype), ``state/`` (the
Orbax ``StandardCheckpointer`` tree of the NNX state) and, when given, ``spiece.model``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from medsiglip.checkpoints.convert import abstract_module
from medsiglip.checkpoints.hf import CheckpointError
from medsiglip.config import SiglipConfig, SiglipVisionConfig
from medsiglip.model import SiglipModel
from medsiglip.vision import VisionTower

META = "medsiglip.json"


def save_checkpoint(model: SiglipModel | VisionTower, directory: str | Path, *,
                    tokenizer_file: str | Path | None = None, overwrite: bool = False) -> Path:
    """Write ``model`` (and optionally its SentencePiece file) to ``directory``."""
    directory = Path(directory).absolute()
    if isinstance(model, SiglipModel):
        kind, config = "siglip", model.config.to_hf_dict()
        dtype = model.vision.post_layernorm.scale.dtype
    elif isinstance(model, VisionTower):
        kind, config = "vision", model.config.to_hf_dict()
        dtype = model.post_layernorm.scale.dtype
    else:
        raise TypeError(f"cannot save a {type(model).__name__}: pass a SiglipModel or VisionTower")
    if directory.exists() and any(directory.iterdir()) and not overwrite:
        raise FileExistsError(f"{directory} is not empty: pass overwrite=True or a new folder")
    directory.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(directory / "state", nnx.state(model), force=True)
        ckptr.wait_until_finished()
    meta = {"format": "medsiglip-orbax", "version": 1, "kind": kind, "config": config,
            "dtype": jnp.dtype(dtype).name}
    (directory / META).write_text(json.dumps(meta, indent=2))
    if tokenizer_file is not None:
        shutil.copyfile(tokenizer_file, directory / "spiece.model")
    return directory


def is_orbax_checkpoint(directory: str | Path) -> bool:
    return (Path(directory) / META).is_file()


def restore_checkpoint(directory: str | Path) -> SiglipModel | VisionTower:
    """Restore what :func:`save_checkpoint` wrote, in the dtype it was saved in."""
    directory = Path(directory).absolute()
    if not is_orbax_checkpoint(directory):
        raise CheckpointError(f"{directory}: no {META}; not a folder saved by medsiglip")
    meta = json.loads((directory / META).read_text())
    saved = jnp.dtype(meta["dtype"])
    if meta["kind"] == "siglip":
        config = SiglipConfig.from_hf_dict(meta["config"])
        abstract = abstract_module(lambda r: SiglipModel(config, dtype=saved, rngs=r))
    elif meta["kind"] == "vision":
        vconfig = SiglipVisionConfig.from_hf_dict(meta["config"])
        abstract = abstract_module(lambda r: VisionTower(vconfig, dtype=saved, rngs=r))
    else:
        raise CheckpointError(f"{directory}: unknown kind {meta['kind']!r} in {META}")
    graphdef, abstract_state = nnx.split(abstract)
    with ocp.StandardCheckpointer() as ckptr:
        state = ckptr.restore(directory / "state", abstract_state)
    return nnx.merge(graphdef, state)
