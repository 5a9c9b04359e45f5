"""Loading Hugging Face checkpoint folders (``config.json`` + ``*.safetensors``).

* ``model_type == "siglip"`` (MedSigLIP-448 layout): the two-tower :class:`SiglipModel`.
* ``model_type == "siglip_vision_model"``: a :class:`VisionTower`.
* any config with a ``vision_config`` entry (Gemma 3 multimodal, e.g. MedGemma 4B): its
  :class:`VisionTower` only (:func:`load_vision_tower`).

Tensors are read from the safetensors files (sharded or not) one at a time
(:class:`~medsiglip.weights.SafetensorsSource`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax.numpy as jnp

from medsiglip.checkpoints.convert import (
    load_siglip_from_tensors,
    load_vision_tower_from_tensors,
)
from medsiglip.config import SiglipConfig, SiglipVisionConfig
from medsiglip.model import SiglipModel
from medsiglip.vision import VisionTower
from medsiglip.weights import CheckpointError, SafetensorsSource, read_hf_config


def _config_error(folder: str | Path, exc: ValueError) -> CheckpointError:
    return exc if isinstance(exc, CheckpointError) else CheckpointError(
        f"{Path(folder) / 'config.json'}: {exc}")


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
    try:
        config = vision_config_of(read_hf_config(folder))
    except ValueError as exc:
        raise _config_error(folder, exc) from None
    if image_size is not None:
        config = config.replace(image_size=image_size)
    return load_vision_tower_from_tensors(config, SafetensorsSource(folder), dtype=dtype,
                                          resize_positions=image_size is not None)


def load_siglip(folder: str | Path, *, dtype: jnp.dtype = jnp.float32,
                image_size: int | None = None) -> SiglipModel:
    """The two-tower model of a HF ``SiglipModel`` folder (e.g. google/medsiglip-448)."""
    raw = read_hf_config(folder)
    if raw.get("model_type") != "siglip":
        raise CheckpointError(
            f"{folder}: model_type is {raw.get('model_type')!r}, not 'siglip': a two-tower "
            "SigLIP checkpoint is needed here (use load_vision_tower for a vision tower)"
        )
    try:
        config = SiglipConfig.from_hf_dict(raw)
    except ValueError as exc:
        raise _config_error(folder, exc) from None
    if image_size is not None:
        config = config.replace(vision=config.vision.replace(image_size=image_size))
    return load_siglip_from_tensors(config, SafetensorsSource(folder), dtype=dtype,
                                    resize_positions=image_size is not None)
