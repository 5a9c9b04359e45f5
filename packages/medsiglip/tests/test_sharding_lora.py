"""medsiglip's logical axis names and LoRA adapters on both SigLIP towers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from medsiglip import SiglipConfig, SiglipModel, SiglipVisionConfig, VisionTower
from medsiglip.lora import (
    LoRAConfig,
    adapters,
    apply_lora,
    merge_lora,
    trainable_filter,
    unmerge_lora,
)
from medsiglip.sharding import LOGICAL_RULES, logical_to_mesh, param_names, shardings
from medsiglip.weights import abstract_module


def _names(model: nnx.Module) -> dict[str, tuple]:
    return {"/".join(map(str, p)): param_names(v)
            for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_every_siglip_parameter_is_named():
    named = _names(abstract_module(lambda rngs: SiglipModel(SiglipConfig.so400m_patch14_448(),
                                                            rngs=rngs)))
    rules = dict(LOGICAL_RULES)
    for path, names in named.items():
        assert names is not None and all(n is None or n in rules for n in names), path
    assert named["vision/encoder/layers/0/mlp/fc1/kernel"] == ("vision_embed", "vision_mlp")
    assert named["vision/encoder/layers/0/mlp/fc1/bias"] == ("vision_mlp",)
    assert named["vision/encoder/layers/0/self_attn/k_proj/bias"] == ("vision_heads",)
    assert named["vision/embeddings/kernel"] == ("vision_patch",) * 3 + ("vision_embed",)
    assert named["vision/embeddings/position_embedding"] == ("vision_pos", "vision_embed")
    assert named["vision/encoder/layers/0/layer_norm1/scale"] == ("vision_embed",)
    assert named["text/token_embedding/embedding"] == ("vocab", "vision_embed")


def test_so400m_shardings_by_hand():
    """So400m: D 1152, MLP 4304, 16 heads; on fsdp=2, tensor=4: 4304 = 4 x 1076."""
    tower = abstract_module(lambda rngs: VisionTower(SiglipVisionConfig.so400m_patch14_448(),
                                                     rngs=rngs))
    mesh = {"data": 1, "fsdp": 2, "tensor": 4}
    flat = {"/".join(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(tower))}
    fc1 = flat["encoder/layers/0/mlp/fc1/kernel"]
    assert logical_to_mesh(param_names(fc1), mesh, fc1.shape) == jax.P("fsdp", "tensor")
    patch = flat["embeddings/kernel"]
    assert logical_to_mesh(param_names(patch), mesh, patch.shape) == jax.P(None, None, None,
                                                                          "fsdp")
    # an MLP width the tensor axis does not divide falls back to replication
    assert logical_to_mesh(param_names(fc1), {"tensor": 3}, fc1.shape) == jax.P()


def test_shardings_on_a_one_device_mesh():
    tower = VisionTower(SiglipVisionConfig.tiny(), rngs=nnx.Rngs(0))
    mesh = jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
    tree = shardings(tower, mesh)
    leaves = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding))
    assert leaves and all(isinstance(s, jax.sharding.NamedSharding) for s in leaves)


def test_lora_on_both_towers_merges_exactly():
    model = SiglipModel(SiglipConfig.tiny(), rngs=nnx.Rngs(0))
    pixels = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 128, (3, 16)))
    base = np.asarray(model(pixels, ids).logits_per_image)
    done = apply_lora(model, LoRAConfig(rank=2, alpha=4), rngs=nnx.Rngs(1))
    cfg = model.config
    assert len(done) == 6 * (cfg.vision.num_layers + cfg.text.num_layers)  # not the MAP head
    assert not any(p.startswith("vision/head/") for p in done)
    key = jax.random.key(0)
    for _, _, _, adapter in adapters(model):
        key, k = jax.random.split(key)
        adapter.b.set_value(jax.random.normal(k, adapter.b.shape) * 0.2)
    unmerged = np.asarray(model(pixels, ids).logits_per_image)
    assert np.max(np.abs(unmerged - base)) > 1e-3
    merge_lora(model)
    np.testing.assert_allclose(np.asarray(model(pixels, ids).logits_per_image), unmerged,
                               atol=1e-5)
    unmerge_lora(model)
    np.testing.assert_allclose(np.asarray(model(pixels, ids).logits_per_image), unmerged,
                               atol=1e-5)

    vision_only = trainable_filter(model, decoder="frozen", vision="lora")
    paths = ["/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, vision_only))]
    assert paths and all(p.startswith("vision/") and "/lora/" in p for p in paths)
    text_full = trainable_filter(model, decoder="frozen", text="full")
    assert any("text/token_embedding" in "/".join(map(str, p))
               for p, _ in nnx.to_flat_state(nnx.state(model, text_full)))


def test_a_vision_tower_alone_is_the_vision_part():
    tower = VisionTower(SiglipVisionConfig.tiny(), rngs=nnx.Rngs(0))
    apply_lora(tower, LoRAConfig(rank=2), rngs=nnx.Rngs(0))
    assert nnx.state(tower, trainable_filter(tower, decoder="frozen", vision="lora"))
    with pytest.raises(ValueError, match="has no decoder"):
        trainable_filter(tower, decoder="lora")
