"""MedGemma core: the Gemma 3 decoder in JAX / Flax NNX, its tokenizer and fast generation."""

import os as _os
import sys as _sys


def _cpu_scheduler_flag() -> None:
    """Turn off XLA's concurrency-optimized CPU scheduler unless XLA_FLAGS already says.

    That scheduler starts every independent operation as early as it can. On the CPU, XLA
    computes bf16 products in float32 by converting the weights, and it would then convert
    every weight of the decode loop up front: a bf16 4B model needs 16 GB more to decode.
    The list scheduler converts each weight just before its product (with
    ``layers.pin_to``). Decode speed is unchanged (benchmarks/decode.py). Takes effect when
    medgemma_core is imported before JAX starts its CPU backend; MEDGEMMA_XLA_FLAGS=0 opts out.
    """
    global XLA_CPU_FLAG_LATE
    name = "--xla_cpu_enable_concurrency_optimized_scheduler"
    flags = _os.environ.get("XLA_FLAGS", "")
    if _os.environ.get("MEDGEMMA_XLA_FLAGS") == "0" or name in flags:
        return
    _os.environ["XLA_FLAGS"] = f"{flags} {name}=false".strip()
    if "jax" in _sys.modules:
        from jax._src import xla_bridge

        XLA_CPU_FLAG_LATE = xla_bridge.backends_are_initialized()


#: True when JAX had started its backends before this import, so the flag came too late.
XLA_CPU_FLAG_LATE = False


_cpu_scheduler_flag()

from . import lora, sharding  # noqa: E402
from .api import Completion, MedGemma, default_checkpoint, load  # noqa: E402
from .checkpoints import CheckpointError, load_decoder, save_decoder  # noqa: E402
from .checkpoints.export import save_hf  # noqa: E402
from .checkpoints.multimodal import load_multimodal, save_multimodal  # noqa: E402
from .config import Gemma3Config  # noqa: E402
from .generate import DecodeState, Engine, Generation, enable_compilation_cache  # noqa: E402
from .multimodal import Gemma3Multimodal, MultimodalConfig  # noqa: E402
from .processor import Processed, Processor, ProcessorConfig, TrainingBatch  # noqa: E402
from .prompts import PromptEncoder, Prompts  # noqa: E402
from .sampling import Sampling  # noqa: E402
from .tokenizer import Tokenizer  # noqa: E402
from .training import TrainBatch, forward_hidden, naive_next_token_loss, next_token_loss  # noqa: E402
from .transformer import Gemma3, KVCache  # noqa: E402

__version__ = "0.2.0"
__all__ = [
    # loading and generation
    "Completion", "MedGemma", "Sampling", "default_checkpoint", "load",
    # the models and their configs
    "Gemma3", "Gemma3Config", "Gemma3Multimodal", "KVCache", "MultimodalConfig",
    # text and images in
    "Processed", "Processor", "ProcessorConfig", "Tokenizer", "TrainingBatch",
    # the engine under MedGemma
    "DecodeState", "Engine", "Generation", "PromptEncoder", "Prompts", "enable_compilation_cache",
    # checkpoints (Hugging Face folders, GGUF, Orbax)
    "CheckpointError", "load_decoder", "load_multimodal", "save_decoder", "save_hf", "save_multimodal",
    # training (medgemma_core.training)
    "TrainBatch", "forward_hidden", "naive_next_token_loss", "next_token_loss",
    # LoRA adapters and PEFT export; logical-axis sharding and memory reports (modules)
    "lora", "sharding",
]
