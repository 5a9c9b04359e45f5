"""Fill an abstract model from a checkpoint one tensor at a time (never two full copies)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

import jax.numpy as jnp
import numpy as np
from flax import nnx

from .names import TensorSpec


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: the message names the file, the tensor and the fix."""


class TensorSource(Protocol):
    """Read-only access to the tensors of a checkpoint by (Hugging Face) name."""

    def names(self) -> list[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def get(self, name: str) -> Any: ...

    def where(self, name: str) -> str:
        """The file holding ``name`` (for error messages)."""
        ...


def fill(abstract: nnx.Module, source: TensorSource, specs: Iterable[TensorSpec], prefix: str,
         dtype, describe: str) -> nnx.Module:
    """Read each spec's tensor, check its shape, convert it and put it into the model state."""
    graphdef, state = nnx.split(abstract)
    flat = dict(nnx.to_flat_state(state))
    available = set(source.names())
    done = set()
    for spec in specs:
        name = prefix + spec.name
        if name not in available:
            raise CheckpointError(
                f"{describe}: tensor {name!r} is missing; the checkpoint is incomplete or is not "
                f"a Gemma 3 model of this config (check config.json and re-download)")
        shape = tuple(source.shape(name))
        if shape != tuple(spec.shape):
            raise CheckpointError(
                f"{source.where(name)}: tensor {name!r} has shape {list(shape)} but the config "
                f"expects {list(spec.shape)}; config.json and the weights do not match")
        try:
            raw = source.get(name)
        except Exception as exc:  # truncated file, bad data offsets, ...
            raise CheckpointError(
                f"{source.where(name)}: cannot read tensor {name!r} ({exc}); the file is "
                f"truncated or corrupt, re-download it") from None
        value = jnp.asarray(spec.convert(raw), dtype=dtype)
        del raw
        if not np.isfinite(np.asarray(jnp.sum(value, dtype=jnp.float32))):
            raise CheckpointError(f"{source.where(name)}: tensor {name!r} holds NaN or inf values")
        var = flat[spec.path]
        if tuple(var.shape) != value.shape:  # our own layout disagrees with the spec: a bug
            raise AssertionError(f"{spec.path}: {var.shape} vs {value.shape}")
        var.set_value(value)
        done.add(spec.path)
    missing = [p for p in flat if p not in done]
    if missing:
        raise AssertionError(f"parameters never filled: {missing[:5]}")
    return nnx.merge(graphdef, nnx.from_flat_state(flat))
