"""MedSigLIP in JAX / Flax NNX: the two-tower SigLIP encoder of MedGemma.

The narrow interface for MedGemma's image path (see README.md):

* :class:`SiglipVisionConfig` (frozen; ``from_hf_dict``, presets ``so400m_patch14_448()``,
  ``so400m_patch14_896()``, ``tiny()``),
* :class:`VisionTower` (``[B, H, W, 3]`` normalized images -> ``[B, N, D]`` patch tokens),
* :func:`load_vision_tower_from_tensors` (HF tensor names, every Gemma 3 / SigLIP prefix),
* :func:`preprocess` (any image -> ``[B, S, S, 3]`` in [-1, 1]).
"""

from medsiglip.api import MedSigLIP
from medsiglip.checkpoints.convert import (
    VISION_PREFIXES,
    abstract_module,
    find_vision_prefix,
    load_siglip_from_tensors,
    load_text_tower_from_tensors,
    load_vision_tower_from_tensors,
    param_count,
)
from medsiglip.checkpoints.hf import CheckpointError, load_siglip, load_vision_tower
from medsiglip.checkpoints.orbax_io import restore_checkpoint, save_checkpoint
from medsiglip.config import SiglipConfig, SiglipTextConfig, SiglipVisionConfig
from medsiglip.loss import chunked_sigmoid_loss, sigmoid_loss
from medsiglip.model import SiglipModel, SiglipOutput, l2_normalize
from medsiglip.posemb import resize_position_embedding
from medsiglip.preprocess import load_image, preprocess
from medsiglip.probe import LinearProbe, fit_linear_probe, roc_auc
from medsiglip.text import TextTower
from medsiglip.tokenizer import SiglipTokenizer, canonicalize
from medsiglip.vision import VisionTower

__version__ = "0.1.0"

__all__ = [
    "VISION_PREFIXES",
    "CheckpointError",
    "LinearProbe",
    "MedSigLIP",
    "SiglipConfig",
    "SiglipModel",
    "SiglipOutput",
    "SiglipTextConfig",
    "SiglipTokenizer",
    "SiglipVisionConfig",
    "TextTower",
    "VisionTower",
    "abstract_module",
    "canonicalize",
    "chunked_sigmoid_loss",
    "find_vision_prefix",
    "fit_linear_probe",
    "l2_normalize",
    "load_image",
    "load_siglip",
    "load_siglip_from_tensors",
    "load_text_tower_from_tensors",
    "load_vision_tower",
    "load_vision_tower_from_tensors",
    "param_count",
    "preprocess",
    "resize_position_embedding",
    "restore_checkpoint",
    "roc_auc",
    "save_checkpoint",
    "sigmoid_loss",
]
