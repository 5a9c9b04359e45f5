"""Numerical parity with transformers on tiny random checkpoints saved by the tests."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from conftest import TINY, jit_call, nchw, pixels, vision_hf_model
from safetensors.torch import save_file

import medsiglip
from medsiglip import CheckpointError, SiglipVisionConfig
from medsiglip.checkpoints.convert import VISION_PREFIXES
from medsiglip.weights import MappingSource

TEXTS = ["A chest X-ray, showing PNEUMONIA!", "normal chest radiograph", "",
         "the patient has a left pleural effusion " * 6]


def test_siglip_model_embeddings_logits_probs(hf_siglip_dir, hf_siglip):
    model = medsiglip.load_siglip(hf_siglip_dir)
    tok = transformers.SiglipTokenizer(str(hf_siglip_dir / "spiece.model"))
    ids = tok(TEXTS, padding="max_length", truncation=True, max_length=TINY.text.max_positions,
              return_tensors="pt")["input_ids"]
    x = pixels(3, TINY.vision.image_size)
    with torch.no_grad():
        ref = hf_siglip(input_ids=ids, pixel_values=nchw(x))
    out = jit_call(model, "__call__", x, ids.numpy())
    np.testing.assert_allclose(out.image_embeds, ref.image_embeds.numpy(), atol=1e-4)
    np.testing.assert_allclose(out.text_embeds, ref.text_embeds.numpy(), atol=1e-4)
    np.testing.assert_allclose(out.logits_per_image, ref.logits_per_image.numpy(), atol=1e-4)
    np.testing.assert_allclose(out.logits_per_text, ref.logits_per_text.numpy(), atol=1e-4)
    probs = 1 / (1 + np.exp(-np.asarray(out.logits_per_image)))
    np.testing.assert_allclose(probs, torch.sigmoid(ref.logits_per_image).numpy(), atol=1e-4)
    # The MAP head's pooled output and the text pooler (unnormalized) as well.
    with torch.no_grad():
        img_ref = hf_siglip.get_image_features(pixel_values=nchw(x)).pooler_output.numpy()
    np.testing.assert_allclose(jit_call(model, "image_features", x), img_ref, atol=1e-4)


def test_api_matches_transformers(hf_siglip_dir, hf_siglip):
    api = medsiglip.MedSigLIP.from_pretrained(hf_siglip_dir, batch_size=2)
    x = pixels(3, TINY.vision.image_size, seed=5)
    tok = transformers.SiglipTokenizer(str(hf_siglip_dir / "spiece.model"))
    ids = tok(TEXTS, padding="max_length", truncation=True, max_length=TINY.text.max_positions,
              return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = hf_siglip(input_ids=ids, pixel_values=nchw(x))
    img = api.embed_pixels(x)  # 3 images through batches of 2 (padding path)
    txt = api.embed_texts(TEXTS)
    np.testing.assert_allclose(img, ref.image_embeds.numpy(), atol=1e-4)
    np.testing.assert_allclose(txt, ref.text_embeds.numpy(), atol=1e-4)
    np.testing.assert_allclose(api.logits(img, txt), ref.logits_per_image.numpy(), atol=1e-4)


@pytest.mark.parametrize("use_head", [False, True])
def test_vision_model_parity(tmp_path, use_head):
    cfg = SiglipVisionConfig.tiny(use_head=use_head)
    hf = vision_hf_model(cfg, seed=3)
    hf.save_pretrained(tmp_path)
    tower = medsiglip.load_vision_tower(tmp_path)
    x = pixels(2, cfg.image_size, seed=1)
    with torch.no_grad():
        ref = hf(pixel_values=nchw(x))
    tokens = jit_call(tower, "__call__", x)
    assert tokens.shape == (2, cfg.num_patches, cfg.hidden_size)
    np.testing.assert_allclose(tokens, ref.last_hidden_state.numpy(), atol=1e-4)
    if use_head:
        np.testing.assert_allclose(jit_call(tower, "pool", tokens), ref.pooler_output.numpy(), atol=1e-4)
    else:
        with pytest.raises(ValueError, match="no MAP head"):
            tower.pooled(x)


@pytest.mark.parametrize("prefix", list(VISION_PREFIXES))
def test_every_prefix_from_tensors(prefix):
    """The Gemma 3 layouts: a lazy TensorSource, one tensor read at a time, each exactly once."""
    cfg = SiglipVisionConfig.tiny(use_head=False)
    hf = vision_hf_model(cfg, seed=4)
    sd = {k: v.numpy() for k, v in hf.state_dict().items()}
    store = {prefix + k: v for k, v in sd.items()}
    store["language_model.model.embed_tokens.weight"] = np.zeros((4, 4), np.float32)
    reads: list[str] = []

    class Counting(MappingSource):
        def get(self, name: str) -> np.ndarray:
            reads.append(name)
            return super().get(name)

    tower = medsiglip.load_vision_tower_from_tensors(cfg, Counting(store))
    assert sorted(reads) == sorted(prefix + k for k in sd)  # each read once, nothing else
    x = pixels(1, cfg.image_size, seed=2)
    with torch.no_grad():
        ref = hf(pixel_values=nchw(x)).last_hidden_state.numpy()
    np.testing.assert_allclose(jit_call(tower, "__call__", x), ref, atol=1e-4)


def test_gemma3_checkpoint_vision_tower(tmp_path):
    """A real (tiny) Gemma3ForConditionalGeneration folder, as transformers saves it."""
    torch.manual_seed(0)
    cfg = transformers.Gemma3Config(
        text_config=dict(vocab_size=300, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         head_dim=16),
        vision_config=SiglipVisionConfig.tiny(use_head=False).to_hf_dict(),
        mm_tokens_per_image=4, image_token_index=299, boi_token_index=297,
        eoi_token_index=298,
    )
    hf = transformers.Gemma3ForConditionalGeneration(cfg).eval()
    hf.save_pretrained(tmp_path)
    tower = medsiglip.load_vision_tower(tmp_path)
    assert tower.config == SiglipVisionConfig.tiny(use_head=False)
    x = pixels(2, 32, seed=7)
    with torch.no_grad():
        ref = hf.model.vision_tower(pixel_values=nchw(x)).last_hidden_state.numpy()
    np.testing.assert_allclose(jit_call(tower, "__call__", x), ref, atol=1e-4)


def test_missing_and_mismatched_tensors_are_named():
    cfg = SiglipVisionConfig.tiny(use_head=True)
    hf = vision_hf_model(cfg, seed=5)
    store = {"vision_model." + k: v.numpy() for k, v in hf.state_dict().items()}
    missing = dict(store)
    del missing["vision_model.head.attention.in_proj_weight"]
    with pytest.raises(CheckpointError, match="vision_model.head.attention.in_proj_weight"):
        medsiglip.load_vision_tower_from_tensors(cfg, missing)
    bad = dict(store)
    bad["vision_model.encoder.layers.1.mlp.fc1.weight"] = np.zeros((3, 3), np.float32)
    with pytest.raises(CheckpointError, match=r"encoder\.layers\.1\.mlp\.fc1\.weight"):
        medsiglip.load_vision_tower_from_tensors(cfg, bad)
    deeper = cfg.replace(num_layers=3)
    with pytest.raises(CheckpointError, match="encoder.layers.2"):
        medsiglip.load_vision_tower_from_tensors(deeper, store)
    with pytest.raises(CheckpointError, match="no vision tower found"):
        medsiglip.load_vision_tower_from_tensors(cfg, {"x.weight": np.zeros(2)})


def test_position_grid_mismatch_and_resize(tmp_path):
    cfg = SiglipVisionConfig.tiny(use_head=False, image_size=32)  # 4x4 grid
    hf = vision_hf_model(cfg, seed=6)
    store = {"vision_model." + k: v.numpy() for k, v in hf.state_dict().items()}
    bigger = cfg.replace(image_size=64)  # 8x8 grid
    with pytest.raises(CheckpointError, match=r"4x4 position grid.*resize_positions=True"):
        medsiglip.load_vision_tower_from_tensors(bigger, store)
    tower = medsiglip.load_vision_tower_from_tensors(bigger, store, resize_positions=True)
    table = store["vision_model.embeddings.position_embedding.weight"]
    grid = torch.from_numpy(table.reshape(1, 4, 4, -1)).permute(0, 3, 1, 2)
    want = torch.nn.functional.interpolate(grid, size=(8, 8), mode="bilinear",
                                           align_corners=False, antialias=True)
    want = want.permute(0, 2, 3, 1).reshape(64, -1).numpy()
    np.testing.assert_allclose(tower.embeddings.position_embedding[...], want, atol=1e-5)
    assert jit_call(tower, "__call__", pixels(1, 64)).shape == (1, 64, cfg.hidden_size)
    # The HF-folder form: image_size= resamples.
    hf.save_pretrained(tmp_path)
    tower2 = medsiglip.load_vision_tower(tmp_path, image_size=64)
    np.testing.assert_allclose(tower2.embeddings.position_embedding[...], want, atol=1e-5)


def test_bfloat16_load_close_to_float32(tmp_path):
    cfg = SiglipVisionConfig.tiny(use_head=True)
    hf = vision_hf_model(cfg, seed=8).to(torch.bfloat16)
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()},
              str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(
        '{"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64, '
        '"num_hidden_layers": 2, "num_attention_heads": 4, "patch_size": 8, "image_size": 32}'
    )
    import jax.numpy as jnp

    t32 = medsiglip.load_vision_tower(tmp_path)
    t16 = medsiglip.load_vision_tower(tmp_path, dtype=jnp.bfloat16)
    assert t16.embeddings.kernel.dtype == jnp.bfloat16
    x = pixels(1, 32)
    with torch.no_grad():
        ref = hf.float()(pixel_values=nchw(x)).pooler_output.numpy()
    np.testing.assert_allclose(jit_call(t32, "pooled", x), ref, atol=1e-4)
    np.testing.assert_allclose(np.asarray(jit_call(t16, "pooled", x), np.float32), ref, atol=0.15)
