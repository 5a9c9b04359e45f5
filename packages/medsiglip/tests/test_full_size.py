"""Slow: the real-size so400m/14 vision tower (random weights) against transformers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from conftest import jit_call, nchw, pixels

import medsiglip
from medsiglip import SiglipVisionConfig


@pytest.mark.slow
def test_so400m_448_vision_tower_parity():
    cfg = SiglipVisionConfig.so400m_patch14_448()
    torch.manual_seed(0)
    hf = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**cfg.to_hf_dict()))
    hf = hf.eval()
    tower = medsiglip.load_vision_tower_from_tensors(
        cfg, {k: v.numpy() for k, v in hf.state_dict().items()})
    x = pixels(1, cfg.image_size)
    with torch.no_grad():
        ref = hf(pixel_values=nchw(x))
    tokens = jit_call(tower, "__call__", x)
    np.testing.assert_allclose(tokens, ref.last_hidden_state.numpy(), atol=1e-3)
    np.testing.assert_allclose(jit_call(tower, "pool", tokens), ref.pooler_output.numpy(),
                               atol=1e-3)
