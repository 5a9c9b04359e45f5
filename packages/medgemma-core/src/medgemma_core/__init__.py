"""MedGemma core: the Gemma 3 decoder in JAX / Flax NNX, its tokenizer and fast generation."""

from .api import Completion, MedGemma, default_checkpoint, load
from .config import Gemma3Config
from .sampling import Sampling

__version__ = "0.1.0"
__all__ = ["Completion", "Gemma3Config", "MedGemma", "Sampling", "default_checkpoint", "load"]
