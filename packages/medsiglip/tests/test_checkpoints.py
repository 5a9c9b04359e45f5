"""Orbax save/restore round trips and HF-folder errors."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import medsiglip
from medsiglip import (
    CheckpointError,
    SiglipConfig,
    SiglipModel,
    SiglipVisionConfig,
    VisionTower,
    restore_checkpoint,
    save_checkpoint,
)


def _assert_same_state(a: nnx.Module, b: nnx.Module) -> None:
    flat_a = dict(nnx.to_flat_state(nnx.state(a)))
    flat_b = dict(nnx.to_flat_state(nnx.state(b)))
    assert flat_a.keys() == flat_b.keys()
    for path, var in flat_a.items():
        assert var.dtype == flat_b[path].dtype, path
        np.testing.assert_array_equal(np.asarray(var[...], np.float32),
                                      np.asarray(flat_b[path][...], np.float32), err_msg=str(path))


def test_orbax_round_trip_siglip(tmp_path, spiece_model):
    model = SiglipModel(SiglipConfig.tiny(), rngs=nnx.Rngs(3))
    save_checkpoint(model, tmp_path / "ck", tokenizer_file=spiece_model)
    restored = restore_checkpoint(tmp_path / "ck")
    assert isinstance(restored, SiglipModel) and restored.config == model.config
    _assert_same_state(restored, model)
    api = medsiglip.MedSigLIP.from_pretrained(tmp_path / "ck")
    assert api.tokenizer is not None and api.tokenizer.max_length == 16
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_checkpoint(model, tmp_path / "ck")


def test_orbax_round_trip_bf16_vision_tower(tmp_path, hf_siglip_dir):
    tower = medsiglip.load_vision_tower(hf_siglip_dir, dtype=jnp.bfloat16)
    save_checkpoint(tower, tmp_path / "v")
    restored = restore_checkpoint(tmp_path / "v")
    assert isinstance(restored, VisionTower)
    assert restored.embeddings.kernel.dtype == jnp.bfloat16
    _assert_same_state(restored, tower)


def test_hf_folder_errors(tmp_path, hf_siglip_dir):
    with pytest.raises(CheckpointError, match="no config.json"):
        medsiglip.load_siglip(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "siglip"}))
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        medsiglip.load_siglip(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        medsiglip.load_siglip(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="no vision_config"):
        medsiglip.load_vision_tower(tmp_path)
    # A vision tower folder is not a two-tower model.
    tower_dir = tmp_path / "tower"
    save_checkpoint(VisionTower(SiglipVisionConfig.tiny(), rngs=nnx.Rngs(0)), tower_dir)
    with pytest.raises(CheckpointError, match="vision tower only"):
        medsiglip.MedSigLIP.from_pretrained(tower_dir)
