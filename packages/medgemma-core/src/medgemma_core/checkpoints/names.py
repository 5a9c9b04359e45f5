"""Tensor names of Hugging Face Gemma 3 checkpoints and how each maps onto our parameters.

Hugging Face stores torch ``Linear`` weights as [out, in]; we store kernels [in, ...]:
q [D, H, Hd], k/v [D, K, Hd], o [H, Hd, D], gate/up [D, F], down [F, D]. Each spec carries
the inverse conversion too (ours -> Hugging Face, bit for bit), used by the export.
"""

from __future__ import annotations

from collections.abc import Iterable

from medsiglip.weights import TensorSpec

from ..config import Gemma3Config

# Every prefix under which the text decoder appears in a real download (REFERENCE.md section 4).
TEXT_PREFIXES = ("model.language_model.", "language_model.model.", "language_model.", "model.", "")


def text_specs(cfg: Gemma3Config, prefix: str = "") -> list[TensorSpec]:
    """Specs (:class:`medsiglip.weights.TensorSpec`) of every decoder parameter: its tensor in
    Hugging Face naming under ``prefix``, stored shape and conversion."""
    d, f, h, k, hd = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads,
                      cfg.num_kv_heads, cfg.head_dim)

    def spec(name, path, shape, convert=_ident, inverse=_ident):
        return TensorSpec(path, prefix + name, shape, convert, inverse)

    specs = [
        spec("embed_tokens.weight", ("embedding",), (cfg.vocab_size, d)),
        spec("norm.weight", ("final_norm", "scale"), (d,)),
    ]
    norms = {"input_layernorm": "pre_attn_norm", "post_attention_layernorm": "post_attn_norm",
             "pre_feedforward_layernorm": "pre_ffw_norm",
             "post_feedforward_layernorm": "post_ffw_norm"}
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        for hf, ours in norms.items():
            specs.append(spec(p + hf + ".weight", ("layers", i, ours, "scale"), (d,)))
        specs += [
            spec(p + "self_attn.q_proj.weight", ("layers", i, "attn", "q"), (h * hd, d),
                 lambda w: w.T.reshape(d, h, hd), lambda x: x.reshape(d, h * hd).T),
            spec(p + "self_attn.k_proj.weight", ("layers", i, "attn", "k"), (k * hd, d),
                 lambda w: w.T.reshape(d, k, hd), lambda x: x.reshape(d, k * hd).T),
            spec(p + "self_attn.v_proj.weight", ("layers", i, "attn", "v"), (k * hd, d),
                 lambda w: w.T.reshape(d, k, hd), lambda x: x.reshape(d, k * hd).T),
            spec(p + "self_attn.o_proj.weight", ("layers", i, "attn", "o"), (d, h * hd),
                 lambda w: w.T.reshape(h, hd, d), lambda x: x.reshape(h * hd, d).T),
            spec(p + "self_attn.q_norm.weight", ("layers", i, "attn", "q_norm", "scale"),
                 (hd,)),
            spec(p + "self_attn.k_norm.weight", ("layers", i, "attn", "k_norm", "scale"),
                 (hd,)),
            spec(p + "mlp.gate_proj.weight", ("layers", i, "mlp", "gate"), (f, d), _t, _t),
            spec(p + "mlp.up_proj.weight", ("layers", i, "mlp", "up"), (f, d), _t, _t),
            spec(p + "mlp.down_proj.weight", ("layers", i, "mlp", "down"), (d, f), _t, _t),
        ]
    return specs


def _ident(x):
    return x


def _t(w):
    return w.T


def find_prefix(names: Iterable[str], prefixes: Iterable[str] = TEXT_PREFIXES,
                anchor: str = "embed_tokens.weight") -> str | None:
    """The first prefix under which ``anchor`` exists among ``names``."""
    names = set(names)
    for prefix in prefixes:
        if prefix + anchor in names:
            return prefix
    return None
