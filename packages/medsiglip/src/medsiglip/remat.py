"""Rematerialization (activation checkpointing) policies for one transformer block.

``remat`` names what the backward pass keeps of a block's forward:

* ``"none"``: everything (no recomputation; the default, and what inference uses);
* ``"full"``: only the block's input; the whole block is recomputed in the backward pass;
* ``"dots"``: the results of matrix products without batch dimensions (the projections and
  the MLP, ``jax.checkpoint_policies.dots_with_no_batch_dims_saveable``); attention scores,
  norms and activations are recomputed.

The decoder (``medgemma_core.Gemma3``) and the SigLIP encoder apply one policy to every block.

:func:`run_blocks` runs a stack of blocks, optionally as a ``lax.scan`` over groups of
``period`` consecutive blocks (Gemma 3: 5 local + 1 global), which traces and compiles one
group instead of every layer. The parameters keep their per-layer paths: the scan stacks them
inside the traced function (a copy of the scanned blocks' weights, in the compute dtype).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

REMAT_POLICIES = ("none", "full", "dots")

__all__ = ["REMAT_POLICIES", "check_remat", "remat_block", "run_blocks"]


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


def run_blocks(blocks: Sequence[nnx.Module], x: Any, fn: Callable[..., Any], *,
               remat: str = "none", scan: bool = False, period: int = 1,
               extra: Callable[[int], tuple] = lambda i: ()) -> Any:
    """``x = fn(blocks[i], x, *extra(i))`` for every block in order, under the ``remat`` policy.

    With ``scan`` (and at least two whole groups), the first ``period * (len // period)`` blocks
    run as one ``lax.scan`` over groups of ``period`` blocks and the rest unrolled. Blocks ``i``
    and ``i + period`` must be alike (the same structure and static attributes) and
    ``extra(i)`` must equal ``extra(i % period)``. Blocks must not update their own state
    (e.g. dropout RNG counters) inside the scan."""
    run = remat_block(fn, remat)
    groups = len(blocks) // period if scan else 0
    done = 0
    if groups >= 2:
        graphdefs = [nnx.graphdef(blocks[j]) for j in range(period)]
        stacked = tuple(
            jax.tree.map(lambda *xs: jnp.stack(xs),
                         *[nnx.state(blocks[j + period * g]) for g in range(groups)])
            for j in range(period))

        def body(x, states):
            for j in range(period):
                x = run(nnx.merge(graphdefs[j], states[j]), x, *extra(j))
            return x, None

        x, _ = jax.lax.scan(body, x, stacked)
        done = groups * period
    for i in range(done, len(blocks)):
        x = run(blocks[i], x, *extra(i))
    return x
