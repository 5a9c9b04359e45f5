"""MedSigLIP in JAX / Flax NNX: the two-tower SigLIP encoder of MedGemma.

The names below are medsiglip's stable interface (README.md, "The stable interface"); other
modules' names may change within a minor version. The narrow interface for MedGemma's image
path:

* :class:`SiglipVisionConfig` (frozen; ``from_hf_dict``, presets ``so400m_patch14_448()``,
  ``so400m_patch14_896()``, ``tiny()``),
* :class:`VisionTower` (``[B, H, W, 3]`` normalized images -> ``[B, N, D]`` patch tokens); its
  parameter tree is frozen (README.md, "The vision tower's parameters"),
* :func:`load_vision_tower_from_tensors` (HF tensor names, every Gemma 3 / SigLIP prefix),
* :func:`preprocess` (any image -> ``[B, S, S, 3]`` in [-1, 1]),
* :mod:`medsiglip.weights`: tensor sources, ``fill``, abstract modules, Orbax folders,
* :mod:`medsiglip.sharding`, :mod:`medsiglip.lora` and :mod:`medsiglip.remat`: the logical-axis
  rules table, the LoRA mechanism and the per-block remat / scan that medgemma-core shares.
"""

from medsiglip import lora, remat, sharding, weights
from medsiglip.api import MedSigLIP
from medsiglip.checkpoints.convert import load_vision_tower_from_tensors
from medsiglip.checkpoints.export import save_hf
from medsiglip.checkpoints.hf import load_siglip, load_vision_tower
from medsiglip.checkpoints.orbax_io import restore_checkpoint, save_checkpoint
from medsiglip.config import SiglipConfig, SiglipTextConfig, SiglipVisionConfig
from medsiglip.loss import chunked_sigmoid_loss, sigmoid_loss
from medsiglip.model import SiglipModel
from medsiglip.posemb import resize_position_embedding
from medsiglip.preprocess import load_image, preprocess
from medsiglip.probe import LinearProbe, fit_linear_probe
from medsiglip.tokenizer import SiglipTokenizer
from medsiglip.vision import VisionTower
from medsiglip.weights import CheckpointError

__version__ = "0.2.0"

__all__ = [
    "CheckpointError",
    "LinearProbe",
    "MedSigLIP",
    "SiglipConfig",
    "SiglipModel",
    "SiglipTextConfig",
    "SiglipTokenizer",
    "SiglipVisionConfig",
    "VisionTower",
    "chunked_sigmoid_loss",
    "fit_linear_probe",
    "load_image",
    "load_siglip",
    "load_vision_tower",
    "load_vision_tower_from_tensors",
    "lora",
    "preprocess",
    "remat",
    "resize_position_embedding",
    "restore_checkpoint",
    "save_checkpoint",
    "save_hf",
    "sharding",
    "sigmoid_loss",
    "weights",
]
