"""Inputs the fuzzer (fuzz/ at the repository root) found escaping the core's readers as
something other than their documented errors, minimised: ``CheckpointError`` for checkpoint
files, ``ValueError`` for config.json mappings and tokenizer files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medgemma_core.checkpoints import CheckpointError, text_source
from medgemma_core.config import Gemma3Config
from medgemma_core.multimodal import MultimodalConfig
from medgemma_core.tokenizer import Tokenizer

HERE = Path(__file__).resolve().parent / "fuzz_regressions"

#: file -> what escaped before (the names end in .bin where the real suffix is git-ignored)
CASES = {
    "gguf_no_block_count.gguf.bin": "TypeError: int(None) for a missing gemma3.* key",
    "gguf_tensor_past_the_end.gguf.bin": "ValueError from GGUFIndex.raw, not CheckpointError",
    "gguf_invalid_byte_piece.gguf.bin": "RuntimeError from SentencePiece (<0 15> byte piece)",
    "safetensors_infinite_offset.safetensors.bin": "OverflowError: int(inf) in data_offsets",
    "mm_config_eoi_token_object.json": "TypeError: int({}) for eoi_token_index",
    "tokenizer_piece_not_utf8.model": "TypeError: a non-UTF-8 piece came back as bytes",
    "config_num_kv_heads_zero.json": "ZeroDivisionError: num_heads % num_key_value_heads",
    "mm_config_sliding_window_pattern_zero.json": "ZeroDivisionError in the layer pattern",
}


def test_every_committed_input_has_a_case():
    assert sorted(p.name for p in HERE.iterdir() if p.is_file()) == sorted(CASES)


@pytest.mark.parametrize("name", ["gguf_no_block_count.gguf.bin",
                                  "gguf_tensor_past_the_end.gguf.bin"])
def test_gguf_finding_is_a_checkpoint_error(name, tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes((HERE / name).read_bytes())
    with pytest.raises(CheckpointError, match="model.gguf"):
        src, _, _ = text_source(path)
        for tensor in src.names():
            src.get(tensor)


def test_safetensors_finding_is_a_checkpoint_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma3_text"}))
    (tmp_path / "model.safetensors").write_bytes(
        (HERE / "safetensors_infinite_offset.safetensors.bin").read_bytes())
    with pytest.raises(CheckpointError, match="model.safetensors"):
        text_source(tmp_path)


def test_config_with_zero_kv_heads_is_a_checkpoint_error_naming_config_json(tmp_path):
    (tmp_path / "config.json").write_bytes((HERE / "config_num_kv_heads_zero.json").read_bytes())
    with pytest.raises(ValueError, match="num_kv_heads is 0"):
        Gemma3Config.from_hf_dict(json.loads((tmp_path / "config.json").read_text()))
    header = json.dumps({"model.embed_tokens.weight": {
        "dtype": "F32", "shape": [1, 1], "data_offsets": [0, 4]}}).encode()
    (tmp_path / "model.safetensors").write_bytes(
        len(header).to_bytes(8, "little") + header + bytes(4))
    with pytest.raises(CheckpointError, match=r"config\.json: .*num_kv_heads is 0"):
        text_source(tmp_path)


@pytest.mark.parametrize("name,match", [("mm_config_eoi_token_object.json", "eoi_token_index"),
                                        ("mm_config_sliding_window_pattern_zero.json",
                                         "sliding_window_pattern is 0")])
def test_config_finding_is_a_value_error(name, match):
    raw = json.loads((HERE / name).read_text())
    with pytest.raises(ValueError, match=match):
        MultimodalConfig.from_hf_dict(raw)


def test_config_claiming_1e12_layers_is_refused_before_building_its_pattern():
    """Found beside the one above: the layer pattern is a tuple of num_hidden_layers entries."""
    with pytest.raises(ValueError, match="num_hidden_layers is 1000000000000"):
        Gemma3Config.from_hf_dict({"num_hidden_layers": 10**12})


@pytest.mark.parametrize("name,suffix", [("gguf_invalid_byte_piece.gguf.bin", ".gguf"),
                                         ("tokenizer_piece_not_utf8.model", ".model")])
def test_tokenizer_finding_is_a_value_error(name, suffix, tmp_path):
    path = tmp_path / f"tokenizer{suffix}"
    path.write_bytes((HERE / name).read_bytes())
    with pytest.raises(ValueError):
        Tokenizer.from_checkpoint(path)
