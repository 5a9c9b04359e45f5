"""Rematerialization (activation checkpointing) policies for one transformer block.

``remat`` names what the backward pass keeps of a block's forward:

* ``"none"``: everything (no recomputation; the default, and what inference uses);
* ``"full"``: only the block's input; the whole block is recomputed in the backward pass;
* ``"dots"``: the results of matrix products without batch dimensions (the projections and
  the MLP, ``jax.checkpoint_policies.dots_with_no_batch_dims_saveable``); attention scores,
  norms and activations are recomputed.

The decoder (``medgemma_core.Gemma3``) and the SigLIP encoder apply one policy to every block.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

REMAT_POLICIES = ("none", "full", "dots")

__all__ = ["REMAT_POLICIES", "check_remat", "remat_block"]


def check_remat(remat: str) -> str:
    """``remat`` unchanged, or a ValueError naming the choices."""
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat={remat!r} is not a policy; choose one of "
                         f"{', '.join(map(repr, REMAT_POLICIES))}")
    return remat


def remat_block(fn: Callable[..., Any], remat: str) -> Callable[..., Any]:
    """``fn(module, *arrays)`` wrapped in ``nnx.remat`` with the policy ``remat`` names
    (``fn`` itself for ``"none"``)."""
    if check_remat(remat) == "none":
        return fn
    policy = None if remat == "full" else jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    return nnx.remat(fn, policy=policy)
