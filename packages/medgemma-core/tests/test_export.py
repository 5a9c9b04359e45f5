"""Export to Hugging Face folders: transformers loads them and its logits (the reference) match
ours; HF -> ours -> HF is bit for bit; shards with an index; tokenizer files; the convert
command."""

from __future__ import annotations

import json

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file

from medgemma_core.checkpoints import load_decoder
from medgemma_core.checkpoints.export import hf_specs, save_hf
from medgemma_core.checkpoints.multimodal import load_multimodal
from medgemma_core.config import Gemma3Config
from medgemma_core.multimodal import Gemma3Multimodal, MultimodalConfig
from medgemma_core.testing import save_tiny_causal_lm, save_tiny_mm
from medgemma_core.transformer import Gemma3
from medsiglip import SiglipVisionConfig

CFG = Gemma3Config.tiny(vocab_size=300)  # 7 layers: 5 local, 1 global, 1 local
IMAGE = 262144


def tensors(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def assert_bitwise(a, b):
    assert sorted(a) == sorted(b)
    for name in a:
        assert (a[name].dtype, a[name].shape) == (b[name].dtype, b[name].shape), name
        assert a[name].tobytes() == b[name].tobytes(), name


def ids(n=24, seed=0, vocab=CFG.vocab_size):
    return np.random.default_rng(seed).integers(3, vocab, size=(1, n))


def hf_logits(model, x, **kw):
    with torch.no_grad():
        return model(input_ids=torch.tensor(x), **kw).logits.float().numpy()


def perturb(model, seed=0, scale=0.05):
    """Non-trivial values in every parameter (zero-initialized norms would hide a swap)."""
    rng = np.random.default_rng(seed)
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = np.asarray(var.get_value(), np.float32)
        var.set_value(jnp.asarray(value + scale * rng.standard_normal(value.shape),
                                  var.get_value().dtype))
    return model


@pytest.fixture(scope="module")
def text_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("text")
    return folder, save_tiny_causal_lm(folder, CFG, seed=1)


def test_text_round_trip_is_bitwise_and_transformers_reloads_it(tmp_path, text_folder):
    folder, ref = text_folder
    model = load_decoder(folder)
    out = save_hf(model, tmp_path / "out", source=folder)
    assert_bitwise(tensors(out), tensors(folder))
    assert (out / "generation_config.json").read_bytes() == \
        (folder / "generation_config.json").read_bytes()
    again = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(again).__name__ == "Gemma3ForCausalLM"
    ours, _ = model(ids())
    np.testing.assert_allclose(hf_logits(again, ids()), np.asarray(ours), atol=1e-4, rtol=1e-4)
    np.testing.assert_array_equal(hf_logits(again, ids()), hf_logits(ref, ids()))


def test_text_model_of_our_own_weights_reloads_with_our_logits(tmp_path):
    """Weights that never came from transformers (so the inverse conversions are checked
    against transformers itself, not against our own forward conversions), sharded."""
    model = perturb(Gemma3(CFG, rngs=nnx.Rngs(3)))
    out = save_hf(model, tmp_path / "out", max_shard_size="60KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(files) > 3 and sorted(set(index["weight_map"].values())) == files
    stored = tensors(out)
    assert sorted(index["weight_map"]) == sorted(stored)
    assert all(load_file(out / index["weight_map"][k]).keys() >= {k} for k in list(stored)[:5])
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in stored.values())
    for f in out.glob("*.safetensors"):  # each shard holds at most 60 kB of tensors (or one)
        shard = load_file(f)
        assert sum(v.nbytes for v in shard.values()) <= 60_000 or len(shard) == 1
    assert "lm_head.weight" not in stored and stored["model.embed_tokens.weight"].shape == (300, 64)
    ref = transformers.Gemma3ForCausalLM.from_pretrained(out).eval()
    ours, _ = model(ids(40, seed=2))  # 40 > window 8: local and global layers differ
    np.testing.assert_allclose(hf_logits(ref, ids(40, seed=2)), np.asarray(ours),
                               atol=1e-4, rtol=1e-4)


def test_bfloat16_round_trip(tmp_path):
    save_tiny_causal_lm(tmp_path / "hf", CFG, seed=2, dtype=torch.bfloat16)
    model = load_decoder(tmp_path / "hf", dtype="bfloat16")
    out = save_hf(model, tmp_path / "out")
    stored = tensors(out)
    assert stored["model.layers.0.self_attn.q_proj.weight"].dtype == ml_dtypes.bfloat16
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert_bitwise(stored, tensors(tmp_path / "hf"))


def test_every_inverse_undoes_its_conversion():
    """Each spec's inverse applied to its conversion gives the stored tensor back, bit for bit
    (random data of the stored shape), for the text and the image-text tables."""
    cfg = MultimodalConfig(CFG, SiglipVisionConfig.tiny(image_size=32, use_head=False),
                           mm_tokens_per_image=4)
    mm = nnx.eval_shape(lambda: Gemma3Multimodal(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    specs = hf_specs(nnx.eval_shape(lambda: Gemma3(CFG, rngs=nnx.Rngs(0)))) + hf_specs(mm)
    assert any(s.name.startswith("vision_tower.") for s in specs)
    for spec in specs:
        if spec.shape is None:
            continue
        x = rng.standard_normal(spec.shape).astype(np.float32)
        np.testing.assert_array_equal(spec.inverse(spec.convert(x)), x, err_msg=spec.name)


def test_refusals(tmp_path, text_folder):
    model = load_decoder(text_folder[0])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(FileExistsError, match="overwrite"):
        save_hf(model, tmp_path / "full")
    with pytest.raises(TypeError, match="Gemma3"):
        save_hf(model.final_norm, tmp_path / "o")
    model.extra_lora = nnx.Param(jnp.zeros(3))
    with pytest.raises(ValueError, match="extra_lora.*merge"):
        save_hf(model, tmp_path / "o2")


# ---- image-text ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mm_folder(tmp_path_factory, hf_folder_reference):
    folder = tmp_path_factory.mktemp("mm")
    return folder, save_tiny_mm(folder, hf_folder_reference[1])


def _image_prompt(n_soft, seed=0, text=12):
    rng = np.random.default_rng(seed)
    body = list(rng.integers(300, 5000, text))
    return np.asarray([[2, *body[:6], 255999, *[IMAGE] * n_soft, 256000, *body[6:]]])


def _mm_ref(ref, x, pixels):
    with torch.no_grad():
        return ref(input_ids=torch.tensor(x), pixel_values=torch.tensor(pixels).permute(0, 3, 1, 2),
                   token_type_ids=torch.tensor((x == IMAGE).astype(np.int64))).logits.numpy()


def test_image_text_round_trip_with_tokenizer_files(tmp_path, mm_folder):
    folder, ref = mm_folder
    model = load_multimodal(folder)
    out = save_hf(model, tmp_path / "out", source=folder, max_shard_size="20MB")
    assert len(list(out.glob("*.safetensors"))) > 1  # the 262,208 x 32 embedding: 33.6 MB
    assert_bitwise(tensors(out), tensors(folder))
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (folder / name).read_bytes(), name
    again = transformers.Gemma3ForConditionalGeneration.from_pretrained(out).eval()
    pixels = np.random.default_rng(1).uniform(-1, 1, (1, 112, 112, 3)).astype(np.float32)
    x = _image_prompt(16)
    ours = np.asarray(model(x, pixels))
    np.testing.assert_allclose(_mm_ref(again, x, pixels), ours, atol=1e-4, rtol=1e-4)


def test_image_text_model_of_our_own_weights(tmp_path, mm_folder):
    """Our own random image-text model: transformers' model of the export gives our logits, and
    the export holds exactly the tensor names transformers itself writes."""
    model = perturb(Gemma3Multimodal(MultimodalConfig.tiny(), rngs=nnx.Rngs(4)), seed=1)
    out = save_hf(model, tmp_path / "out")
    assert sorted(tensors(out)) == sorted(tensors(mm_folder[0]))  # 2 layers each: same names
    ref = transformers.Gemma3ForConditionalGeneration.from_pretrained(out).eval()
    pixels = np.random.default_rng(2).uniform(-1, 1, (1, 32, 32, 3)).astype(np.float32)
    x = _image_prompt(model.config.mm_tokens_per_image, seed=3)
    np.testing.assert_allclose(_mm_ref(ref, x, pixels), np.asarray(model(x, pixels)),
                               atol=1e-4, rtol=1e-4)


# ---- medgemma convert ---------------------------------------------------------------------
def test_convert_text_hf_to_orbax_and_back(tmp_path, text_folder, capsys):
    from medgemma_core.cli import main

    folder, _ = text_folder
    assert main(["convert", str(folder), "--to", "orbax", str(tmp_path / "orbax")]) == 0
    assert "text model, float32" in capsys.readouterr().out
    ours, _ = load_decoder(tmp_path / "orbax")(ids())
    want, _ = load_decoder(folder)(ids())
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(want))
    assert main(["convert", str(tmp_path / "orbax"), "--to", "hf", str(tmp_path / "hf"),
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["kind"] == "text" and result["tensors"] == 2 + 13 * CFG.num_layers
    assert_bitwise(tensors(tmp_path / "hf"), tensors(folder))
    assert main(["convert", str(folder), "--to", "hf", str(tmp_path / "bf"), "--dtype",
                 "bfloat16"]) == 0
    assert all(v.dtype == ml_dtypes.bfloat16 for v in tensors(tmp_path / "bf").values())


def test_convert_errors_are_one_line(tmp_path, text_folder, capsys):
    from medgemma_core.cli import main

    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    for argv, words in [
        (["convert", str(text_folder[0]), "--to", "hf", str(tmp_path / "full")], "--overwrite"),
        (["convert", str(tmp_path / "absent"), "--to", "hf", str(tmp_path / "o")], "absent"),
        (["convert", str(text_folder[0]), "--to", "hf", str(tmp_path / "o"),
          "--max-shard-size", "lots"], "5GB"),
        (["convert", str(tmp_path / "full"), "--to", "orbax", str(tmp_path / "o2")],
         "config.json"),
    ]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()  # progress lines, then the error
        assert "Traceback" not in "".join(err) and sum("medgemma: error:" in x for x in err) == 1
        assert err[-1].startswith("medgemma: error:") and words in err[-1], err


def test_convert_image_text_to_orbax_loads_and_back_to_bf16_hf(tmp_path, mm_folder):
    from medgemma_core import load
    from medgemma_core.cli import main

    folder, _ = mm_folder
    assert main(["convert", str(folder), "--to", "orbax", str(tmp_path / "orbax")]) == 0
    model = load(tmp_path / "orbax")  # model + tokenizer + processor from the Orbax folder
    assert model.is_multimodal and model.tokenizer.image_token_id == IMAGE
    assert main(["convert", str(tmp_path / "orbax"), "--to", "hf", str(tmp_path / "hf"),
                 "--dtype", "bfloat16", "--max-shard-size", "10MB"]) == 0
    out = tensors(tmp_path / "hf")
    original = tensors(folder)
    assert sorted(out) == sorted(original)
    for name, value in original.items():  # f32 -> bf16: round to nearest even, as ml_dtypes
        np.testing.assert_array_equal(out[name].view(np.uint16),
                                      value.astype(ml_dtypes.bfloat16).view(np.uint16), name)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["architectures"] == ["Gemma3ForConditionalGeneration"] and cfg["dtype"] == "bfloat16"


# ---- the real Gemma 3 270M GGUF -> a folder transformers loads -----------------------------
def test_real_270m_gguf_to_hf_folder(tmp_path, gguf_path, gemma_tokenizer):
    """llama.cpp's Q4_K_M file (dequantized) as a safetensors folder: transformers'
    Gemma3ForCausalLM and AutoTokenizer load it; its logits on a prompt match ours from the
    GGUF, and its tokenizer gives our ids."""
    from medgemma_core.checkpoints.export import load_any
    from medgemma_core.cli import main

    out = tmp_path / "hf"
    assert main(["convert", str(gguf_path), "--to", "hf", str(out)]) == 0
    assert {"config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json",
            "generation_config.json"} <= {p.name for p in out.iterdir()}
    prompt = "Question: What is the most common cause of community-acquired pneumonia?\nAnswer:"
    tok = transformers.AutoTokenizer.from_pretrained(out)
    want_ids = gemma_tokenizer.encode(prompt, add_bos=True)
    assert tok(prompt)["input_ids"] == want_ids
    x = np.asarray([want_ids])
    ours, _ = load_any(gguf_path)(x)
    ref = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    np.testing.assert_allclose(hf_logits(ref, x), np.asarray(ours), atol=1e-4, rtol=1e-4)


def test_lora_adapters_must_be_merged_then_export_the_merged_weights(tmp_path, text_folder):
    from medsiglip.lora import LoRAConfig, apply_lora, merge_lora

    model = load_decoder(text_folder[0])
    apply_lora(model, LoRAConfig(rank=4, alpha=8, dropout=0.0), rngs=nnx.Rngs(0))
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
        if path[-1] == "b":  # b starts at zero: make the adapters change the output
            var.set_value(0.1 * np.random.default_rng(len(path)).standard_normal(var.shape)
                          .astype(np.float32))
    adapted, _ = model(ids())
    with pytest.raises(ValueError, match="unmerged LoRA adapters.*merge_lora"):
        save_hf(model, tmp_path / "o")
    merge_lora(model)
    out = save_hf(model, tmp_path / "merged")
    ref = transformers.Gemma3ForCausalLM.from_pretrained(out).eval()
    assert np.abs(hf_logits(ref, ids()) - hf_logits(text_folder[1], ids())).max() > 1e-2
    np.testing.assert_allclose(hf_logits(ref, ids()), np.asarray(adapted), atol=1e-4, rtol=1e-4)
