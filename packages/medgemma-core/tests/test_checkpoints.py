"""Checkpoint loading: sharded folders, multimodal prefixes, bf16, Orbax, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from medgemma_core.checkpoints import CheckpointError, load_decoder, save_decoder
from medgemma_core.config import Gemma3Config
from medgemma_core.testing import save_tiny_causal_lm, tiny_hf_config
from medsiglip import weights

CFG = Gemma3Config.tiny(num_layers=3, vocab_size=300)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    ref = save_tiny_causal_lm(path, CFG, seed=3)
    return path, ref


def _ids(n=20, seed=0):
    return np.random.default_rng(seed).integers(3, CFG.vocab_size, size=(1, n))


def _ref(ref, ids):
    with torch.no_grad():
        return ref(input_ids=torch.tensor(ids)).logits.float().numpy()


def test_sharded_folder(tmp_path, folder):
    _, ref = folder
    ref.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    ours, _ = load_decoder(tmp_path)(_ids())
    np.testing.assert_allclose(np.asarray(ours), _ref(ref, _ids()), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("prefix", ["language_model.model.", "model.language_model."])
def test_multimodal_layout_prefixes(tmp_path, folder, prefix):
    """The language model part of Gemma3ForConditionalGeneration checkpoints, old and new names."""
    path, ref = folder
    tensors = load_file(path / "model.safetensors")
    renamed = {prefix + k.removeprefix("model."): v for k, v in tensors.items()}
    renamed["vision_tower.vision_model.post_layernorm.weight"] = np.ones(4, np.float32)
    save_file(renamed, tmp_path / "model.safetensors")
    hf_cfg = transformers.Gemma3Config(text_config=tiny_hf_config(CFG).to_dict())
    (tmp_path / "config.json").write_text(json.dumps(hf_cfg.to_dict()))
    ours, _ = load_decoder(tmp_path)(_ids())
    np.testing.assert_allclose(np.asarray(ours), _ref(ref, _ids()), atol=1e-4, rtol=1e-4)


def test_bfloat16_checkpoint(tmp_path):
    ref = save_tiny_causal_lm(tmp_path, CFG, seed=4, dtype=torch.bfloat16)
    model = load_decoder(tmp_path, dtype="bfloat16")
    assert model.embedding[...].dtype.name == "bfloat16"
    ours, _ = model(_ids())
    want = _ref(ref, _ids())
    # bf16 numerics differ in rounding order; the ranking of the top token should agree.
    np.testing.assert_allclose(np.asarray(ours, np.float32), want, atol=0.15, rtol=0.05)
    f32, _ = load_decoder(tmp_path, dtype="float32")(_ids())
    assert np.mean(np.argmax(np.asarray(f32), -1) == np.argmax(want, -1)) > 0.9


def test_orbax_round_trip(tmp_path, folder):
    path, ref = folder
    model = load_decoder(path)
    save_decoder(model, tmp_path / "orbax")
    again = load_decoder(tmp_path / "orbax")
    assert again.config == model.config
    a, _ = again(_ids())
    np.testing.assert_allclose(np.asarray(a), _ref(ref, _ids()), atol=1e-4, rtol=1e-4)
    meta = json.loads((tmp_path / "orbax" / weights.META).read_text())
    assert (meta["kind"], meta["dtype"]) == ("gemma3_text", "float32")
    assert load_decoder(tmp_path / "orbax", dtype="bfloat16").embedding[...].dtype == "bfloat16"


def test_orbax_folders_of_other_kinds_and_layouts(tmp_path):
    """One error class (medsiglip's), a clear line for a SigLIP folder and for the layout that
    medgemma-core 0.1 wrote (medgemma.json + params/)."""
    from flax import nnx

    import medsiglip

    assert CheckpointError is medsiglip.CheckpointError is weights.CheckpointError
    tower = medsiglip.VisionTower(medsiglip.SiglipVisionConfig.tiny(), rngs=nnx.Rngs(0))
    medsiglip.save_checkpoint(tower, tmp_path / "siglip")
    with pytest.raises(CheckpointError, match="'vision' model, not a Gemma 3 text decoder"):
        load_decoder(tmp_path / "siglip")
    old = tmp_path / "old"
    (old / "params").mkdir(parents=True)
    (old / "medgemma.json").write_text(json.dumps({"kind": "gemma3_text", "config": {}}))
    with pytest.raises(CheckpointError, match="medgemma-core 0.1.*save it again"):
        load_decoder(old)


def _copy(src, dst):
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())


def test_truncated_file_names_the_file(tmp_path, folder):
    path, _ = folder
    _copy(path, tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*(truncated|corrupt)"):
        load_decoder(tmp_path)


@pytest.mark.parametrize("header", [
    b'[1, 2]',
    b'{"model.embed_tokens.weight": {"dtype": "F32", "shape": [2]}}',
    b'{"model.embed_tokens.weight": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}',
])
def test_malformed_header_names_the_file(tmp_path, folder, header):
    path, _ = folder
    _copy(path, tmp_path)
    (tmp_path / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header
                                                 + bytes(8))
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*(corrupt|truncated)"):
        load_decoder(tmp_path)


def test_config_mismatch_names_the_tensor(tmp_path, folder):
    path, _ = folder
    _copy(path, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"mlp\.gate_proj\.weight.*\[128, 64\].*\[96, 64\]"):
        load_decoder(tmp_path)


def test_missing_tensor_is_named(tmp_path, folder):
    path, _ = folder
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_norm.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.k_norm\.weight"):
        load_decoder(tmp_path)


def test_wrong_kind_of_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    save_file({"model.embed_tokens.weight": np.zeros((4, 4), np.float32)},
              tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="not a Gemma 3"):
        load_decoder(tmp_path)
    with pytest.raises(CheckpointError, match="no such file"):
        load_decoder(tmp_path / "nope")
    (tmp_path / "x.bin").write_bytes(b"1234")
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_decoder(tmp_path / "x.bin")
    (tmp_path / "x.gguf").write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    with pytest.raises(CheckpointError, match="x.gguf"):
        load_decoder(tmp_path / "x.gguf")
