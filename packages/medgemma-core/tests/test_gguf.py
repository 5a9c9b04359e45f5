"""GGUF loading on a tiny gemma3 file written with the gguf package (llama.cpp's layout), and
the conversion cache that keeps the dequantized weights."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from medgemma_core.checkpoints import CheckpointError, load_decoder
from medgemma_core.config import Gemma3Config
from medgemma_core.testing import save_tiny_causal_lm
from medsiglip.weights import META

CFG = Gemma3Config.tiny(num_layers=7, vocab_size=300)
_LLAMA_CPP = {  # HF suffix -> llama.cpp name, as llama.cpp's converter writes gemma3 files
    "input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _write_gguf(path, model, cfg: Gemma3Config, quantize_embedding: bool):
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_global_theta)
    w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    w.add_rope_scaling_factor(cfg.rope_global_scaling)
    w.add_sliding_window(cfg.sliding_window)
    for name, t in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        arr = t.float().numpy()
        if name.endswith("norm.weight"):
            arr = arr + 1.0  # llama.cpp stores Gemma norms as (1 + w)
        if name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "model.norm.weight":
            gname = "output_norm.weight"
        else:
            _, _, i, rest = name.split(".", 3)
            gname = f"blk.{i}.{_LLAMA_CPP[rest.removesuffix('.weight')]}.weight"
        if quantize_embedding and gname == "token_embd.weight":
            q = gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(gname, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(gname, np.ascontiguousarray(arr))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf")
    ref = save_tiny_causal_lm(folder / "hf", CFG, seed=5)
    _write_gguf(folder / "tiny.gguf", ref, CFG, quantize_embedding=False)
    _write_gguf(folder / "tiny-q8.gguf", ref, CFG, quantize_embedding=True)
    return folder, ref


def _ids():
    return np.random.default_rng(0).integers(3, CFG.vocab_size, size=(1, 3 * CFG.sliding_window))


def test_gguf_matches_transformers(tiny_gguf, monkeypatch):
    monkeypatch.setenv("MEDGEMMA_CONVERT_CACHE", "0")
    folder, ref = tiny_gguf
    model = load_decoder(folder / "tiny.gguf")
    assert model.config.rope_global_scaling == CFG.rope_global_scaling
    with torch.no_grad():
        want = ref(input_ids=torch.tensor(_ids())).logits.numpy()
    np.testing.assert_allclose(np.asarray(model(_ids())[0]), want, atol=1e-4, rtol=1e-4)


def test_quantized_embedding_is_dequantized(tiny_gguf, monkeypatch):
    monkeypatch.setenv("MEDGEMMA_CONVERT_CACHE", "0")
    folder, ref = tiny_gguf
    emb = np.asarray(load_decoder(folder / "tiny-q8.gguf").embedding[...])
    want = ref.model.embed_tokens.weight.detach().numpy()
    step = np.abs(want).max(axis=1, keepdims=True) / 127  # Q8_0: 8-bit, per-32 block scale
    assert np.all(np.abs(emb - want) <= step + 1e-6)
    assert not np.array_equal(emb, want)


def test_conversion_cache_reuses_the_same_weights(tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDGEMMA_CONVERT_CACHE", str(tmp_path))
    folder, _ = tiny_gguf
    first = load_decoder(folder / "tiny-q8.gguf")
    (entry,) = list(tmp_path.iterdir())
    assert (entry / META).exists()
    second = load_decoder(folder / "tiny-q8.gguf")  # from the cache
    np.testing.assert_array_equal(np.asarray(first(_ids())[0]), np.asarray(second(_ids())[0]))
    # An entry in an older layout (medgemma-core 0.1 wrote medgemma.json) is converted again.
    (entry / META).unlink()
    (entry / "medgemma.json").write_text('{"kind": "gemma3_text", "config": {}}')
    third = load_decoder(folder / "tiny-q8.gguf")
    assert (entry / META).exists() and not (entry / "medgemma.json").exists()
    np.testing.assert_array_equal(np.asarray(first(_ids())[0]), np.asarray(third(_ids())[0]))


def test_conversion_cache_is_renamed_into_place(tiny_gguf, tmp_path, monkeypatch):
    """The cache is written beside its entry and renamed: a complete entry another process
    wrote first stays as it is, a partial one is replaced, and no temporary folder is left."""
    from medgemma_core.checkpoints import _cache_converted

    monkeypatch.setenv("MEDGEMMA_CONVERT_CACHE", str(tmp_path))
    folder, _ = tiny_gguf
    model = load_decoder(folder / "tiny-q8.gguf")
    (entry,) = list(tmp_path.iterdir())
    stamp = (entry / META).stat().st_mtime_ns
    _cache_converted(model, entry)  # the other process's complete entry wins
    assert (entry / META).stat().st_mtime_ns == stamp
    (entry / META).unlink()  # an interrupted save: no meta file
    again = load_decoder(folder / "tiny-q8.gguf")
    assert (entry / META).is_file() and [p.name for p in tmp_path.iterdir()] == [entry.name]
    np.testing.assert_array_equal(np.asarray(model(_ids())[0]), np.asarray(again(_ids())[0]))


def test_truncated_gguf_names_the_file(tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDGEMMA_CONVERT_CACHE", "0")
    folder, _ = tiny_gguf
    data = (folder / "tiny.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"cut\.gguf.*(truncated|corrupt)"):
        load_decoder(tmp_path / "cut.gguf")
