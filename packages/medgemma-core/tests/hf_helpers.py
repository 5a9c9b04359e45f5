"""Build tiny random transformers Gemma 3 checkpoints on disk (the reference implementation)."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

from medgemma_core.config import Gemma3Config


def tiny_hf_config(cfg: Gemma3Config) -> transformers.Gemma3TextConfig:
    return transformers.Gemma3TextConfig(**{k: v for k, v in cfg.to_hf_dict().items()
                                            if k not in ("architectures", "model_type")})


def save_tiny_causal_lm(folder: Path, cfg: Gemma3Config, seed: int = 0,
                        dtype=torch.float32, **save_kw) -> transformers.Gemma3ForCausalLM:
    """A random Gemma3ForCausalLM with non-trivial norm weights, saved to ``folder``."""
    torch.manual_seed(seed)
    model = transformers.Gemma3ForCausalLM(tiny_hf_config(cfg)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # zero-init norms would hide a (1 + w) mistake
                p.normal_(0.0, 0.3)
    model = model.to(dtype)
    model.save_pretrained(folder, **save_kw)
    return model
