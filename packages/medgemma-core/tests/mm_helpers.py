"""Tiny random transformers Gemma3ForConditionalGeneration checkpoints and their processor
(the reference implementation), built on disk by the tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch
import transformers

from medgemma_core.config import Gemma3Config

IMAGE_SIZE, PATCH, MM_TOKENS = 112, 7, 16  # 16x16 patches, pooled 4x4 -> 4x4 = 16 soft tokens


def tiny_text_config() -> Gemma3Config:
    # the real vocabulary size; window 8 < an image block of 16, so the window cuts image blocks
    return Gemma3Config.tiny(vocab_size=262_208, hidden_size=32, intermediate_size=64,
                             head_dim=8, query_pre_attn_scalar=8)


def tiny_hf_mm_config() -> transformers.Gemma3Config:
    text = {k: v for k, v in tiny_text_config().to_hf_dict().items()
            if k not in ("architectures", "model_type")}
    vision = transformers.SiglipVisionConfig(
        hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=3,
        image_size=IMAGE_SIZE, patch_size=PATCH, vision_use_head=False)
    return transformers.Gemma3Config(text_config=transformers.Gemma3TextConfig(**text),
                                     vision_config=vision, mm_tokens_per_image=MM_TOKENS)


def save_tiny_mm(folder: Path, tokenizer_folder: Path | None = None, seed: int = 0,
                 dtype=torch.float32, **save_kw) -> transformers.Gemma3ForConditionalGeneration:
    """A random Gemma3ForConditionalGeneration with non-trivial norm weights, saved to ``folder``
    (with the tokenizer files of ``tokenizer_folder``)."""
    torch.manual_seed(seed)
    model = transformers.Gemma3ForConditionalGeneration(tiny_hf_mm_config()).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and "layer_norm" not in name and "layernorm" not in name:
                p.normal_(0.0, 0.3)  # zero-init (1 + w) norms would hide a mistake
            elif "mm_input_projection" in name:
                p.normal_(0.0, 0.2)
            elif "layer_norm" in name or "layernorm" in name:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.1)
    model = model.to(dtype)
    model.save_pretrained(folder, **save_kw)
    if tokenizer_folder is not None:
        for f in Path(tokenizer_folder).iterdir():
            if f.name.startswith(("tokenizer", "special_tokens")):
                shutil.copy(f, Path(folder) / f.name)
    return model


def reference_processor(tokenizer, **image_kw):
    """transformers' Gemma3Processor (PIL backend) for the tiny image size."""
    from transformers import Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    images = Gemma3ImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, **image_kw)
    return Gemma3Processor(image_processor=images, tokenizer=tokenizer, image_seq_length=MM_TOKENS)


def random_images(seed: int, shapes) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for shape in shapes:  # smooth-ish content so resizing matters
        base = rng.integers(0, 256, size=(-(-shape[0] // 8), -(-shape[1] // 8), 3))
        img = np.kron(base, np.ones((8, 8, 1)))[:shape[0], :shape[1]]
        img = img + rng.integers(-20, 21, size=img.shape)
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return out
