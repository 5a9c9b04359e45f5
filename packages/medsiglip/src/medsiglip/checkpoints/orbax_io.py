"""Saving and restoring SigLIP models as Orbax folders.

The layout is :mod:`medsiglip.weights`' (``weights.json`` with kind ``siglip`` or ``vision``,
the config in the HF dict form and the dtype, beside ``params/``), plus ``spiece.model`` when
a tokenizer file is given.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import jax.numpy as jnp

from medsiglip import weights
from medsiglip.config import SiglipConfig, SiglipVisionConfig
from medsiglip.model import SiglipModel
from medsiglip.vision import VisionTower
from medsiglip.weights import CheckpointError, abstract_module


def save_checkpoint(model: SiglipModel | VisionTower, directory: str | Path, *,
                    tokenizer_file: str | Path | None = None, overwrite: bool = False) -> Path:
    """Write ``model`` (and optionally its SentencePiece file) to ``directory``."""
    if isinstance(model, SiglipModel):
        kind = "siglip"
    elif isinstance(model, VisionTower):
        kind = "vision"
    else:
        raise TypeError(f"cannot save a {type(model).__name__}: pass a SiglipModel or VisionTower")
    directory = weights.save(model, directory, kind=kind, config=model.config.to_hf_dict(),
                             overwrite=overwrite)
    if tokenizer_file is not None:
        shutil.copyfile(tokenizer_file, directory / "spiece.model")
    return directory


def restore_checkpoint(directory: str | Path) -> SiglipModel | VisionTower:
    """Restore what :func:`save_checkpoint` wrote, in the dtype it was saved in."""
    meta = weights.read_meta(directory)
    saved = jnp.dtype(meta.get("dtype", "float32"))
    if meta["kind"] == "siglip":
        config = SiglipConfig.from_hf_dict(meta["config"])
        abstract = abstract_module(lambda r: SiglipModel(config, dtype=saved, rngs=r))
    elif meta["kind"] == "vision":
        vconfig = SiglipVisionConfig.from_hf_dict(meta["config"])
        abstract = abstract_module(lambda r: VisionTower(vconfig, dtype=saved, rngs=r))
    else:
        raise CheckpointError(f"{directory}: holds a {meta['kind']!r} model, not a SigLIP one "
                              f"(kind 'siglip' or 'vision' in {weights.META})")
    return weights.restore(abstract, directory)
