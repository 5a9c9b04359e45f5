"""Hugging Face tensor names -> NNX parameters, one tensor at a time.

A *tensor source* is either a mapping ``name -> array`` or a callable ``name -> array``
together with the iterable of available names (so safetensors files, GGUF readers or a
caller's own lazy store work alike). Each tensor is read, converted (transposed from torch's
``[out, in]`` to ``[in, out]``, cast to ``dtype``) and placed before the next one is read, so
the model is never held twice in memory. Errors name the offending tensor.

Accepted vision prefixes (first match wins): ``vision_tower.vision_model.``,
``model.vision_tower.vision_model.``, ``vision_tower.``, ``model.vision_tower.``,
``vision_model.`` and no prefix at all.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from medsiglip.config import SiglipConfig, SiglipTextConfig, SiglipVisionConfig
from medsiglip.model import SiglipModel
from medsiglip.posemb import grid_side, resize_position_embedding
from medsiglip.text import TextTower
from medsiglip.vision import VisionTower

TensorSource = Mapping[str, Any] | Callable[[str], Any]
Path = tuple[str | int, ...]
# (parameter path, tensor name, conversion) entries.
Plan = list[tuple[Path, str, Callable[[np.ndarray], np.ndarray]]]
M = TypeVar("M", bound=nnx.Module)

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


class _ConstantRngs:
    """Stands in for ``nnx.Rngs`` when only shapes are wanted: hands out one fixed key.

    Under ``nnx.eval_shape`` every ``nnx.Rngs`` draw updates a counter variable with a tracer,
    which costs ~20 ms per draw in flax 0.12 (about a minute for the two so400m towers);
    initial values are thrown away here, so a constant key is enough.
    """

    def params(self) -> jax.Array:
        return jax.random.key(0)

    __call__ = params


def abstract_module(build: Callable[[Any], M]) -> M:
    """``build(rngs)``'s module with ``jax.ShapeDtypeStruct`` leaves, no memory, no init."""
    return nnx.eval_shape(lambda: build(_ConstantRngs()))


def _same(x: np.ndarray) -> np.ndarray:
    return x


def _t(x: np.ndarray) -> np.ndarray:
    """torch Linear ``[out, in]`` -> ``[in, out]``."""
    return x.T


def _oihw_to_hwio(x: np.ndarray) -> np.ndarray:
    return x.transpose(2, 3, 1, 0)


def _rows(i: int) -> Callable[[np.ndarray], np.ndarray]:
    """Part ``i`` of a packed q,k,v ``in_proj`` (weight ``[3D, D]`` or bias ``[3D]``)."""

    def take(x: np.ndarray) -> np.ndarray:
        d = x.shape[0] // 3
        part = x[i * d:(i + 1) * d]
        return part.T if part.ndim == 2 else part

    return take


def _linear(path: Path, name: str) -> Plan:
    return [(path + ("kernel",), f"{name}.weight", _t), (path + ("bias",), f"{name}.bias", _same)]


def _norm(path: Path, name: str) -> Plan:
    return [(path + ("scale",), f"{name}.weight", _same),
            (path + ("bias",), f"{name}.bias", _same)]


def _encoder(num_layers: int, prefix: str) -> Plan:
    plan: Plan = []
    for j in range(num_layers):
        src, dst = f"{prefix}encoder.layers.{j}.", ("encoder", "layers", j)
        plan += _norm(dst + ("layer_norm1",), src + "layer_norm1")
        plan += _norm(dst + ("layer_norm2",), src + "layer_norm2")
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            plan += _linear(dst + ("self_attn", proj), f"{src}self_attn.{proj}")
        plan += _linear(dst + ("mlp", "fc1"), src + "mlp.fc1")
        plan += _linear(dst + ("mlp", "fc2"), src + "mlp.fc2")
    return plan


def vision_plan(config: SiglipVisionConfig, prefix: str) -> Plan:
    """Every vision-tower parameter and the HF tensor it comes from."""
    p = prefix
    plan: Plan = [
        (("embeddings", "kernel"), p + _PROBE, _oihw_to_hwio),
        (("embeddings", "bias"), p + "embeddings.patch_embedding.bias", _same),
        (("embeddings", "position_embedding"), p + POSITION_NAME, _same),
    ]
    plan += _encoder(config.num_layers, p)
    plan += _norm(("post_layernorm",), p + "post_layernorm")
    if config.use_head:
        h = p + "head."
        plan.append((("head", "probe"), h + "probe", _same))
        for i, proj in enumerate(("q_proj", "k_proj", "v_proj")):
            plan.append((("head", "attention", proj, "kernel"),
                         h + "attention.in_proj_weight", _rows(i)))
            plan.append((("head", "attention", proj, "bias"),
                         h + "attention.in_proj_bias", _rows(i)))
        plan += _linear(("head", "attention", "out_proj"), h + "attention.out_proj")
        plan += _norm(("head", "layernorm"), h + "layernorm")
        plan += _linear(("head", "mlp", "fc1"), h + "mlp.fc1")
        plan += _linear(("head", "mlp", "fc2"), h + "mlp.fc2")
    return plan


def text_plan(config: SiglipTextConfig, prefix: str = "text_model.") -> Plan:
    """Every text-tower parameter and the HF tensor it comes from."""
    p = prefix
    plan: Plan = [
        (("token_embedding", "embedding"), p + "embeddings.token_embedding.weight", _same),
        (("position_embedding",), p + "embeddings.position_embedding.weight", _same),
    ]
    plan += _encoder(config.num_layers, p)
    plan += _norm(("final_layer_norm",), p + "final_layer_norm")
    plan += _linear(("head",), p + "head")
    return plan


def find_vision_prefix(names: Iterable[str]) -> str:
    """The first of :data:`VISION_PREFIXES` under which a vision tower's tensors exist."""
    names = set(names)
    for prefix in VISION_PREFIXES:
        if prefix + _PROBE in names:
            return prefix
    raise KeyError(
        "no vision tower found: none of "
        + ", ".join(repr(p + _PROBE) for p in VISION_PREFIXES)
        + " is among the checkpoint's tensors; is this a SigLIP or Gemma 3 multimodal checkpoint?"
    )


def _reader(tensors: TensorSource) -> Callable[[str], Any]:
    if isinstance(tensors, Mapping):
        return tensors.__getitem__
    if callable(tensors):
        return tensors
    raise TypeError("tensors must be a mapping name -> array or a callable name -> array")


def _position_fix(config: SiglipVisionConfig, name: str, resize_positions: bool
                  ) -> Callable[[np.ndarray], np.ndarray]:
    """Checks (and if asked, resamples) the position table against ``config``'s grid."""

    def fix(x: np.ndarray) -> np.ndarray:
        want = config.num_patches
        if x.ndim != 2 or x.shape[1] != config.hidden_size:
            raise ValueError(
                f"tensor {name!r} has shape {list(x.shape)}, expected "
                f"[{want}, {config.hidden_size}]: the checkpoint does not match the config"
            )
        if x.shape[0] == want:
            return x
        side = grid_side(x.shape[0], name=name)
        if not resize_positions:
            raise ValueError(
                f"tensor {name!r} holds a {side}x{side} position grid ({side * config.patch_size}"
                f" px) but image_size {config.image_size} / patch {config.patch_size} needs "
                f"{config.grid_size}x{config.grid_size}: pass resize_positions=True to resample "
                f"it, or set image_size={side * config.patch_size}"
            )
        return np.asarray(resize_position_embedding(x, config.grid_size, name=name))

    return fix


def fill(abstract: M, plan: Plan, tensors: TensorSource, names: Iterable[str], *,
         dtype: jnp.dtype) -> M:
    """Materialize ``abstract`` (from ``nnx.eval_shape``) from ``tensors`` following ``plan``.

    Reads each tensor once (a packed ``in_proj`` feeds three parameters), converts it and
    casts it to ``dtype`` (``logit_scale``/``logit_bias`` stay float32) before reading the next.
    """
    available = set(names)
    read = _reader(tensors)
    graphdef, state = nnx.split(abstract)
    flat = dict(nnx.to_flat_state(state))
    by_name: dict[str, list[tuple[Path, Callable[[np.ndarray], np.ndarray]]]] = defaultdict(list)
    for path, name, fn in plan:
        if path not in flat:
            raise AssertionError(f"internal: no parameter {path} for tensor {name!r}")
        by_name[name].append((path, fn))
    missing = [name for name in by_name if name not in available]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise KeyError(
            f"checkpoint lacks tensor {missing[0]!r}{more}: the checkpoint does not match the "
            "config (wrong num_layers / use_head?) or was saved under another prefix"
        )
    unplanned = set(flat) - {path for path, _, _ in plan}
    if unplanned:
        raise AssertionError(f"internal: parameters without a source: {sorted(unplanned)[:3]}")
    for name, targets in by_name.items():
        raw = np.asarray(read(name))
        for path, fn in targets:
            var = flat[path]
            value = fn(raw)
            want = tuple(var.shape)
            if tuple(value.shape) != want:
                raise ValueError(
                    f"tensor {name!r} has shape {list(raw.shape)}, which gives "
                    f"{list(value.shape)} where {list(want)} is expected: the checkpoint does "
                    "not match the config"
                )
            target_dtype = var.dtype if path[-1] in ("logit_scale", "logit_bias") else dtype
            flat[path] = var.replace(value=jnp.asarray(value, dtype=target_dtype))
        del raw
    return nnx.merge(graphdef, nnx.from_flat_state(list(flat.items())))


def load_vision_tower_from_tensors(
    config: SiglipVisionConfig,
    tensors: TensorSource,
    names: Iterable[str] | None = None,
    *,
    dtype: jnp.dtype = jnp.float32,
    prefix: str | None = None,
    resize_positions: bool = False,
) -> VisionTower:
    """Build a :class:`VisionTower` from HF-named tensors (SiglipModel, SiglipVisionModel or a
    Gemma 3 multimodal checkpoint; see :data:`VISION_PREFIXES`).

    ``tensors``: mapping or callable ``name -> array`` (numpy, ml_dtypes bfloat16, jax or torch
    CPU arrays via ``np.asarray``). ``names``: the names available (defaults to the mapping's
    keys). ``prefix``: force a prefix instead of detecting it. ``resize_positions``: resample
    a checkpoint's position grid of another size to ``config.image_size`` (bilinear).
    """
    if names is None:
        if not isinstance(tensors, Mapping):
            raise TypeError("pass names= when tensors is a callable")
        names = tensors.keys()
    names = list(names)
    prefix = find_vision_prefix(names) if prefix is None else prefix
    plan = vision_plan(config, prefix)
    plan = [(path, name, _position_fix(config, name, resize_positions) if
             path == ("embeddings", "position_embedding") else fn) for path, name, fn in plan]
    abstract = abstract_module(lambda r: VisionTower(config, dtype=dtype, rngs=r))
    return fill(abstract, plan, tensors, names, dtype=dtype)


def load_text_tower_from_tensors(config: SiglipTextConfig, tensors: TensorSource,
                                 names: Iterable[str] | None = None, *,
                                 dtype: jnp.dtype = jnp.float32,
                                 prefix: str = "text_model.") -> TextTower:
    """Build a :class:`TextTower` from HF ``SiglipModel`` tensors (``text_model.*``)."""
    if names is None:
        if not isinstance(tensors, Mapping):
            raise TypeError("pass names= when tensors is a callable")
        names = tensors.keys()
    names = list(names)
    abstract = abstract_module(lambda r: TextTower(config, dtype=dtype, rngs=r))
    return fill(abstract, text_plan(config, prefix), tensors, names, dtype=dtype)


def load_siglip_from_tensors(config: SiglipConfig, tensors: TensorSource,
                             names: Iterable[str] | None = None, *,
                             dtype: jnp.dtype = jnp.float32,
                             resize_positions: bool = False) -> SiglipModel:
    """Build a two-tower :class:`SiglipModel` from HF ``SiglipModel`` tensors."""
    if names is None:
        if not isinstance(tensors, Mapping):
            raise TypeError("pass names= when tensors is a callable")
        names = tensors.keys()
    names = list(names)
    plan: Plan = []
    for path, name, fn in vision_plan(config.vision, "vision_model."):
        if path == ("embeddings", "position_embedding"):
            fn = _position_fix(config.vision, name, resize_positions)
        plan.append((("vision",) + path, name, fn))
    plan += [(("text",) + path, name, fn) for path, name, fn in text_plan(config.text)]
    plan += [(("logit_scale",), "logit_scale", _same), (("logit_bias",), "logit_bias", _same)]
    abstract = abstract_module(lambda r: SiglipModel(config, dtype=dtype, rngs=r))
    return fill(abstract, plan, tensors, names, dtype=dtype)


def param_count(build: Callable[[Any], nnx.Module]) -> int:
    """Parameters of the module ``build(rngs)`` makes, counted with no memory (eval_shape)."""
    abstract = abstract_module(build)
    state = nnx.state(abstract, nnx.Param)
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(state)))
