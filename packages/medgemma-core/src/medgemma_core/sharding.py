"""Sharding MedGemma's models over a device mesh: :mod:`medsiglip.sharding`'s one rules table,
mesh and placement helpers, plus :func:`memory_report` for the decoder and image-text configs.

The decoder's logical axes: ``vocab``, ``embed`` (D), ``q_heads``, ``kv_heads``, ``head_dim``,
``mlp`` (F); norm scales are ``embed`` (or ``head_dim`` for q/k norms); the projector's weight
is ``(vision_embed, embed)``. The vision tower's: ``vision_embed``, ``vision_heads``,
``vision_mlp``, ``vision_patch``, ``vision_pos``. All map onto ``data``, ``fsdp``, ``tensor``
through :data:`LOGICAL_RULES`::

    from medgemma_core import MultimodalConfig
    from medgemma_core.sharding import make_mesh, memory_report, shard_model

    print(memory_report(MultimodalConfig.medgemma_27b(), "fsdp=8"))   # shapes only
    mesh = make_mesh("data=2,fsdp=-1")
    model = shard_model(model, mesh)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from flax import nnx
from jax.sharding import Mesh

from medsiglip.sharding import (
    LOGICAL_RULES,
    MESH_AXES,
    MemoryReport,
    constrain,
    logical_to_mesh,
    make_mesh,
    param_names,
    parse_mesh_shape,
    shard_model,
    shardings,
    tree_shardings,
)
from medsiglip.sharding import memory_report as _memory_report

from .config import Gemma3Config
from .multimodal import Gemma3Multimodal, MultimodalConfig
from .transformer import Gemma3

__all__ = ["LOGICAL_RULES", "MESH_AXES", "MemoryReport", "builder", "constrain",
           "logical_to_mesh", "make_mesh", "memory_report", "param_names", "parse_mesh_shape",
           "shard_model", "shardings", "tree_shardings"]


def builder(config: Gemma3Config | MultimodalConfig, *, dtype: Any = "float32"
            ) -> Callable[[Any], nnx.Module]:
    """``build(rngs)`` of the text (``Gemma3Config``) or image-text (``MultimodalConfig``)
    model in ``dtype`` (the parameter dtype)."""
    from .checkpoints import resolve_dtype

    dt = resolve_dtype(dtype)
    if isinstance(config, MultimodalConfig):
        return lambda rngs: Gemma3Multimodal(config, dtype=dt, rngs=rngs)
    if isinstance(config, Gemma3Config):
        return lambda rngs: Gemma3(config, dtype=dt, rngs=rngs)
    raise TypeError(f"expected a Gemma3Config or MultimodalConfig, not {type(config).__name__}")


def memory_report(model: Gemma3Config | MultimodalConfig | nnx.Module | Callable[[Any], Any],
                  mesh_shape: str | Mapping[str, int] | Mesh, *, optimizer: Any = "adamw",
                  dtype: Any = "float32", trainable: Any = nnx.Param,
                  devices: int | None = None) -> MemoryReport:
    """Per-device parameter, gradient and optimizer bytes on a mesh from shapes alone
    (``jax.eval_shape``): ``model`` is a config (built in ``dtype``), a module or a
    ``build(rngs)``; see :func:`medsiglip.sharding.memory_report`. ``print()`` it."""
    if isinstance(model, Gemma3Config | MultimodalConfig):
        model = builder(model, dtype=dtype)
    return _memory_report(model, mesh_shape, optimizer=optimizer, trainable=trainable,
                          devices=devices)
