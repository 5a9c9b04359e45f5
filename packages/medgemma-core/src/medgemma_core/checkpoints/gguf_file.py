"""GGUF files of the ``gemma3`` architecture (llama.cpp): config, tensors, dequantization.

llama.cpp stores every ``*norm.weight`` plus one and names tensors its own way; this source
presents the file under Hugging Face names with the +1 undone, dequantizing (with the ``gguf``
package) one tensor at a time from the memory-mapped file.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from medsiglip.weights import CheckpointError

from ..config import Gemma3Config, _pattern
from .gguf_index import GGUFIndex

_LAYER = {
    "attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL = {"token_embd.weight": "embed_tokens.weight", "output_norm.weight": "norm.weight"}


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL:
        return _GLOBAL[gguf_name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", gguf_name)
    if m and m.group(2) in _LAYER:
        return f"layers.{m.group(1)}.{_LAYER[m.group(2)]}.weight"
    return None


class GGUFSource:
    """Tensors of a gemma3 GGUF file under Hugging Face names (a
    :class:`medsiglip.weights.TensorSource`)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.index = GGUFIndex(self.path)
        except (OSError, ValueError) as exc:
            raise CheckpointError(
                f"{self.path}: not a readable GGUF file ({exc}); it is truncated or corrupt, "
                f"re-download it") from None
        arch = self.field("general.architecture")
        if arch != "gemma3":
            raise CheckpointError(
                f"{self.path}: GGUF architecture is {arch!r}, not 'gemma3'; pass a Gemma 3 GGUF")
        self._tensors = {}
        for info in self.index.tensors.values():
            name = _hf_name(info.name)
            if name is not None:
                self._tensors[name] = info

    def field(self, key: str, default: Any = None) -> Any:
        return self.index.metadata.get(key, default)

    def names(self) -> list[str]:
        return list(self._tensors)

    def where(self, name: str) -> str:
        info = self._tensors.get(name)
        return f"{self.path} [{info.name}]" if info is not None else str(self.path)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._tensors[name].shape  # numpy order: [out, in]

    def is_q8_0(self, name: str) -> bool:
        """Whether ``name`` is stored as Q8_0 blocks (loaded natively by ``quantize="int8"``)."""
        from gguf.constants import GGMLQuantizationType

        return self._tensors[name].qtype == GGMLQuantizationType.Q8_0

    def raw(self, name: str) -> np.ndarray:
        """The stored bytes of ``name`` ([rows, row bytes] for block types), memory-mapped."""
        try:
            return self.index.raw(self._tensors[name])
        except (ValueError, KeyError) as exc:
            raise CheckpointError(f"{self.where(name)}: cannot read the tensor ({exc}); the "
                                  "file is truncated or corrupt, re-download it") from None

    def get(self, name: str) -> np.ndarray:
        from gguf.quants import dequantize

        info = self._tensors[name]
        try:
            arr = np.asarray(dequantize(self.index.raw(info), info.qtype), dtype=np.float32)
            arr = arr.reshape(info.shape)
        except (ValueError, KeyError, IndexError, NotImplementedError) as exc:
            raise CheckpointError(f"{self.where(name)}: cannot read the tensor ({exc}); the "
                                  "file is truncated or corrupt, re-download it") from None
        if name.endswith("norm.weight"):
            arr = arr - 1.0
        return arr

    def config(self) -> Gemma3Config:
        """The decoder config from the GGUF metadata (llama.cpp's gemma3 keys)."""
        try:
            return self._config()
        except KeyError as exc:
            raise CheckpointError(f"{self.path}: the GGUF file has no tensor {exc}; it is not a "
                                  "whole Gemma 3 model") from None
        except (TypeError, ValueError, OverflowError, ZeroDivisionError) as exc:
            missing = [k for k in ("block_count", "embedding_length", "attention.head_count",
                                   "feed_forward_length") if self.field("gemma3." + k) is None]
            why = f"no gemma3.{missing[0]} key" if missing else f"a malformed value ({exc})"
            raise CheckpointError(f"{self.path}: the GGUF metadata has {why}; it is not a "
                                  "complete Gemma 3 file") from None

    def _config(self) -> Gemma3Config:
        a = "gemma3."
        n = int(self.field(a + "block_count"))
        d = int(self.field(a + "embedding_length"))
        heads = int(self.field(a + "attention.head_count"))
        head_dim = int(self.field(a + "attention.key_length", d // heads))
        # llama.cpp: the 27B (62 layers) scales queries by hidden/heads; the others by head_dim.
        qpas = d / heads if n == 62 else head_dim
        scaling = self.field(a + "rope.scaling.factor")
        rows = self.shape("embed_tokens.weight")[0]
        return Gemma3Config(
            vocab_size=rows, hidden_size=d,
            intermediate_size=int(self.field(a + "feed_forward_length")),
            num_layers=n, num_heads=heads,
            num_kv_heads=int(self.field(a + "attention.head_count_kv", heads)),
            head_dim=head_dim, query_pre_attn_scalar=float(qpas),
            sliding_window=int(self.field(a + "attention.sliding_window", 4096)),
            layer_types=_pattern(n),
            rope_global_theta=float(self.field(a + "rope.freq_base", 1e6)),
            rope_global_scaling=float(scaling) if scaling else 1.0,
            rms_norm_eps=float(self.field(a + "attention.layer_norm_rms_epsilon", 1e-6)),
            max_position_embeddings=int(self.field(a + "context_length", 131_072)),
        )
