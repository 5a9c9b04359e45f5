"""Gradients flow through both towers: a tiny model learns synthetic image-text pairs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from medsiglip import (
    SiglipConfig,
    SiglipModel,
    SiglipTextConfig,
    SiglipVisionConfig,
    chunked_sigmoid_loss,
)

K = 16  # classes, one caption each


def test_tiny_model_learns_retrieval():
    cfg = SiglipConfig(
        SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
                           patch_size=8, image_size=16),
        SiglipTextConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_layers=1,
                         num_heads=4, max_positions=8, projection_size=32),
    )
    rng = np.random.default_rng(0)
    protos = rng.uniform(-1, 1, (K, 16, 16, 3)).astype(np.float32)
    captions = rng.integers(2, 32, (K, 8)).astype(np.int32)

    def images(classes: np.ndarray, noise: np.random.Generator) -> np.ndarray:
        return protos[classes] + 0.3 * noise.normal(size=(len(classes), 16, 16, 3))

    model = SiglipModel(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    tx = optax.adam(5e-3)
    opt_state = tx.init(params)

    def loss_fn(p, x, ids):
        m = nnx.merge(graphdef, p)
        out = m(x, ids)
        return chunked_sigmoid_loss(out.image_embeds, out.text_embeds, m.logit_scale[...][0],
                                    m.logit_bias[...][0], chunk_size=4)

    @jax.jit
    def step(p, s, x, ids):
        loss, grads = jax.value_and_grad(loss_fn)(p, x, ids)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    noise = np.random.default_rng(1)
    losses = []
    for _ in range(150):
        classes = noise.permutation(K)
        params, opt_state, loss = step(params, opt_state, jnp.asarray(images(classes, noise)),
                                       jnp.asarray(captions[classes]))
        losses.append(float(loss))
    assert np.mean(losses[-20:]) < 0.5 * np.mean(losses[:20])

    trained = nnx.merge(graphdef, params)
    test_classes = np.repeat(np.arange(K), 4)
    out = trained(jnp.asarray(images(test_classes, np.random.default_rng(2))),
                  jnp.asarray(captions))
    predicted = np.asarray(out.logits_per_image).argmax(axis=1)
    accuracy = float(np.mean(predicted == test_classes))
    print("accuracy", accuracy)
    assert accuracy > 0.8, accuracy  # chance is 1/16
