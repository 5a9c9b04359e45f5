"""MedGemma core: the Gemma 3 decoder in JAX / Flax NNX."""

__version__ = "0.1.0"
