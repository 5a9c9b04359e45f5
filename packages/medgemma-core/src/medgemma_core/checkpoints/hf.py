"""Hugging Face folders (``config.json`` + ``model*.safetensors``, sharded with an index).

The reader is medsiglip's (:class:`medsiglip.weights.SafetensorsSource`: one tensor at a time,
no memory map); these names are kept here for the imports that use them.
"""

from medsiglip.weights import SafetensorsSource
from medsiglip.weights import read_hf_config as read_config

__all__ = ["SafetensorsSource", "read_config"]
