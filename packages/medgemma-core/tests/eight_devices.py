"""Loss and gradients of the tiny image-text model on 8 fake CPU devices, single-device vs a
``data=2,fsdp=2,tensor=2`` mesh. Run as its own process by test_sharding.py (XLA's device
count is fixed when JAX starts); prints one JSON line.

The loss is a plain full-logits masked next-token cross entropy written here (labels shifted
by one, as transformers does), so the check does not rest on the code under test's loss.
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

IGNORE = -100


def batch(cfg: MultimodalConfig) -> dict[str, np.ndarray]:
    """4 rows of 24 tokens holding 0, 1, 2 and 1 images (4 soft tokens each), left padding in
    row 3; labels masked on pad and image tokens."""
    rng = np.random.default_rng(0)
    m, img = cfg.mm_tokens_per_image, cfg.image_token_id
    rows, images = [], 0
    for count in (0, 1, 2, 1):
        row = list(rng.integers(3, 500, size=24 - count * (m + 2)))
        for k in range(count):
            at = 2 + k * (m + 4)
            row[at:at] = [cfg.boi_token_id] + [img] * m + [cfg.eoi_token_id]
        rows.append(row[:24])
        images += count
    tokens = np.array(rows, np.int32)
    tokens[3, :3] = 0  # left padding
    labels = np.where((tokens == img) | (tokens == 0), IGNORE, tokens).astype(np.int32)
    pixels = rng.uniform(-1, 1, size=(images, cfg.vision.image_size, cfg.vision.image_size, 3))
    start = np.array([0, 0, 0, 3], np.int32)
    return {"tokens": tokens, "labels": labels, "pixels": pixels.astype(np.float32),
            "start": start}


def loss_fn(model: Gemma3Multimodal, b: dict[str, jax.Array]) -> jax.Array:
    soft = model.encode_images(b["pixels"])
    emb = model.embed(b["tokens"], soft)
    logits, _ = model.decoder(b["tokens"], embeddings=emb, start=b["start"],
                              image_id=image_blocks(b["tokens"], model.config.image_token_id))
    targets = b["labels"][:, 1:]
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    valid = targets != IGNORE
    nll = -jnp.take_along_axis(logp, jnp.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.sum(valid)


def main() -> None:
    cfg = MultimodalConfig.tiny()
    data = batch(cfg)
    graphdef, params, rest = nnx.split(Gemma3Multimodal(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)

    def value_and_grad(p, r, b):
        return jax.value_and_grad(lambda p: loss_fn(nnx.merge(graphdef, p, r), b))(p)

    loss1, grads1 = jax.jit(value_and_grad)(params, rest, data)

    mesh = make_mesh("data=2,fsdp=2,tensor=2")
    model = shard_model(nnx.merge(graphdef, params, rest), mesh)
    _, sparams, srest = nnx.split(model, nnx.Param, ...)
    rows = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    sdata = {k: jax.device_put(v, rows if k != "pixels" else NamedSharding(mesh, PartitionSpec()))
             for k, v in data.items()}
    step = jax.jit(value_and_grad, out_shardings=(None, shardings(sparams, mesh)))
    with jax.set_mesh(mesh):
        hlo = step.lower(sparams, srest, sdata).compile().as_text()
        loss8, grads8 = step(sparams, srest, sdata)

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
        "loss_single": float(loss1), "loss_mesh": float(loss8),
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
