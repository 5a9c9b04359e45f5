"""medsiglip.weights: fill holds one tensor at a time, checks before reading, and the Orbax
layout's meta file, dtype and refusals."""

from __future__ import annotations

import gc
import json
import weakref

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from medsiglip import SiglipConfig, SiglipModel, SiglipVisionConfig, VisionTower
from medsiglip.checkpoints.convert import vision_specs
from medsiglip.weights import (
    META,
    CheckpointError,
    MappingSource,
    TensorSpec,
    abstract_module,
    as_source,
    fill,
    read_meta,
    restore,
    save,
)


def _store(cfg: SiglipVisionConfig, dtype=np.float32) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {s.name: rng.normal(size=s.shape or (cfg.num_patches, cfg.hidden_size))
            .astype(dtype) for s in vision_specs(cfg, "")}


def test_fill_drops_each_tensor_before_reading_the_next():
    """float64 tensors into float32 parameters: each cast is a copy, so nothing read before
    may still be alive (a same-dtype array may become the parameter's buffer on the CPU)."""
    cfg = SiglipVisionConfig.tiny()
    alive: list[weakref.ref] = []

    class Tracking(MappingSource):
        def get(self, name: str) -> np.ndarray:
            gc.collect()
            held = [r for r in alive if r() is not None]
            assert not held, f"{len(held)} earlier tensors still held when {name!r} is read"
            out = np.array(super().get(name))  # a fresh array, as SafetensorsSource returns
            alive.append(weakref.ref(out))
            return out

    store = _store(cfg, np.float64)
    tower = fill(abstract_module(lambda r: VisionTower(cfg, rngs=r)), Tracking(store),
                 vision_specs(cfg, ""))
    # each tensor read once, although the packed in_proj weight and bias feed 3 params each
    assert len(alive) == len(store) == len(vision_specs(cfg, "")) - 4
    np.testing.assert_array_equal(tower.encoder.layers[1].mlp.fc1.kernel[...],
                                  store["encoder.layers.1.mlp.fc1.weight"].T.astype(np.float32))


def test_fill_checks_names_and_shapes_before_any_read_and_rejects_nan():
    cfg = SiglipVisionConfig.tiny(use_head=False)
    reads: list[str] = []

    class Counting(MappingSource):
        def get(self, name: str) -> np.ndarray:
            reads.append(name)
            return super().get(name)

    store = _store(cfg)
    bad = dict(store, **{"post_layernorm.weight": np.zeros(5, np.float32)})
    abstract = abstract_module(lambda r: VisionTower(cfg, rngs=r))
    with pytest.raises(CheckpointError, match=r"'post_layernorm\.weight' has shape \[5\].*\[32\]"):
        fill(abstract, Counting(bad, label="x.safetensors"), vision_specs(cfg, ""))
    assert reads == []
    nan = dict(store, **{"post_layernorm.bias": np.full(32, np.nan, np.float32)})
    with pytest.raises(CheckpointError, match=r"x\.safetensors: tensor 'post_layernorm\.bias'.*NaN"):
        fill(abstract, MappingSource(nan, label="x.safetensors"), vision_specs(cfg, ""))
    with pytest.raises(TypeError, match="TensorSource"):
        as_source([1, 2])


def test_fill_casts_to_the_abstract_dtype():
    """bf16 parameters in bf16, SiglipModel's logit scalars stay float32."""
    cfg = SiglipConfig.tiny()
    abstract = abstract_module(lambda r: SiglipModel(cfg, dtype=jnp.bfloat16, rngs=r))
    flat = nnx.to_flat_state(nnx.state(abstract))
    specs = [TensorSpec(path, "/".join(map(str, path)), tuple(v.shape)) for path, v in flat]
    store = {s.name: np.full(s.shape, 0.5, np.float32) for s in specs}
    model = fill(abstract, as_source(store), specs)
    assert model.vision.post_layernorm.scale.dtype == jnp.bfloat16
    assert model.logit_scale.dtype == jnp.float32 and float(model.logit_scale[0]) == 0.5


def test_orbax_layout(tmp_path):
    cfg = SiglipConfig.tiny()
    model = SiglipModel(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(1))
    folder = save(model, tmp_path / "m", kind="siglip", config=cfg.to_hf_dict())
    assert {p.name for p in folder.iterdir()} == {META, "params"}
    meta = json.loads((folder / META).read_text())
    assert (meta["version"], meta["kind"], meta["dtype"]) == (1, "siglip", "bfloat16")
    assert read_meta(folder) == meta
    back = restore(abstract_module(lambda r: SiglipModel(cfg, dtype=jnp.float32, rngs=r)),
                   folder)
    assert back.vision.post_layernorm.scale.dtype == jnp.float32  # the abstract's dtype
    np.testing.assert_array_equal(np.asarray(back.text.head.kernel[...]),
                                  np.asarray(model.text.head.kernel[...], np.float32))
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save(model, folder, kind="siglip", config={})
    with pytest.raises(CheckpointError, match="cannot restore"):
        restore(abstract_module(lambda r: VisionTower(cfg.vision, rngs=r)), folder)
    old = tmp_path / "old"
    old.mkdir()
    (old / "medsiglip.json").write_text("{}")
    with pytest.raises(CheckpointError, match="medsiglip 0.1.*save it again"):
        read_meta(old)
