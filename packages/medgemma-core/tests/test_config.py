"""Presets: parameter counts from shapes alone equal the real models' (transformers on meta)."""

from __future__ import annotations

import pytest
import torch
import transformers

from medgemma_core.config import GLOBAL, LOCAL, Gemma3Config
from medgemma_core.transformer import param_count


def _reference_count(cfg: Gemma3Config) -> int:
    hf_cfg = transformers.Gemma3TextConfig(
        **{k: v for k, v in cfg.to_hf_dict().items() if k not in ("architectures", "model_type")})
    with torch.device("meta"):
        model = transformers.Gemma3ForCausalLM(hf_cfg)
    return sum(p.numel() for p in model.parameters())  # tied lm_head counted once


@pytest.mark.parametrize("name", ["270m", "1b", "4b", "12b", "27b"])
def test_preset_parameter_counts_match_transformers(name):
    cfg = Gemma3Config.preset(name)
    assert param_count(cfg) == _reference_count(cfg)


def test_published_sizes():
    # Published sizes of the text decoders (embedding included): 268M, 1.0B, 3.88B, 27.0B.
    assert round(param_count(Gemma3Config.gemma3_270m()) / 1e6) == 268
    assert round(param_count(Gemma3Config.gemma3_4b()) / 1e9, 2) == 3.88
    assert round(param_count(Gemma3Config.gemma3_27b()) / 1e9, 1) == 27.0


def test_layer_pattern_and_hf_round_trip():
    cfg = Gemma3Config.gemma3_4b()
    assert cfg.layer_types[:6] == (LOCAL,) * 5 + (GLOBAL,)
    assert sum(t == GLOBAL for t in cfg.layer_types) == 5  # 34 layers: 5, 11, 17, 23, 29
    assert Gemma3Config.from_hf_dict(cfg.to_hf_dict()) == cfg


def test_old_style_hf_config():
    old = {"num_hidden_layers": 12, "rope_theta": 1e6, "rope_local_base_freq": 1e4,
           "rope_scaling": {"rope_type": "linear", "factor": 8.0}, "sliding_window": 1024,
           "sliding_window_pattern": 6, "hidden_size": 64, "num_attention_heads": 4,
           "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 128,
           "vocab_size": 300, "query_pre_attn_scalar": 168}
    cfg = Gemma3Config.from_hf_dict({"text_config": old, "model_type": "gemma3"})
    assert cfg.rope_global_scaling == 8.0 and cfg.rope_local_theta == 1e4
    assert cfg.layer_types[5] == GLOBAL and cfg.layer_types[11] == GLOBAL
    assert cfg.query_pre_attn_scalar == 168
