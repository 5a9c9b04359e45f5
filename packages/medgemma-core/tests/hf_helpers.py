"""Kept for test_checkpoints.py and test_gguf.py: the builders live in medgemma_core.testing."""

from medgemma_core.testing import save_tiny_causal_lm, tiny_hf_config

__all__ = ["save_tiny_causal_lm", "tiny_hf_config"]
