"""GRPO learns what only the image tells (slow): the colour of a square, from reward alone.

The task is test_train_image.py's: 32 x 32 noise images with a 16 x 16 square of one of four
colours; the prompt is always "Colour?", so only the image tells the answer. The tiny random
image-text model first learns the answer format with ``sft`` on the same rows with the images
permuted across rows (so it names one of the four colours, at chance: the start of RL is
~1/K = 25%, measured below). Then ``rl`` (GRPO: G = 8 samples per prompt, 4 prompts per
step, the built-in ``exact`` reward against the colour name, full fine-tuning) trains on the
true images; the control trains the same way with the images permuted across rows.
Asserted: the mean reward over the last 5 steps is >= 0.8 with true images and stays at chance
(<= 0.45) with shuffled ones; with beta > 0 the logged KL to the reference stays under the
stated bound; the reference's parameters are bitwise those of the starting checkpoint.

Measured on the shared 2-core CPU (100 steps, lr 2e-3): beta 0.1: reward 0.23 -> 0.89, largest
per-step KL 0.46; shuffled images 0.24. beta 0: the KL's 10-step means rose to 0.44 (and the
reward only to ~0.5); beta 1: they stayed under 0.1 while the reward still rose (~0.5).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from test_train_image import COLOURS, NAMES, _row
from train_fixtures import tiny_mm_checkpoint

from medgemma_core.checkpoints.export import load_any
from medgemma_train.engine.config import load_config
from medgemma_train.engine.stages import get_stage
from medgemma_train.engine.trainer import train

pytestmark = pytest.mark.slow

RL_STEPS = 100
KL_BOUND = 0.6  # nats per completion token, with beta = 0.1


def _images(folder, n, seed):
    """Grey images with mild noise and a 16 x 16 square of one of the four colours (balanced)
    at a random place."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    out = []
    for i in range(n):
        img = np.clip(128 + rng.integers(-20, 21, (32, 32, 3)), 0, 255).astype(np.uint8)
        colour = NAMES[i % 4]
        y, x = rng.integers(0, 17, 2)
        img[y:y + 16, x:x + 16] = COLOURS[colour]
        Image.fromarray(img).save(folder / f"{i}.png")
        out.append((str(folder / f"{i}.png"), colour))
    return out


def _write(path, rows, shuffle=False, seed=5):
    images = [r[0] for r in rows]
    if shuffle:
        images = list(np.random.default_rng(seed).permutation(images))
    path.write_text("".join(json.dumps(_row(im, c)) + "\n" for im, (_, c) in zip(images, rows)))
    return path


@pytest.fixture(scope="module")
def warm(tmp_path_factory):
    """A model that answers with a colour name, at chance (sft on shuffled images)."""
    root = tmp_path_factory.mktemp("rlcolour")
    ck = tiny_mm_checkpoint(root / "ck", hidden_size=32, intermediate_size=64, head_dim=8,
                            query_pre_attn_scalar=8, num_layers=2)
    rows = _images(root / "train", 256, 0)
    data = _write(root / "shuffled.jsonl", rows, shuffle=True)
    cfg = load_config(base={
        "model": {"checkpoint": str(ck)},
        "data": {"train": [str(data)], "batch_size": 16, "seq_len": 32, "mask_prompt": True},
        "lora": {"rank": 0}, "optimizer": {"lr": 1e-2, "decay": "cosine"},
        "run": {"out": str(root / "warm"), "max_steps": 60, "save_every": 0, "keep_best": 0,
                "progress": False, "tensorboard": False, "export": ["hf"]}})
    train(cfg, get_stage("sft"))
    return root, root / "warm" / "export" / "hf", rows


def _rl(root, ck, data, out, beta=0.1):
    stage = get_stage("rl")
    cfg = load_config(base={
        "stage": "rl", "model": {"checkpoint": str(ck)},
        "data": {"train": [str(data)], "seq_len": 40},
        "lora": {"rank": 0},
        "optimizer": {"lr": 2e-3, "warmup_ratio": 0.0, "decay": "constant",
                      "max_grad_norm": 1.0},
        "run": {"out": str(root / out), "max_steps": RL_STEPS, "progress": False,
                "tensorboard": False},
        "rl": {"rewards": ["exact"], "group_size": 8, "prompts_per_step": 16,
               "max_new_tokens": 4, "beta": beta}}, settings=stage.settings)
    return train(cfg, stage)


def _mean(history, key, steps):
    return float(np.mean([h[key] for h in history[steps]]))


def test_grpo_learns_the_colour_from_reward(warm):
    root, ck, rows = warm
    real = _rl(root, ck, _write(root / "real.jsonl", rows), "real")
    h = real["history"]
    start, end = _mean(h, "reward", slice(0, 5)), _mean(h, "reward", slice(-5, None))
    kl = max(x["kl"] for x in h)
    print(f"true images: reward {start:.3f} (first 5 steps) -> {end:.3f} (last 5); max KL {kl:.4f}")
    assert 0.1 <= start <= 0.45, start  # chance is 0.25
    assert end >= 0.8, end
    assert kl <= KL_BOUND, kl

    # the reference is the starting checkpoint, bitwise
    from flax import nnx

    start_params = nnx.state(load_any(ck, "float32"), nnx.Param)
    ref = dict(nnx.to_flat_state(real["reference"]))
    for path, v in nnx.to_flat_state(start_params):
        assert np.array_equal(np.asarray(ref[path].get_value()), np.asarray(v.get_value())), path

    control = _rl(root, ck, _write(root / "control.jsonl", rows, shuffle=True, seed=11), "ctl")
    chance = _mean(control["history"], "reward", slice(-5, None))
    print(f"shuffled images: reward over the last 5 steps {chance:.3f}")
    assert chance <= 0.45, chance


def test_beta_bounds_the_kl(warm):
    """A strong KL penalty (beta = 1) keeps every step's KL to the reference under 0.25 nats per
    token (beta 0 passes 0.4 on this task), while the reward still rises."""
    root, ck, rows = warm
    h = _rl(root, ck, _write(root / "real1.jsonl", rows), "beta1", beta=1.0)["history"]
    kl = max(x["kl"] for x in h)
    first, last = _mean(h, "reward", slice(0, 10)), _mean(h, "reward", slice(-10, None))
    print(f"beta 1: max KL {kl:.4f}; reward {first:.3f} (first 10) -> {last:.3f} (last 10)")
    assert kl <= 0.25, kl
    assert last >= first + 0.1, (first, last)
