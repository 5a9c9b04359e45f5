"""Loss and gradients of the tiny image-text model on 8 fake CPU devices, single-device vs a
``data=2,fsdp=2,tensor=2`` mesh, through ``medgemma_core.training.next_token_loss`` (rows with
0, 1, 2 and 1 images in 2 slots). Run as its own process by test_sharding.py (XLA's device
count is fixed when JAX starts); prints one JSON line.

A plain full-logits masked cross entropy written here (labels shifted by one, as transformers
does) cross-checks the single-device loss.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from medgemma_core import Gemma3Multimodal, MultimodalConfig  # noqa: E402
from medgemma_core.multimodal import image_blocks  # noqa: E402
from medgemma_core.sharding import make_mesh, shard_model, shardings  # noqa: E402
from medgemma_core.training import TrainBatch, next_token_loss  # noqa: E402

IGNORE = -100


COUNTS = (0, 1, 2, 1)  # images per row
SLOTS = 2


def batch(cfg: MultimodalConfig) -> TrainBatch:
    """4 rows of 24 tokens holding 0, 1, 2 and 1 images (4 soft tokens each) in 2 slots, left
    padding in row 3; labels masked on pad, image and <start_of_image> tokens."""
    rng = np.random.default_rng(0)
    m, img, size = cfg.mm_tokens_per_image, cfg.image_token_id, cfg.vision.image_size
    rows = []
    pixels = np.zeros((len(COUNTS), SLOTS, size, size, 3), np.float32)
    for r, count in enumerate(COUNTS):
        row = list(rng.integers(3, 500, size=24 - count * (m + 2)))
        for k in range(count):
            at = 3 + k * (m + 4)
            row[at:at] = [cfg.boi_token_id] + [img] * m + [cfg.eoi_token_id]
            pixels[r, k] = rng.uniform(-1, 1, size=(size, size, 3))
        rows.append(row[:24])
    tokens = np.array(rows, np.int32)
    tokens[3, :2] = 0  # left padding
    mask = np.ones_like(tokens)
    mask[3, :2] = 0
    labels = np.where((tokens == img) | (tokens == cfg.boi_token_id) | (mask == 0), IGNORE,
                      tokens).astype(np.int32)
    image_mask = np.arange(SLOTS)[None, :] < np.array(COUNTS)[:, None]
    return TrainBatch(tokens, labels, mask, pixels, image_mask)


def loss_fn(model: Gemma3Multimodal, b: TrainBatch) -> jax.Array:
    loss_sum, n = next_token_loss(model, b, chunk=16)
    return loss_sum / n


def plain_loss(model: Gemma3Multimodal, b: TrainBatch) -> float:
    """The same loss from the whole logits of the inference path, written out here (jitted:
    eager, every primitive would compile on its own)."""
    images = np.asarray(b.pixels)[np.asarray(b.image_mask)]  # reading order: rows, then slots
    graphdef, state = nnx.split(model)

    def loss(state, images):
        model = nnx.merge(graphdef, state)
        tokens = jnp.asarray(b.tokens)
        emb = model.embed(tokens, model.encode_images(images))
        start = jnp.argmax(jnp.asarray(b.attention_mask) != 0, axis=1).astype(jnp.int32)
        logits, _ = model.decoder(tokens, embeddings=emb, start=start,
                                  image_id=image_blocks(tokens, model.config.image_token_id))
        targets = jnp.asarray(b.labels)[:, 1:]
        logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
        valid = targets != IGNORE
        nll = -jnp.take_along_axis(logp, jnp.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
        return jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.sum(valid)

    return float(jax.jit(loss)(state, images))


def main() -> None:
    cfg = MultimodalConfig.tiny()
    data = batch(cfg)
    graphdef, params, rest = nnx.split(Gemma3Multimodal(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)

    def value_and_grad(p, r, b):
        return jax.value_and_grad(lambda p: loss_fn(nnx.merge(graphdef, p, r), b))(p)

    loss1, grads1 = jax.jit(value_and_grad)(params, rest, data)
    plain = plain_loss(nnx.merge(graphdef, params, rest), data)

    mesh = make_mesh("data=2,fsdp=2,tensor=2")
    model = shard_model(nnx.merge(graphdef, params, rest), mesh)
    _, sparams, srest = nnx.split(model, nnx.Param, ...)
    rows = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    sdata = jax.device_put(data, rows)  # every field [B, ...]: rows over data x fsdp
    step = jax.jit(value_and_grad, out_shardings=(None, shardings(sparams, mesh)))
    with jax.set_mesh(mesh):
        compiled = step.lower(sparams, srest, sdata).compile()  # compiled once: read and run
        hlo = compiled.as_text()
        loss8, grads8 = compiled(sparams, srest, sdata)

    # per tensor: max |diff| / max(max |grad|, 1): relative for the gradients that matter,
    # absolute for those that are ~0 in exact arithmetic (SigLIP's k biases: softmax ignores a
    # constant shift of the scores), whose float noise has no scale of its own
    flat1 = dict(nnx.to_flat_state(grads1))
    worst, worst_path, worst_rel = 0.0, "", 0.0
    for path, g8 in nnx.to_flat_state(grads8):
        a, b = np.asarray(flat1[path].get_value()), np.asarray(g8.get_value())
        diff, scale = float(np.max(np.abs(a - b))), float(np.max(np.abs(a)))
        err = diff / max(scale, 1.0)
        if err > worst:
            worst, worst_path = err, "/".join(map(str, path))
        if scale > 1e-3:
            worst_rel = max(worst_rel, diff / scale)
    emb = sparams["decoder"]["embedding"].get_value()
    q = sparams["decoder"]["layers"][0]["attn"]["q"].get_value()
    print(json.dumps({
        "devices": jax.device_count(),
        "loss_single": float(loss1), "loss_mesh": float(loss8), "loss_plain": plain,
        "grad_worst": worst, "grad_worst_path": worst_path, "grad_worst_rel": worst_rel,
        "n_grads": len(flat1),
        "embedding_spec": str(emb.sharding.spec), "q_spec": str(q.sharding.spec),
        "embedding_shard_shape": list(emb.addressable_shards[0].data.shape),
        "grad_embedding_spec": str(grads8["decoder"]["embedding"].get_value().sharding.spec),
        "collectives": sum(hlo.count(op) for op in ("all-reduce", "all-gather",
                                                    "reduce-scatter", "all-to-all")),
    }))


if __name__ == "__main__":
    sys.exit(main())
