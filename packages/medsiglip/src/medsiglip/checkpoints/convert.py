"""Hugging Face tensor names -> NNX parameters of the SigLIP towers.

The tables here say which Hugging Face tensor becomes which parameter, at which stored shape
and through which conversion (and its inverse, for the export back) (torch's ``[out, in]`` -> ``[in, out]``, OIHW -> HWIO, a packed
q/k/v ``in_proj`` split in three); :func:`medsiglip.weights.fill` then reads, converts and
places one tensor at a time. Tensors come from any :class:`~medsiglip.weights.TensorSource`
or a mapping ``name -> array``. A checkpoint that does not fit raises a
:class:`~medsiglip.weights.CheckpointError` naming the tensor.

Accepted vision prefixes (first match wins): ``vision_tower.vision_model.``,
``model.vision_tower.vision_model.``, ``vision_tower.``, ``model.vision_tower.``,
``vision_model.`` and no prefix at all.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from medsiglip.config import SiglipConfig, SiglipTextConfig, SiglipVisionConfig
from medsiglip.model import SiglipModel
from medsiglip.posemb import grid_side, resize_position_embedding
from medsiglip.text import TextTower
from medsiglip.vision import VisionTower
from medsiglip.weights import (
    CheckpointError,
    TensorSource,
    TensorSpec,
    abstract_module,
    as_source,
    fill,
)

Path = tuple[str | int, ...]
Tensors = TensorSource | Mapping[str, Any]

VISION_PREFIXES = (
    "vision_tower.vision_model.",
    "model.vision_tower.vision_model.",
    "vision_tower.",
    "model.vision_tower.",
    "vision_model.",
    "",
)
_PROBE = "embeddings.patch_embedding.weight"
POSITION_NAME = "embeddings.position_embedding.weight"


def _t(x: np.ndarray) -> np.ndarray:
    """torch Linear ``[out, in]`` -> ``[in, out]`` (and back)."""
    return x.T


def _same(x: np.ndarray) -> np.ndarray:
    """The model holds the stored layout (the position table at the config's grid)."""
    return x


def _oihw_to_hwio(x: np.ndarray) -> np.ndarray:
    return x.transpose(2, 3, 1, 0)


def _hwio_to_oihw(x: np.ndarray) -> np.ndarray:
    return x.transpose(3, 2, 0, 1)


def _rows(i: int) -> Callable[[np.ndarray], np.ndarray]:
    """Part ``i`` of a packed q,k,v ``in_proj`` (weight ``[3D, D]`` or bias ``[3D]``)."""

    def take(x: np.ndarray) -> np.ndarray:
        d = x.shape[0] // 3
        part = x[i * d:(i + 1) * d]
        return part.T if part.ndim == 2 else part

    return take


def _unrow(x: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_rows` for one part; the export concatenates the three parts."""
    return x.T if x.ndim == 2 else x


def _linear(path: Path, name: str, d_in: int, d_out: int) -> list[TensorSpec]:
    return [TensorSpec(path + ("kernel",), f"{name}.weight", (d_out, d_in), _t, _t),
            TensorSpec(path + ("bias",), f"{name}.bias", (d_out,))]


def _norm(path: Path, name: str, d: int) -> list[TensorSpec]:
    return [TensorSpec(path + ("scale",), f"{name}.weight", (d,)),
            TensorSpec(path + ("bias",), f"{name}.bias", (d,))]


def _encoder(config: SiglipVisionConfig | SiglipTextConfig, prefix: str) -> list[TensorSpec]:
    d, f = config.hidden_size, config.intermediate_size
    specs: list[TensorSpec] = []
    for j in range(config.num_layers):
        src, dst = f"{prefix}encoder.layers.{j}.", ("encoder", "layers", j)
        specs += _norm(dst + ("layer_norm1",), src + "layer_norm1", d)
        specs += _norm(dst + ("layer_norm2",), src + "layer_norm2", d)
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            specs += _linear(dst + ("self_attn", proj), f"{src}self_attn.{proj}", d, d)
        specs += _linear(dst + ("mlp", "fc1"), src + "mlp.fc1", d, f)
        specs += _linear(dst + ("mlp", "fc2"), src + "mlp.fc2", f, d)
    return specs


def vision_specs(config: SiglipVisionConfig, prefix: str, *, resize_positions: bool = False
                 ) -> list[TensorSpec]:
    """Every vision-tower parameter and the HF tensor it comes from. The position table's
    stored shape is checked when it is read, and with ``resize_positions`` a grid of another
    size is resampled to the config's."""
    p, d, f = prefix, config.hidden_size, config.intermediate_size
    patch = (d, config.num_channels, config.patch_size, config.patch_size)
    specs = [
        TensorSpec(("embeddings", "kernel"), p + _PROBE, patch, _oihw_to_hwio, _hwio_to_oihw),
        TensorSpec(("embeddings", "bias"), p + "embeddings.patch_embedding.bias", (d,)),
        TensorSpec(("embeddings", "position_embedding"), p + POSITION_NAME, None,
                   _position_fix(config, p + POSITION_NAME, resize_positions), _same),
    ]
    specs += _encoder(config, p)
    specs += _norm(("post_layernorm",), p + "post_layernorm", d)
    if config.use_head:
        h = p + "head."
        specs.append(TensorSpec(("head", "probe"), h + "probe", (1, 1, d)))
        for i, proj in enumerate(("q_proj", "k_proj", "v_proj")):
            specs.append(TensorSpec(("head", "attention", proj, "kernel"),
                                    h + "attention.in_proj_weight", (3 * d, d), _rows(i),
                                    _unrow))
            specs.append(TensorSpec(("head", "attention", proj, "bias"),
                                    h + "attention.in_proj_bias", (3 * d,), _rows(i), _unrow))
        specs += _linear(("head", "attention", "out_proj"), h + "attention.out_proj", d, d)
        specs += _norm(("head", "layernorm"), h + "layernorm", d)
        specs += _linear(("head", "mlp", "fc1"), h + "mlp.fc1", d, f)
        specs += _linear(("head", "mlp", "fc2"), h + "mlp.fc2", f, d)
    return specs


def text_specs(config: SiglipTextConfig, prefix: str = "text_model.") -> list[TensorSpec]:
    """Every text-tower parameter and the HF tensor it comes from."""
    p, d = prefix, config.hidden_size
    specs = [
        TensorSpec(("token_embedding", "embedding"), p + "embeddings.token_embedding.weight",
                   (config.vocab_size, d)),
        TensorSpec(("position_embedding",), p + "embeddings.position_embedding.weight",
                   (config.max_positions, d)),
    ]
    specs += _encoder(config, p)
    specs += _norm(("final_layer_norm",), p + "final_layer_norm", d)
    specs += _linear(("head",), p + "head", d, config.projection_size)
    return specs


def find_vision_prefix(source: TensorSource) -> str:
    """The first of :data:`VISION_PREFIXES` under which a vision tower's tensors exist."""
    names = set(source.names())
    for prefix in VISION_PREFIXES:
        if prefix + _PROBE in names:
            return prefix
    raise CheckpointError(
        f"{source.where(_PROBE)}: no vision tower found: none of "
        + ", ".join(repr(p + _PROBE) for p in VISION_PREFIXES)
        + " is among the checkpoint's tensors; is this a SigLIP or Gemma 3 multimodal checkpoint?"
    )


def _position_fix(config: SiglipVisionConfig, name: str, resize_positions: bool
                  ) -> Callable[[np.ndarray], np.ndarray]:
    """Checks (and if asked, resamples) the position table against ``config``'s grid."""

    def fix(x: np.ndarray) -> np.ndarray:
        want = config.num_patches
        if x.ndim != 2 or x.shape[1] != config.hidden_size:
            raise CheckpointError(
                f"tensor {name!r} has shape {list(x.shape)}, expected "
                f"[{want}, {config.hidden_size}]: the checkpoint does not match the config"
            )
        if x.shape[0] == want:
            return x
        side = grid_side(x.shape[0], name=name)
        if not resize_positions:
            raise CheckpointError(
                f"tensor {name!r} holds a {side}x{side} position grid ({side * config.patch_size}"
                f" px) but image_size {config.image_size} / patch {config.patch_size} needs "
                f"{config.grid_size}x{config.grid_size}: pass resize_positions=True to resample "
                f"it, or set image_size={side * config.patch_size}"
            )
        return np.asarray(resize_position_embedding(x, config.grid_size, name=name))

    return fix


def load_vision_tower_from_tensors(
    config: SiglipVisionConfig,
    tensors: Tensors,
    *,
    dtype: jnp.dtype = jnp.float32,
    prefix: str | None = None,
    resize_positions: bool = False,
) -> VisionTower:
    """Build a :class:`VisionTower` from HF-named tensors (SiglipModel, SiglipVisionModel or a
    Gemma 3 multimodal checkpoint; see :data:`VISION_PREFIXES`).

    ``tensors``: a :class:`~medsiglip.weights.TensorSource` or a mapping ``name -> array``
    (numpy, ml_dtypes bfloat16, jax or torch CPU arrays via ``np.asarray``); other tensors (a
    language model's) are ignored. ``prefix``: force a prefix instead of detecting it.
    ``resize_positions``: resample a checkpoint's position grid of another size to
    ``config.image_size`` (bilinear).
    """
    source = as_source(tensors)
    prefix = find_vision_prefix(source) if prefix is None else prefix
    abstract = abstract_module(lambda r: VisionTower(config, dtype=dtype, rngs=r))
    return fill(abstract, source, vision_specs(config, prefix, resize_positions=resize_positions))


def load_text_tower_from_tensors(config: SiglipTextConfig, tensors: Tensors, *,
                                 dtype: jnp.dtype = jnp.float32,
                                 prefix: str = "text_model.") -> TextTower:
    """Build a :class:`TextTower` from HF ``SiglipModel`` tensors (``text_model.*``)."""
    abstract = abstract_module(lambda r: TextTower(config, dtype=dtype, rngs=r))
    return fill(abstract, as_source(tensors), text_specs(config, prefix))


def load_siglip_from_tensors(config: SiglipConfig, tensors: Tensors, *,
                             dtype: jnp.dtype = jnp.float32,
                             resize_positions: bool = False) -> SiglipModel:
    """Build a two-tower :class:`SiglipModel` from HF ``SiglipModel`` tensors
    (``logit_scale`` and ``logit_bias`` stay float32)."""
    specs = [dataclasses.replace(s, path=("vision",) + s.path) for s in
             vision_specs(config.vision, "vision_model.", resize_positions=resize_positions)]
    specs += [dataclasses.replace(s, path=("text",) + s.path) for s in text_specs(config.text)]
    specs += [TensorSpec(("logit_scale",), "logit_scale", (1,)),
              TensorSpec(("logit_bias",), "logit_bias", (1,))]
    abstract = abstract_module(lambda r: SiglipModel(config, dtype=dtype, rngs=r))
    return fill(abstract, as_source(tensors), specs)
