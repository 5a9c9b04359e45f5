"""The optimizer, the learning-rate schedule and the one jitted train step.

``train_step(state, rest, batch) -> (state, metrics)`` is a pure function: ``state`` holds
the trainable parameters, the optax state and the step (donated: updated in place);
``rest`` the frozen parameters and the LoRA dropout streams; ``batch`` ``A`` micro-batches
``[A, b, T]``. Gradients of the summed loss are accumulated over the micro-batches (a
``lax.scan``; with one micro-batch, no loop) and divided by the number of loss tokens of the
whole step, so every token weighs the same however the rows are split across micro-batches,
devices or processes.

Dropout is derived, not stored: the stream counters are set to ``step * A + a`` inside the
step, so a resumed run draws the same masks.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from .config import OptimizerConfig

__all__ = ["StepFns", "build_steps", "make_optimizer", "make_schedule", "warmup_steps"]


def warmup_steps(cfg: OptimizerConfig, total: int) -> int:
    return int(cfg.warmup_steps) if cfg.warmup_steps > 0 else int(math.ceil(
        cfg.warmup_ratio * total))


def make_schedule(cfg: OptimizerConfig, total: int) -> optax.Schedule:
    """Linear warmup from 0 over the warmup steps (transformers': the first update has lr 0
    when there is warmup), then linear or cosine decay to ``lr * min_lr_ratio`` at ``total``,
    or constant."""
    total = max(1, int(total))
    warm = min(warmup_steps(cfg, total), total)
    peak, end = float(cfg.lr), float(cfg.lr) * float(cfg.min_lr_ratio)
    rest = max(1, total - warm)
    if cfg.decay == "linear":
        after = optax.linear_schedule(peak, end, rest)
    elif cfg.decay == "cosine":
        after = optax.cosine_decay_schedule(peak, rest, alpha=cfg.min_lr_ratio)
    else:
        after = optax.constant_schedule(peak)
    if warm == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warm), after], [warm])


def _decay_mask(params: Any) -> Any:
    return jax.tree.map(lambda x: jnp.ndim(x) >= 2, params)


def make_optimizer(cfg: OptimizerConfig, total: int) -> tuple[optax.GradientTransformation,
                                                                optax.Schedule]:
    schedule = make_schedule(cfg, total)
    if cfg.name == "adamw":
        opt = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                          weight_decay=cfg.weight_decay, mask=_decay_mask)
    else:  # adafactor: factored second moments, for large models
        opt = optax.adafactor(schedule, weight_decay_rate=cfg.weight_decay or None)
    parts = [optax.clip_by_global_norm(cfg.max_grad_norm)] if cfg.max_grad_norm > 0 else []
    return optax.chain(*parts, opt), schedule


def _norm(tree: Any) -> jax.Array:
    tree_norm = getattr(getattr(optax, "tree", None), "norm", None)
    return tree_norm(tree) if tree_norm is not None else optax.global_norm(tree)


def _set_counts(rest: nnx.State, count: jax.Array) -> nnx.State:
    """``rest`` with every RNG stream counter (LoRA dropout) set to ``count``."""
    def one(v: Any) -> Any:
        if isinstance(v, nnx.RngCount):
            return v.replace(value=jnp.full_like(v.get_value(), count))
        return v

    return jax.tree.map(one, rest, is_leaf=lambda x: isinstance(x, nnx.Variable))


class StepFns:
    """The compiled train and eval steps of one model (see the module docstring)."""

    def __init__(self, train: Callable, evaluate: Callable, tx: optax.GradientTransformation,
                 schedule: optax.Schedule):
        self.train, self.evaluate, self.tx, self.schedule = train, evaluate, tx, schedule


def build_steps(train_def: Any, eval_def: Any, loss: Callable[[Any, Any], tuple[Any, Any]],
                tx: optax.GradientTransformation, schedule: optax.Schedule, *,
                accum: int, shardings: tuple[Any, Any, Any] | None = None,
                batch_shardings: Any = None, as_batch: Callable[[dict], Any] | None = None,
                tokens_key: str | None = "attention_mask",
                eval_extra: Callable[[Any, Any], dict] | None = None) -> StepFns:
    """Jitted steps. ``train_def``/``eval_def``: the model's graphdefs in train/eval mode (with
    the split ``(params, rest)``); ``loss(model, batch) -> (loss_sum, n)``, ``batch`` a
    ``TrainBatch`` of the micro-batch's arrays (``as_batch``: another wrapper of the dict;
    ``lambda mb: mb`` passes it as it is). ``tokens_key``: the array whose non-zero entries
    are the input tokens counted (None: the rows). ``shardings``: ``(state, rest, metrics)``
    shardings (None: let jit place). ``eval_extra(model, batch) -> {name: (numerator,
    denominator)}``: more sums of the eval step (a stage's ``eval_batch``), under ``"extra"``."""
    if as_batch is None:
        from medgemma_core.training import TrainBatch

        def as_batch(mb: dict) -> Any:
            return TrainBatch(**mb)

    def micro_loss(params, rest, mb):
        model = nnx.merge(train_def, params, rest, copy=True)
        loss_sum, n = loss(model, as_batch(mb))
        return loss_sum, n

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def train_step(state, rest, batch):
        params, opt_state, step = state["params"], state["opt"], state["step"]

        def body(carry, xs):
            a, mb = xs
            g_acc, l_acc, n_acc, i_acc = carry
            r = _set_counts(rest, step * accum + a)
            (loss_sum, n), g = grad_fn(params, r, mb)
            g_acc = jax.tree.map(lambda x, y: x + y.astype(x.dtype), g_acc, g)
            seen = (jnp.sum(mb[tokens_key] != 0).astype(jnp.int32) if tokens_key else
                    jnp.asarray(jax.tree.leaves(mb)[0].shape[0], jnp.int32))
            return (g_acc, l_acc + loss_sum, n_acc + n, i_acc + seen), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        i0 = jnp.zeros((), jnp.int32)
        init = (zeros, jnp.zeros((), jnp.float32), i0, i0)
        if accum == 1:  # the same sums without a loop and a zero-filled gradient buffer
            (g_sum, l_sum, n_sum, seen), _ = body(
                init, (jnp.zeros((), jnp.int32), jax.tree.map(lambda x: x[0], batch)))
        else:
            (g_sum, l_sum, n_sum, seen), _ = jax.lax.scan(body, init,
                                                          (jnp.arange(accum), batch))
        denom = jnp.maximum(n_sum, 1).astype(jnp.float32)
        grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), g_sum, params)
        grad_norm = _norm(grads)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = {"loss": l_sum / denom, "grad_norm": grad_norm, "lr": schedule(step),
                   "tokens": n_sum, "input_tokens": seen}
        return {"params": params, "opt": opt_state, "step": step + 1}, metrics

    def eval_step(params, rest, mb):
        model = nnx.merge(eval_def, params, rest, copy=True)
        loss_sum, n = loss(model, as_batch(mb))
        out = {"loss_sum": loss_sum, "tokens": n}
        if eval_extra is not None:
            out["extra"] = eval_extra(model, as_batch(mb))
        return out

    if shardings is None:
        train = jax.jit(train_step, donate_argnums=(0,))
        evaluate = jax.jit(eval_step)
    else:
        state_sh, rest_sh, _ = shardings
        train = jax.jit(train_step, in_shardings=(state_sh, rest_sh, batch_shardings),
                        out_shardings=(state_sh, None), donate_argnums=(0,))
        evaluate = jax.jit(eval_step)
    return StepFns(train, evaluate, tx, schedule)
