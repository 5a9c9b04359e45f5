"""Frozen configuration dataclasses for the SigLIP towers, with named presets.

``from_hf_dict`` reads the ``config.json`` dictionaries that Hugging Face ``transformers``
writes (``SiglipVisionConfig``, ``SiglipTextConfig``, ``SiglipConfig``, and the
``vision_config`` entry of a Gemma 3 multimodal checkpoint). Keys missing from such a
dictionary take the ``transformers`` defaults, so a config reads the same way here and there.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

# Activation names as transformers spells them; all tanh-approximated except "gelu".
_TANH_GELU = ("gelu_pytorch_tanh", "gelu_new", "gelu_fast", "gelu_python_tanh")
_EXACT_GELU = ("gelu",)


def _check_act(name: str) -> str:
    if name not in _TANH_GELU + _EXACT_GELU:
        raise ValueError(
            f"unsupported hidden_act {name!r}: use one of {', '.join(_TANH_GELU + _EXACT_GELU)}"
        )
    return name


def _reads_hf(parse: Callable[..., Any]) -> Callable[..., Any]:
    """A ``from_hf_dict``: a config that is no mapping, or holds a value of the wrong type (a
    list for a number), is a ``ValueError`` like any other invalid config."""

    @functools.wraps(parse)
    def wrapper(cls: type, d: Any) -> Any:
        if not isinstance(d, Mapping):
            raise ValueError(f"{cls.__name__}: the config is a {type(d).__name__}, not an object")
        try:
            return parse(cls, d)
        except (TypeError, AttributeError, OverflowError) as exc:
            raise ValueError(f"{cls.__name__}: a config value has the wrong type ({exc})") \
                from None

    return wrapper


def _positive(config: Any, *names: str) -> None:
    for name in names:
        if getattr(config, name) < 1:
            raise ValueError(f"{name} is {getattr(config, name)}; it must be at least 1")


def _square(value: Any, key: str) -> int:
    """HF allows ``image_size``/``patch_size`` as an int or a pair; only squares are supported."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"{key}={value!r}: only square sizes are supported")
        return int(value[0])
    return int(value)


@dataclass(frozen=True)
class SiglipVisionConfig:
    """The vision tower: patch embedding, ``num_layers`` pre-LN blocks, post-LN, optional MAP head.

    Images are ``[B, image_size, image_size, num_channels]``; the tower yields
    ``num_patches = (image_size // patch_size) ** 2`` tokens of width ``hidden_size``.
    """

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_layers: int = 27
    num_heads: int = 16
    patch_size: int = 14
    image_size: int = 448
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    use_head: bool = True
    hidden_act: str = "gelu_pytorch_tanh"

    def __post_init__(self) -> None:
        _check_act(self.hidden_act)
        _positive(self, "hidden_size", "intermediate_size", "num_layers", "num_heads",
                  "patch_size", "image_size", "num_channels")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}: "
                "pick an image_size that is"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid_size(self) -> int:
        """Patches per side: ``image_size // patch_size``."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    def replace(self, **changes: Any) -> SiglipVisionConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    @_reads_hf
    def from_hf_dict(cls, d: Mapping[str, Any]) -> SiglipVisionConfig:
        """Read a HF ``SiglipVisionConfig`` dict (or a Gemma 3 ``vision_config``)."""
        return cls(
            hidden_size=int(d.get("hidden_size", 768)),
            intermediate_size=int(d.get("intermediate_size", 3072)),
            num_layers=int(d.get("num_hidden_layers", 12)),
            num_heads=int(d.get("num_attention_heads", 12)),
            patch_size=_square(d.get("patch_size", 16), "patch_size"),
            image_size=_square(d.get("image_size", 224), "image_size"),
            num_channels=int(d.get("num_channels", 3)),
            layer_norm_eps=float(d.get("layer_norm_eps", 1e-6)),
            use_head=bool(d.get("vision_use_head", True)),
            hidden_act=str(d.get("hidden_act", "gelu_pytorch_tanh")),
        )

    def to_hf_dict(self) -> dict[str, Any]:
        return {
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "patch_size": self.patch_size,
            "image_size": self.image_size,
            "num_channels": self.num_channels,
            "layer_norm_eps": self.layer_norm_eps,
            "vision_use_head": self.use_head,
            "hidden_act": self.hidden_act,
        }

    @classmethod
    def so400m_patch14_448(cls) -> SiglipVisionConfig:
        """MedSigLIP-448's vision tower: 32x32 patches, with the MAP pooling head."""
        return cls()

    @classmethod
    def so400m_patch14_896(cls) -> SiglipVisionConfig:
        """MedGemma's vision tower: 64x64 = 4096 patch tokens, no pooling head."""
        return cls(image_size=896, use_head=False)

    @classmethod
    def tiny(cls, *, use_head: bool = True, image_size: int = 32) -> SiglipVisionConfig:
        """A few-thousand-parameter tower for unit tests."""
        return cls(
            hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, patch_size=8,
            image_size=image_size, use_head=use_head,
        )


@dataclass(frozen=True)
class SiglipTextConfig:
    """The text tower: token + learned position embeddings (``max_positions``), unmasked
    pre-LN blocks, final LN, last-position pooling, linear head to ``projection_size``."""

    vocab_size: int = 32000
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_layers: int = 27
    num_heads: int = 16
    max_positions: int = 64
    projection_size: int = 1152
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"

    def __post_init__(self) -> None:
        _check_act(self.hidden_act)
        _positive(self, "vocab_size", "hidden_size", "intermediate_size", "num_layers",
                  "num_heads", "max_positions", "projection_size")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def replace(self, **changes: Any) -> SiglipTextConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    @_reads_hf
    def from_hf_dict(cls, d: Mapping[str, Any]) -> SiglipTextConfig:
        hidden = int(d.get("hidden_size", 768))
        proj = d.get("projection_size")
        return cls(
            vocab_size=int(d.get("vocab_size", 32000)),
            hidden_size=hidden,
            intermediate_size=int(d.get("intermediate_size", 3072)),
            num_layers=int(d.get("num_hidden_layers", 12)),
            num_heads=int(d.get("num_attention_heads", 12)),
            max_positions=int(d.get("max_position_embeddings", 64)),
            projection_size=hidden if proj is None else int(proj),
            layer_norm_eps=float(d.get("layer_norm_eps", 1e-6)),
            hidden_act=str(d.get("hidden_act", "gelu_pytorch_tanh")),
        )

    def to_hf_dict(self) -> dict[str, Any]:
        return {
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "max_position_embeddings": self.max_positions,
            "projection_size": self.projection_size,
            "layer_norm_eps": self.layer_norm_eps,
            "hidden_act": self.hidden_act,
        }

    @classmethod
    def so400m(cls) -> SiglipTextConfig:
        return cls()

    @classmethod
    def tiny(cls, *, vocab_size: int = 128) -> SiglipTextConfig:
        return cls(
            vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_layers=2,
            num_heads=4, max_positions=16, projection_size=32,
        )


@dataclass(frozen=True)
class SiglipConfig:
    """Both towers. ``logit_scale``/``logit_bias`` are learned scalars of the model."""

    vision: SiglipVisionConfig = field(default_factory=SiglipVisionConfig)
    text: SiglipTextConfig = field(default_factory=SiglipTextConfig)

    def __post_init__(self) -> None:
        if not self.vision.use_head:
            raise ValueError("a two-tower SigLIP needs the vision MAP head: set use_head=True")
        if self.vision.hidden_size != self.text.projection_size:
            raise ValueError(
                f"vision hidden_size {self.vision.hidden_size} != text projection_size "
                f"{self.text.projection_size}: the two embeddings must have the same width"
            )

    def replace(self, **changes: Any) -> SiglipConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    @_reads_hf
    def from_hf_dict(cls, d: Mapping[str, Any]) -> SiglipConfig:
        return cls(
            vision=SiglipVisionConfig.from_hf_dict(d.get("vision_config") or {}),
            text=SiglipTextConfig.from_hf_dict(d.get("text_config") or {}),
        )

    def to_hf_dict(self) -> dict[str, Any]:
        return {
            "model_type": "siglip",
            "vision_config": self.vision.to_hf_dict(),
            "text_config": self.text.to_hf_dict(),
        }

    @classmethod
    def so400m_patch14_448(cls) -> SiglipConfig:
        """MedSigLIP-448: so400m/14 vision tower at 448 with MAP head + so400m text tower."""
        return cls(SiglipVisionConfig.so400m_patch14_448(), SiglipTextConfig.so400m())

    @classmethod
    def tiny(cls, *, vocab_size: int = 128, image_size: int = 32) -> SiglipConfig:
        return cls(
            SiglipVisionConfig.tiny(image_size=image_size),
            SiglipTextConfig.tiny(vocab_size=vocab_size),
        )
