"""Gemma3ForConditionalGeneration checkpoints (google/medgemma-4b-it, -27b-it) and Orbax folders
of the whole image-text model.

A Hugging Face folder holds ``config.json`` (``text_config``, ``vision_config``,
``mm_tokens_per_image``, ``image_token_index``, ...) and ``model*.safetensors`` (sharded with an
index). Tensors: the decoder under one of :data:`~.names.TEXT_PREFIXES`, the vision tower under
medsiglip's prefixes, and the projector::

    [model.]multi_modal_projector.mm_soft_emb_norm.weight            [Dv]
    [model.]multi_modal_projector.mm_input_projection_weight         [Dv, D]  (no transpose)

Tensors are read into fresh buffers, one at a time, converted and cast before the next
(:class:`medsiglip.weights.SafetensorsSource` and ``fill``): memory-mapped reads would leave
every page of the file resident in this process (counted in its RSS) until the file is closed,
doubling the peak for a 4B model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from medsiglip import load_vision_tower_from_tensors, weights
from medsiglip.weights import (
    CheckpointError,
    SafetensorsSource,
    TensorSpec,
    abstract_module,
    fill,
    read_hf_config,
)

from ..multimodal import Gemma3Multimodal, MultimodalConfig
from . import resolve_dtype
from .names import TEXT_PREFIXES, find_prefix, text_specs

__all__ = ["KIND", "PROJECTOR_PREFIXES", "is_multimodal", "load_multimodal",
           "read_multimodal_config", "save_multimodal"]

KIND = "gemma3_multimodal"
PROJECTOR_PREFIXES = ("model.multi_modal_projector.", "multi_modal_projector.")
_NORM, _PROJ = "mm_soft_emb_norm.weight", "mm_input_projection_weight"


def is_multimodal(path: str | Path) -> bool:
    """A Gemma3ForConditionalGeneration folder (``vision_config`` in config.json) or an Orbax
    folder saved by :func:`save_multimodal`."""
    path = Path(path)
    if not path.is_dir():
        return False
    if weights.is_saved(path):
        try:
            return weights.read_meta(path)["kind"] == KIND
        except CheckpointError:
            pass  # an older layout: decided by config.json; the loader says what to do
    cfg = path / "config.json"
    if not cfg.is_file():
        return False
    try:
        return "vision_config" in json.loads(cfg.read_text())
    except (OSError, ValueError):
        return False


def read_multimodal_config(path: str | Path) -> MultimodalConfig:
    path = Path(path)
    raw = weights.read_meta(path)["config"] if weights.is_saved(path) else read_hf_config(path)
    try:
        return MultimodalConfig.from_hf_dict(raw)
    except ValueError as exc:
        raise CheckpointError(f"{path / 'config.json'}: {exc}") from None


def _projector_specs(cfg: MultimodalConfig, prefix: str) -> list[TensorSpec]:
    dv, d = cfg.vision.hidden_size, cfg.text.hidden_size
    return [TensorSpec(("norm", "scale"), prefix + _NORM, (dv,)),
            TensorSpec(("weight",), prefix + _PROJ, (dv, d))]


def load_multimodal(path: str | Path, *, dtype: Any = "float32") -> Gemma3Multimodal:
    """Load the image-text model from a Hugging Face folder or one of our Orbax folders."""
    dtype = resolve_dtype(dtype)
    path = Path(path)
    cfg = read_multimodal_config(path)
    abstract = abstract_module(lambda rngs: Gemma3Multimodal(cfg, dtype=dtype, rngs=rngs))
    if weights.is_saved(path):
        return weights.restore(abstract, path)
    src = SafetensorsSource(path)
    names = src.names()
    prefix = find_prefix(names, TEXT_PREFIXES)
    if prefix is None:
        raise CheckpointError(f"{path}: no Gemma 3 text weights (embed_tokens.weight) found; is "
                              f"this a Gemma 3 image-text checkpoint?")
    decoder = fill(abstract.decoder, src, text_specs(cfg.text, prefix))
    pprefix = find_prefix(names, PROJECTOR_PREFIXES, anchor=_PROJ)
    if pprefix is None:
        raise CheckpointError(f"{path}: tensor 'multi_modal_projector.{_PROJ}' is missing "
                              f"(looked under {', '.join(PROJECTOR_PREFIXES)}); the checkpoint "
                              f"is incomplete, re-download it")
    vision = load_vision_tower_from_tensors(cfg.vision, src, dtype=dtype)
    projector = fill(abstract.projector, src, _projector_specs(cfg, pprefix))
    model = abstract
    model.decoder, model.vision, model.projector = decoder, vision, projector
    return model


def save_multimodal(model: Gemma3Multimodal, folder: str | Path, *, tokenizer: Any = None) -> Path:
    """Save the whole image-text model with Orbax (restorable by :func:`load_multimodal` and
    ``medgemma_core.load``); with ``tokenizer``, its ``tokenizer.model`` and added tokens too."""
    folder = weights.save(model, folder, kind=KIND, config=model.config.to_hf_dict(),
                          overwrite=True)
    # config.json too, so that Processor.from_checkpoint(folder) reads the sizes
    (folder / "config.json").write_text(json.dumps(model.config.to_hf_dict(), indent=1))
    if tokenizer is not None:
        tokenizer.save(folder)
        decoder = {str(i): {"content": t, "special": i in tokenizer.special_ids}
                   for i, t in tokenizer.added_tokens.items()}
        (folder / "tokenizer_config.json").write_text(
            json.dumps({"added_tokens_decoder": decoder}, indent=1))
    return folder
