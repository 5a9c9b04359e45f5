"""Full-size presets (no memory, jax.eval_shape) against transformers models on the meta
device, config reading, and the vision interface's input checks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
import torch
import transformers
from flax import nnx

import medsiglip
from medsiglip import SiglipConfig, SiglipModel, SiglipVisionConfig, VisionTower
from medsiglip.weights import abstract_module, param_count


def _torch_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_so400m_448_two_tower_param_count():
    cfg = SiglipConfig.so400m_patch14_448()
    with torch.device("meta"):
        ref = transformers.SiglipModel(transformers.SiglipConfig(**cfg.to_hf_dict()))
    ours = param_count(lambda rngs: SiglipModel(cfg, rngs=rngs))
    assert ours == _torch_count(ref)
    assert 850e6 < ours < 900e6  # ~400M per tower plus the 32k-token embedding


@pytest.mark.parametrize("preset", ["so400m_patch14_448", "so400m_patch14_896"])
def test_so400m_vision_param_count(preset):
    cfg = getattr(SiglipVisionConfig, preset)()
    with torch.device("meta"):
        ref = transformers.SiglipVisionModel(
            transformers.SiglipVisionConfig(**cfg.to_hf_dict())
        )
    assert param_count(lambda rngs: VisionTower(cfg, rngs=rngs)) == _torch_count(ref)


def test_896_preset_is_medgemmas_tower():
    cfg = SiglipVisionConfig.so400m_patch14_896()
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.intermediate_size) == (
        1152, 27, 16, 4304)
    assert cfg.num_patches == 4096 and not cfg.use_head
    abstract = abstract_module(lambda rngs: VisionTower(cfg, rngs=rngs))
    graphdef, state = nnx.split(abstract)
    out = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state,
                         jax.ShapeDtypeStruct((2, 896, 896, 3), jnp.float32))
    assert out.shape == (2, 4096, 1152)


def test_from_hf_dict_reads_gemma3_vision_config():
    d = transformers.Gemma3Config().vision_config.to_dict()
    cfg = SiglipVisionConfig.from_hf_dict(d)
    assert cfg.image_size == d["image_size"] and cfg.patch_size == d["patch_size"]
    assert cfg.num_layers == d["num_hidden_layers"] and cfg.use_head == d["vision_use_head"]
    hf = transformers.SiglipConfig(**SiglipConfig.tiny().to_hf_dict()).to_dict()
    assert SiglipConfig.from_hf_dict(hf) == SiglipConfig.tiny()


def test_config_errors():
    with pytest.raises(ValueError, match="multiple of patch_size"):
        SiglipVisionConfig(image_size=450)
    with pytest.raises(ValueError, match="hidden_act"):
        SiglipVisionConfig(hidden_act="relu")
    with pytest.raises(ValueError, match="square"):
        SiglipVisionConfig.from_hf_dict({"image_size": [448, 224]})
    with pytest.raises(ValueError, match="MAP head"):
        SiglipConfig(vision=SiglipVisionConfig.tiny(use_head=False))


def test_vision_tower_rejects_wrong_layout():
    tower = abstract_module(
        lambda rngs: VisionTower(SiglipVisionConfig.tiny(), rngs=rngs))
    graphdef, state = nnx.split(tower)

    def shape_of(method, shape):
        fn = lambda s, x: getattr(nnx.merge(graphdef, s), method)(x)  # noqa: E731
        return jax.eval_shape(fn, state, jax.ShapeDtypeStruct(shape, jnp.float32)).shape

    with pytest.raises(ValueError, match="channels-first"):
        shape_of("__call__", (1, 3, 32, 32))
    with pytest.raises(ValueError, match="preprocess"):
        shape_of("__call__", (1, 64, 64, 3))
    assert shape_of("__call__", (2, 32, 32, 3)) == (2, 16, 32)
    assert shape_of("pooled", (2, 32, 32, 3)) == (2, 32)


def test_public_interface_names():
    for name in ("SiglipVisionConfig", "VisionTower", "load_vision_tower_from_tensors",
                 "preprocess", "SiglipTokenizer", "MedSigLIP", "resize_position_embedding"):
        assert hasattr(medsiglip, name)


def test_exports_are_the_readmes_stable_list():
    """``__all__`` is exactly the names README.md's "The stable interface" table lists."""
    import re
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("## The stable interface", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1] for line in section.splitlines() if line.startswith("| `")]
    listed = {name for row in rows for name in re.findall(r"`(\w+)`", row)}
    assert listed == set(medsiglip.__all__)
    assert all(hasattr(medsiglip, name) for name in medsiglip.__all__)
    assert medsiglip.CheckpointError is medsiglip.weights.CheckpointError
