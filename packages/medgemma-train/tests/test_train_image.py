"""SFT learns what only the image tells, and falls to chance when the images are shuffled.

The task: 32 x 32 images of uniform noise with a 16 x 16 square of one of four colours at a
random place; the question is always "Colour?" and the answer the square's colour name, so
only the image can tell it (the four answers are balanced: 25% is chance). The tiny random
image-text model (SigLIP 2 layers, width 32 decoder of 2 layers, 4 soft tokens per image,
:func:`train_fixtures.small_tokenizer`) is fully fine-tuned (``lora.rank: 0``, vision and
projector included) for 150 steps of 16 rows (256 training rows, about 9 epochs) at lr 3e-3,
warmup 3% and linear decay, loss on the answer only. Measured here: held-out accuracy 100%
after 150 steps (39% after 100 at lr 3e-3). The control trains the same way on the same rows
with the images permuted across rows: its held-out accuracy was 25%.

Accuracy: for each of 64 held-out images, the answer whose tokens get the lowest summed
next-token loss (medgemma_core.training.next_token_loss, the model package's loss) among the
four colours.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image
from train_fixtures import tiny_mm_checkpoint

from medgemma_core import Processor
from medgemma_core.training import TrainBatch, next_token_loss
from medgemma_train.engine.config import load_config
from medgemma_train.engine.stages import get_stage
from medgemma_train.engine.trainer import train

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220),
           "yellow": (230, 220, 20)}
NAMES = list(COLOURS)


def _images(folder, n, seed):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    out = []
    for i in range(n):
        img = rng.integers(0, 256, (32, 32, 3)).astype(np.uint8)
        colour = NAMES[i % 4]
        y, x = rng.integers(0, 17, 2)
        img[y:y + 16, x:x + 16] = COLOURS[colour]
        Image.fromarray(img).save(folder / f"{i}.png")
        out.append((str(folder / f"{i}.png"), colour))
    return out


def _row(image, answer):
    return {"messages": [{"role": "user", "content": [{"type": "image", "image": image},
                                                      {"type": "text", "text": "Colour?"}]},
                         {"role": "assistant", "content": answer}]}


def _write(path, rows, shuffle=False):
    images = [r[0] for r in rows]
    if shuffle:
        images = list(np.random.default_rng(5).permutation(images))
    path.write_text("".join(json.dumps(_row(im, c)) + "\n" for im, (_, c) in zip(images, rows)))
    return path


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("colour")
    ck = tiny_mm_checkpoint(root / "ck", hidden_size=32, intermediate_size=64, head_dim=8,
                            query_pre_attn_scalar=8, num_layers=2)
    rows = _images(root / "train", 256, 0)
    held_out = _images(root / "test", 64, 1)
    return root, ck, rows, held_out


def _train(root, ck, data, out):
    cfg = load_config(base={
        "model": {"checkpoint": str(ck)},
        "data": {"train": [str(data)], "batch_size": 16, "seq_len": 32, "mask_prompt": True},
        "lora": {"rank": 0},
        "optimizer": {"lr": 3e-3},
        "run": {"out": str(root / out), "max_steps": 150, "save_every": 0, "keep_best": 0,
                "progress": False}})
    return train(cfg, get_stage("sft"))["model"]


def _accuracy(model, ck, held_out):
    proc = Processor.from_checkpoint(ck)
    graphdef, state = nnx.split(model)

    @jax.jit
    def losses(state, batch):
        m = nnx.merge(graphdef, state)
        return jax.vmap(lambda b: next_token_loss(m, jax.tree.map(lambda x: x[None], b))[0])(
            batch)

    correct = 0
    for image, truth in held_out:
        examples = [proc([{"role": "user", "content": [{"type": "image", "image": image},
                                                       {"type": "text", "text": "Colour?"}]},
                          {"role": "assistant", "content": c}], add_generation_prompt=False)
                    for c in NAMES]
        batch = TrainBatch.from_collated(proc.collate(examples, mask_prompt=True), slots=1)
        scores = np.asarray(losses(state, batch))
        correct += NAMES[int(np.argmin(scores))] == truth
    return correct / len(held_out)


def test_learns_what_only_the_image_tells(task):
    root, ck, rows, held_out = task
    model = _train(root, ck, _write(root / "train.jsonl", rows), "real")
    accuracy = _accuracy(model, ck, held_out)
    assert accuracy >= 0.95, accuracy

    control = _train(root, ck, _write(root / "shuffled.jsonl", rows, shuffle=True), "shuffled")
    chance = _accuracy(control, ck, held_out)
    assert chance <= 0.45, chance  # 0.25 expected; 64 rows leave some spread
