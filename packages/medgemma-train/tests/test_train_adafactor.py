"""Adafactor, the optimizer for large models: factored second moments (a [r, c] weight keeps
r + c statistics, not 2 x r x c as AdamW), and a run that trains with it end to end."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from train_fixtures import chat_rows, metrics, tiny_text_checkpoint, write_jsonl

from medgemma_train.engine.config import OptimizerConfig, load_config
from medgemma_train.engine.stages import get_stage
from medgemma_train.engine.step import make_optimizer
from medgemma_train.engine.trainer import train


def _state_floats(tx, params) -> int:
    state = jax.eval_shape(tx.init, params)
    return sum(math.prod(x.shape) for x in jax.tree.leaves(state)
               if jnp.issubdtype(x.dtype, jnp.floating))


def test_adafactor_keeps_factored_statistics():
    params = {"w": jnp.zeros((512, 256)), "b": jnp.zeros((256,))}
    adamw, _ = make_optimizer(OptimizerConfig(name="adamw"), 10)
    ada, _ = make_optimizer(OptimizerConfig(name="adafactor"), 10)
    # AdamW: first and second moments of every element
    assert _state_floats(adamw, params) == 2 * (512 * 256 + 256)
    # Adafactor (optax defaults: no momentum): row and column statistics of the matrix; the
    # vector (under 128 elements per side is not factored) keeps its full second moment.
    # The unused full-size slots of a factored leaf are placeholders of one element.
    got = _state_floats(ada, params)
    assert got < 512 + 256 + 256 + 16, got


def test_a_run_trains_with_adafactor(tmp_path):
    ck = tiny_text_checkpoint(tmp_path / "ck", layers=1)  # one layer: a shorter compile
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(16, seed=3))
    cfg = load_config(base={
        "model": {"checkpoint": str(ck)},
        "data": {"train": [str(data)], "batch_size": 8, "seq_len": 24},
        "lora": {"rank": 0}, "optimizer": {"name": "adafactor", "lr": 0.3, "warmup_ratio": 0},
        "run": {"out": str(tmp_path / "run"), "max_steps": 12, "save_every": 0,
                "keep_best": 0, "progress": False, "tensorboard": False}})
    train(cfg, get_stage("sft"))
    losses = [r["loss"] for r in metrics(tmp_path / "run")]
    assert len(losses) == 12 and all(np.isfinite(losses))
    # Adafactor scales its steps by each parameter's RMS (0.02 at init here), hence lr 0.3.
    # 16 rows, 2 batches: the mean loss of the last two steps is well below the first two
    assert np.mean(losses[-2:]) < 0.7 * np.mean(losses[:2]), losses
