"""Export to Hugging Face folders: transformers reloads them (its outputs are the reference),
bit-for-bit round trips, shards with an index, the convert command."""

from __future__ import annotations

import json

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from conftest import TINY, jit_call, nchw, pixels, vision_hf_model
from flax import nnx
from safetensors.numpy import load_file

import medsiglip
from medsiglip import SiglipModel, SiglipVisionConfig, VisionTower
from medsiglip.checkpoints.export import parse_size, save_hf
from medsiglip.cli import main


def _tensors(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _assert_bitwise(a, b):
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert a[name].tobytes() == b[name].tobytes(), name


def _ids(n=3):
    return np.random.default_rng(0).integers(3, TINY.text.vocab_size,
                                             (n, TINY.text.max_positions))


def test_siglip_round_trip_is_bitwise_and_transformers_loads_it(tmp_path, hf_siglip_dir,
                                                                hf_siglip):
    model = medsiglip.load_siglip(hf_siglip_dir)
    out = save_hf(model, tmp_path / "out", source=hf_siglip_dir)
    _assert_bitwise(_tensors(out), _tensors(hf_siglip_dir))
    assert (out / "spiece.model").read_bytes() == (hf_siglip_dir / "spiece.model").read_bytes()
    again = transformers.SiglipModel.from_pretrained(out).eval()
    x, ids = pixels(2, TINY.vision.image_size, seed=2), _ids()
    with torch.no_grad():
        want = hf_siglip(input_ids=torch.tensor(ids), pixel_values=nchw(x)).logits_per_image
        got = again(input_ids=torch.tensor(ids), pixel_values=nchw(x)).logits_per_image
    np.testing.assert_array_equal(got.numpy(), want.numpy())


def test_siglip_of_our_own_weights_matches_transformers(tmp_path):
    """Weights that never came from transformers: its model of the export gives our outputs."""
    model = SiglipModel(TINY, rngs=nnx.Rngs(7))
    for var in jax_leaves(model):
        var.set_value(var.get_value() + 0.05 * np.random.default_rng(len(var.shape)).standard_normal(
            var.shape).astype(np.float32))  # non-trivial norms and biases
    out = save_hf(model, tmp_path / "out", max_shard_size="40KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(files) > 2 and sorted(set(index["weight_map"].values())) == files
    stored = _tensors(out)
    assert sorted(index["weight_map"]) == sorted(stored)
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in stored.values())
    for f in out.glob("*.safetensors"):
        assert f.stat().st_size <= parse_size("40KB") + 4096 or len(load_file(f)) == 1
    ref = transformers.SiglipModel.from_pretrained(out).eval()
    x, ids = pixels(2, TINY.vision.image_size, seed=3), _ids()
    with torch.no_grad():
        want = ref(input_ids=torch.tensor(ids), pixel_values=nchw(x))
    got = jit_call(model, "__call__", x, ids)
    np.testing.assert_allclose(got.image_embeds, want.image_embeds.numpy(), atol=1e-4)
    np.testing.assert_allclose(got.text_embeds, want.text_embeds.numpy(), atol=1e-4)
    np.testing.assert_allclose(got.logits_per_image, want.logits_per_image.numpy(), atol=1e-4)


def jax_leaves(model):
    return [v for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param))]


@pytest.mark.parametrize("use_head", [True, False])
def test_vision_tower_export(tmp_path, use_head):
    cfg = SiglipVisionConfig.tiny(use_head=use_head)
    hf = vision_hf_model(cfg, seed=5)
    hf.save_pretrained(tmp_path / "hf")
    tower = medsiglip.load_vision_tower(tmp_path / "hf")
    out = save_hf(tower, tmp_path / "out")
    _assert_bitwise(_tensors(out), _tensors(tmp_path / "hf"))
    again = transformers.SiglipVisionModel.from_pretrained(out).eval()
    x = pixels(2, cfg.image_size, seed=4)
    with torch.no_grad():
        ref = again(pixel_values=nchw(x))
    np.testing.assert_allclose(jit_call(tower, "__call__", x), ref.last_hidden_state.numpy(),
                               atol=1e-4)


def test_bfloat16_round_trip_keeps_dtypes(tmp_path, hf_siglip_dir):
    src = transformers.SiglipModel.from_pretrained(hf_siglip_dir, dtype=torch.bfloat16)
    src.save_pretrained(tmp_path / "bf16")
    model = medsiglip.load_siglip(tmp_path / "bf16", dtype=jnp.bfloat16)
    out = save_hf(model, tmp_path / "out")
    stored = _tensors(out)
    # logit_scale / logit_bias stay float32 in our model: exported as float32 (the rest BF16)
    assert stored["vision_model.post_layernorm.weight"].dtype == ml_dtypes.bfloat16
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    original = _tensors(tmp_path / "bf16")
    for name in ("logit_scale", "logit_bias"):
        np.testing.assert_array_equal(stored.pop(name), original.pop(name).astype(np.float32))
    _assert_bitwise(stored, original)


def test_refusals(tmp_path, hf_siglip_dir):
    model = medsiglip.load_siglip(hf_siglip_dir)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(FileExistsError, match="overwrite"):
        save_hf(model, tmp_path / "full")
    with pytest.raises(ValueError, match="5GB"):
        save_hf(model, tmp_path / "o", max_shard_size="five")
    with pytest.raises(TypeError, match="SiglipModel or VisionTower"):
        save_hf(model.text, tmp_path / "o2")


def test_convert_command(tmp_path, hf_siglip_dir, hf_siglip, capsys):
    assert main(["convert", str(hf_siglip_dir), "--to", "orbax", str(tmp_path / "orbax")]) == 0
    assert (tmp_path / "orbax" / "spiece.model").is_file()
    assert main(["convert", str(tmp_path / "orbax"), "--to", "hf", str(tmp_path / "hf"),
                 "--max-shard-size", "100KB"]) == 0
    assert len(list((tmp_path / "hf").glob("*.safetensors"))) > 1
    _assert_bitwise(_tensors(tmp_path / "hf"), _tensors(hf_siglip_dir))
    assert main(["convert", str(hf_siglip_dir), "--to", "hf", str(tmp_path / "bf"),
                 "--dtype", "bfloat16"]) == 0
    assert _tensors(tmp_path / "bf")["text_model.head.weight"].dtype == ml_dtypes.bfloat16
    capsys.readouterr()
    assert main(["convert", str(hf_siglip_dir), "--to", "hf", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("medsiglip: error:") and "--overwrite" in err and "\n" not in err
    assert main(["convert", str(tmp_path / "nope"), "--to", "hf", str(tmp_path / "x")]) == 2
    assert "nope" in capsys.readouterr().err


def test_convert_vision_tower(tmp_path):
    cfg = SiglipVisionConfig.tiny(use_head=False)
    vision_hf_model(cfg, seed=6).save_pretrained(tmp_path / "hf")
    assert main(["convert", str(tmp_path / "hf"), "--to", "orbax", str(tmp_path / "o")]) == 0
    tower = medsiglip.restore_checkpoint(tmp_path / "o")
    assert isinstance(tower, VisionTower)
    assert main(["convert", str(tmp_path / "o"), "--to", "hf", str(tmp_path / "back")]) == 0
    _assert_bitwise(_tensors(tmp_path / "back"), _tensors(tmp_path / "hf"))
