"""Gemma 3 text-decoder configuration: frozen dataclass, named presets, Hugging Face parsing."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

LOCAL = "sliding_attention"
GLOBAL = "full_attention"
#: The most layers a config.json may claim (Gemma 3 27B has 62).
MAX_LAYERS = 10_000


def _pattern(num_layers: int, every: int = 6) -> tuple[str, ...]:
    """Layer i is global when (i + 1) % every == 0, local otherwise."""
    return tuple(GLOBAL if (i + 1) % every == 0 else LOCAL for i in range(num_layers))


@dataclasses.dataclass(frozen=True)
class Gemma3Config:
    """Shape and numerics of a Gemma 3 decoder (REFERENCE.md section 2).

    ``layer_types[i]`` is ``"sliding_attention"`` (local, window ``sliding_window``) or
    ``"full_attention"`` (global). Global RoPE frequencies are divided by ``rope_global_scaling``
    (linear scaling); local layers use ``rope_local_theta`` unscaled.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    query_pre_attn_scalar: float
    sliding_window: int
    layer_types: tuple[str, ...]
    rope_local_theta: float = 10_000.0
    rope_global_theta: float = 1_000_000.0
    rope_global_scaling: float = 1.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 131_072
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None
    pad_id: int = 0
    eos_id: int = 1
    bos_id: int = 2

    def __post_init__(self) -> None:
        if len(self.layer_types) != self.num_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers"
            )
        bad = set(self.layer_types) - {LOCAL, GLOBAL}
        if bad:
            raise ValueError(f"unknown layer types {sorted(bad)}; expected {LOCAL!r} or {GLOBAL!r}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_heads",
                     "num_kv_heads", "head_dim", "sliding_window", "max_position_embeddings"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} is {getattr(self, name)}; it must be at least 1")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} not a multiple of {self.num_kv_heads}")

    # ---- presets -------------------------------------------------------------------------
    @classmethod
    def _preset(cls, **kw: Any) -> Gemma3Config:
        kw.setdefault("layer_types", _pattern(kw["num_layers"]))
        return cls(**kw)

    @classmethod
    def gemma3_270m(cls) -> Gemma3Config:
        return cls._preset(vocab_size=262_144, hidden_size=640, intermediate_size=2048,
                           num_layers=18, num_heads=4, num_kv_heads=1, head_dim=256,
                           query_pre_attn_scalar=256, sliding_window=512,
                           max_position_embeddings=32_768)

    @classmethod
    def gemma3_1b(cls) -> Gemma3Config:
        return cls._preset(vocab_size=262_144, hidden_size=1152, intermediate_size=6912,
                           num_layers=26, num_heads=4, num_kv_heads=1, head_dim=256,
                           query_pre_attn_scalar=256, sliding_window=512,
                           max_position_embeddings=32_768)

    @classmethod
    def gemma3_4b(cls) -> Gemma3Config:
        return cls._preset(vocab_size=262_208, hidden_size=2560, intermediate_size=10_240,
                           num_layers=34, num_heads=8, num_kv_heads=4, head_dim=256,
                           query_pre_attn_scalar=256, sliding_window=1024,
                           rope_global_scaling=8.0)

    @classmethod
    def gemma3_12b(cls) -> Gemma3Config:
        return cls._preset(vocab_size=262_208, hidden_size=3840, intermediate_size=15_360,
                           num_layers=48, num_heads=16, num_kv_heads=8, head_dim=256,
                           query_pre_attn_scalar=256, sliding_window=1024,
                           rope_global_scaling=8.0)

    @classmethod
    def gemma3_27b(cls) -> Gemma3Config:
        return cls._preset(vocab_size=262_208, hidden_size=5376, intermediate_size=21_504,
                           num_layers=62, num_heads=32, num_kv_heads=16, head_dim=128,
                           query_pre_attn_scalar=168, sliding_window=1024,
                           rope_global_scaling=8.0)

    @classmethod
    def tiny(cls, **overrides: Any) -> Gemma3Config:
        """A small config for unit tests: 7 layers (5 local, 1 global, 1 local), window 8."""
        kw: dict[str, Any] = dict(vocab_size=512, hidden_size=64, intermediate_size=128,
                                  num_layers=7, num_heads=4, num_kv_heads=2, head_dim=16,
                                  query_pre_attn_scalar=16, sliding_window=8,
                                  rope_global_scaling=8.0, max_position_embeddings=4096)
        kw.update(overrides)
        return cls._preset(**kw)

    # preset name -> the classmethod that builds it; PRESETS lists the names
    _PRESET_METHODS = {"270m": "gemma3_270m", "1b": "gemma3_1b", "4b": "gemma3_4b",
                       "12b": "gemma3_12b", "27b": "gemma3_27b", "tiny": "tiny"}
    PRESETS = tuple(_PRESET_METHODS)

    @classmethod
    def preset(cls, name: str) -> Gemma3Config:
        if name not in cls._PRESET_METHODS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(cls.PRESETS)}")
        return getattr(cls, cls._PRESET_METHODS[name])()

    # ---- Hugging Face ------------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, cfg: Mapping[str, Any]) -> Gemma3Config:
        """Parse a Hugging Face ``config.json`` (Gemma3ForCausalLM, or the ``text_config`` of
        Gemma3ForConditionalGeneration), in both the old (``rope_theta``, ``rope_scaling``,
        ``rope_local_base_freq``) and the transformers 5 (``rope_parameters``) spellings.
        An invalid config, or a value of the wrong type (a list for a number), is a
        ``ValueError``."""
        if not isinstance(cfg, Mapping):
            raise ValueError(f"Gemma3Config: the config is a {type(cfg).__name__}, not an object")
        try:
            return cls._from_hf_dict(cfg)
        except (TypeError, AttributeError, OverflowError) as exc:
            raise ValueError(f"Gemma3Config: a config value has the wrong type ({exc})") from None

    @classmethod
    def _from_hf_dict(cls, cfg: Mapping[str, Any]) -> Gemma3Config:
        if "text_config" in cfg:
            cfg = cfg["text_config"] or {}
        n = int(cfg.get("num_hidden_layers", 26))
        if not 1 <= n <= MAX_LAYERS:  # the layer pattern below is built from this claim
            raise ValueError(f"num_hidden_layers is {n}; it must be in 1..{MAX_LAYERS}")
        layer_types = cfg.get("layer_types")
        if not layer_types:
            every = int(cfg.get("sliding_window_pattern", 6))
            if every < 1:
                raise ValueError(f"sliding_window_pattern is {every}; it must be at least 1")
            layer_types = _pattern(n, every)
        rope = cfg.get("rope_parameters") or {}
        g = dict(rope.get(GLOBAL) or {})
        loc = dict(rope.get(LOCAL) or {})
        scaling = cfg.get("rope_scaling") or {}
        if scaling and not g.get("rope_type"):
            g.update(scaling)
        factor = 1.0
        rope_type = g.get("rope_type", g.get("type", "default"))
        if rope_type == "linear":
            factor = float(g.get("factor", 1.0))
        elif rope_type not in ("default", None):
            raise ValueError(f"unsupported RoPE type {rope_type!r} for global layers")
        vocab = int(cfg.get("vocab_size", 262_208))
        return cls(
            vocab_size=vocab,
            hidden_size=int(cfg.get("hidden_size", 2304)),
            intermediate_size=int(cfg.get("intermediate_size", 9216)),
            num_layers=n,
            num_heads=int(cfg.get("num_attention_heads", 8)),
            num_kv_heads=int(cfg.get("num_key_value_heads", 4)),
            head_dim=int(cfg.get("head_dim", 256)),
            query_pre_attn_scalar=float(cfg.get("query_pre_attn_scalar", 256)),
            sliding_window=int(cfg.get("sliding_window") or 4096),
            layer_types=tuple(layer_types),
            rope_local_theta=float(loc.get("rope_theta", cfg.get("rope_local_base_freq", 1e4))),
            rope_global_theta=float(g.get("rope_theta", cfg.get("rope_theta", 1e6))),
            rope_global_scaling=factor,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 131_072)),
            final_logit_softcapping=cfg.get("final_logit_softcapping"),
            attn_logit_softcapping=cfg.get("attn_logit_softcapping"),
            pad_id=_first(cfg.get("pad_token_id"), 0),
            eos_id=_first(cfg.get("eos_token_id"), 1),
            bos_id=_first(cfg.get("bos_token_id"), 2),
        )

    @classmethod
    def from_json(cls, path: str | Path) -> Gemma3Config:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: cannot read the model config ({exc})") from None
        return cls.from_hf_dict(data)

    def to_hf_dict(self) -> dict[str, Any]:
        """A ``config.json`` for Gemma3ForCausalLM (transformers 5 spelling)."""
        g: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_global_theta}
        if self.rope_global_scaling != 1.0:
            g = {"rope_type": "linear", "factor": self.rope_global_scaling,
                 "rope_theta": self.rope_global_theta}
        return {
            "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim, "query_pre_attn_scalar": self.query_pre_attn_scalar,
            "sliding_window": self.sliding_window, "layer_types": list(self.layer_types),
            "rope_parameters": {GLOBAL: g, LOCAL: {"rope_type": "default",
                                                   "rope_theta": self.rope_local_theta}},
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True,
            "final_logit_softcapping": self.final_logit_softcapping,
            "attn_logit_softcapping": self.attn_logit_softcapping,
            "pad_token_id": self.pad_id, "eos_token_id": self.eos_id, "bos_token_id": self.bos_id,
        }

    def is_local(self, layer: int) -> bool:
        return self.layer_types[layer] == LOCAL


def _first(value: Any, default: int) -> int:
    if value is None:
        return default
    if isinstance(value, list | tuple):
        return int(value[0]) if value else default
    return int(value)
