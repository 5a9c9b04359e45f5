"""Loading Hugging Face checkpoint folders (``config.json`` + ``*.safetensors``).

* ``model_type == "siglip"`` (MedSigLIP-448 layout): the two-tower :class:`SiglipModel`.
* ``model_type == "siglip_vision_model"``: a :class:`VisionTower`.
* any config with a ``vision_config`` entry (Gemma 3 multimodal, e.g. MedGemma 4B): its
  :class:`VisionTower` only (:func:`load_vision_tower`).

Tensors are read lazily from the safetensors files (sharded or not), one at a time.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from medsiglip.checkpoints.convert import (
    load_siglip_from_tensors,
    load_vision_tower_from_tensors,
)
from medsiglip.config import SiglipConfig, SiglipVisionConfig
from medsiglip.model import SiglipModel
from medsiglip.vision import VisionTower


class CheckpointError(ValueError):
    """A checkpoint folder is missing, incomplete or of an unsupported kind."""


def read_config(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(
            f"{folder}: no config.json; pass a Hugging Face checkpoint folder (or an Orbax "
            "folder saved by medsiglip.save_checkpoint)"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [folder / s for s in shards]
        absent = [str(f) for f in files if not f.is_file()]
        if absent:
            raise CheckpointError(f"shard {absent[0]} named in {index.name} is missing")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        extra = " (only pytorch_model.bin: re-save with safe_serialization=True)" if (
            folder / "pytorch_model.bin").exists() else ""
        raise CheckpointError(f"{folder}: no *.safetensors weights{extra}")
    return files


@contextmanager
def open_safetensors(folder: str | Path) -> Iterator[tuple[Any, list[str]]]:
    """Yields ``(read, names)``: ``read(name)`` returns one tensor as a numpy array
    (bfloat16 as ``ml_dtypes.bfloat16``), read from disk only when asked for."""
    folder = Path(folder)
    files = _safetensors_files(folder)
    with ExitStack() as stack:
        where: dict[str, Any] = {}
        for file in files:
            try:
                handle = stack.enter_context(safe_open(str(file), framework="flax"))
            except Exception as err:  # noqa: BLE001 - any parse failure is a bad file
                raise CheckpointError(f"{file}: not a readable safetensors file ({err})") from None
            for name in handle.keys():
                where[name] = handle

        def read(name: str) -> np.ndarray:
            return np.asarray(where[name].get_tensor(name))

        yield read, list(where)


def vision_config_of(config: dict[str, Any]) -> SiglipVisionConfig:
    """The vision tower config of a HF ``config.json`` dict of any supported kind."""
    kind = config.get("model_type")
    if kind == "siglip_vision_model":
        return SiglipVisionConfig.from_hf_dict(config)
    if "vision_config" in config:
        return SiglipVisionConfig.from_hf_dict(config["vision_config"] or {})
    raise CheckpointError(
        f"config.json has model_type {kind!r} and no vision_config: not a SigLIP or Gemma 3 "
        "multimodal checkpoint"
    )


def load_vision_tower(folder: str | Path, *, dtype: jnp.dtype = jnp.float32,
                      image_size: int | None = None) -> VisionTower:
    """The vision tower of a HF SiglipModel / SiglipVisionModel / Gemma 3 folder.

    ``image_size``: run at another resolution; the position grid is resampled bilinearly.
    """
    config = vision_config_of(read_config(folder))
    if image_size is not None:
        config = config.replace(image_size=image_size)
    with open_safetensors(folder) as (read, names):
        return load_vision_tower_from_tensors(config, read, names, dtype=dtype,
                                              resize_positions=image_size is not None)


def load_siglip(folder: str | Path, *, dtype: jnp.dtype = jnp.float32,
                image_size: int | None = None) -> SiglipModel:
    """The two-tower model of a HF ``SiglipModel`` folder (e.g. google/medsiglip-448)."""
    raw = read_config(folder)
    if raw.get("model_type") != "siglip":
        raise CheckpointError(
            f"{folder}: model_type is {raw.get('model_type')!r}, not 'siglip': a two-tower "
            "SigLIP checkpoint is needed here (use load_vision_tower for a vision tower)"
        )
    config = SiglipConfig.from_hf_dict(raw)
    if image_size is not None:
        config = config.replace(vision=config.vision.replace(image_size=image_size))
    with open_safetensors(folder) as (read, names):
        return load_siglip_from_tensors(config, read, names, dtype=dtype,
                                        resize_positions=image_size is not None)
