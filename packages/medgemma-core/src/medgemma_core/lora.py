"""LoRA for MedGemma's models (:mod:`medsiglip.lora`'s one mechanism, re-exported) and the
export of the adapters as a PEFT adapter folder that ``peft.PeftModel.from_pretrained`` applies
to the transformers model::

    apply_lora(model, LoRAConfig(rank=16, alpha=16, dropout=0.05), rngs=nnx.Rngs(0))
    ...  # train with trainable_filter(model, decoder="lora", vision="lora", projector="lora")
    save_peft_adapter(model, "adapter", base_model_name_or_path="google/medgemma-4b-it")

    # with transformers + peft:
    base = Gemma3ForConditionalGeneration.from_pretrained("google/medgemma-4b-it")
    model = PeftModel.from_pretrained(base, "adapter")

The folder holds ``adapter_config.json`` (``r``, ``lora_alpha``, ``lora_dropout``,
``target_modules``: a regex that matches exactly the adapted modules) and
``adapter_model.safetensors`` with PEFT's names, ``base_model.model.<module>.lora_A.weight
[r, in]`` and ``.lora_B.weight [out, r]``, where ``<module>`` is transformers' module path:
``model.layers.<i>.self_attn.q_proj`` in ``Gemma3ForCausalLM``;
``model.language_model.layers.<i>...`` and ``model.vision_tower.encoder.layers.<i>.mlp.fc1``
in ``Gemma3ForConditionalGeneration``.

The projector's weight (``multi_modal_projector.mm_input_projection_weight``) is a bare
``nn.Parameter``, not a ``Linear``: PEFT cannot put a LoRA adapter on it. A projector adapter
is therefore exported merged: the whole projector module (its norm and the weight with
``a @ b * scale`` added) goes into the file under ``modules_to_save``, which PEFT loads in
place of the base projector. That is exact, but the file then holds the projector's full
weight (``Dv x D``: 2.9 M values for 4B) rather than a low-rank pair.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from medsiglip.checkpoints.convert import vision_specs
from medsiglip.checkpoints.export import HFTensor, write_safetensors
from medsiglip.lora import (
    DEFAULT_TARGETS,
    LoRA,
    LoRAConfig,
    adapt,
    adapters,
    apply_lora,
    base_filter,
    lora_filter,
    merge_lora,
    trainable_filter,
    unmerge_lora,
)

from .checkpoints.names import text_specs
from .multimodal import Gemma3Multimodal
from .transformer import Gemma3

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "DEFAULT_TARGETS", "LoRA", "LoRAConfig",
           "adapt", "adapters", "apply_lora", "base_filter", "hf_module_names", "lora_filter",
           "merge_lora", "save_peft_adapter", "trainable_filter", "unmerge_lora"]

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
_PROJECTOR = "model.multi_modal_projector."


def hf_module_names(model: Gemma3 | Gemma3Multimodal) -> dict[str, str]:
    """Our projection parameter path (``"decoder/layers/0/attn/q"``) -> transformers' module
    path in the model PEFT wraps (``"model.language_model.layers.0.self_attn.q_proj"``), from
    the checkpoint name tables."""
    if isinstance(model, Gemma3Multimodal):
        specs = [(("decoder", *s.path), s.name)
                 for s in text_specs(model.config.text, "model.language_model.")]
        specs += [(("vision", *s.path), s.name)
                  for s in vision_specs(model.config.vision, "model.vision_tower.")]
    elif isinstance(model, Gemma3):
        specs = [(s.path, s.name) for s in text_specs(model.config, "model.")]
    else:
        raise TypeError(f"save_peft_adapter exports a Gemma3 or Gemma3Multimodal, not "
                        f"{type(model).__name__}")
    return {"/".join(map(str, path)): name.removesuffix(".weight")
            for path, name in specs if name.endswith(".weight")}


def _target_regex(modules: list[str]) -> str:
    """A regex that ``re.fullmatch``-es exactly ``modules`` (PEFT's string target_modules):
    ``<stack>.layers.(?:0|1|...).(?:self_attn.q_proj|...)`` per group of layers."""
    by_stack: dict[str, dict[str, set[int]]] = defaultdict(lambda: defaultdict(set))
    plain = []
    for name in modules:
        m = re.fullmatch(r"(.*\.layers\.)(\d+)\.(.+)", name)
        if m:
            by_stack[m.group(1)][m.group(3)].add(int(m.group(2)))
        else:
            plain.append(re.escape(name))
    pieces = []
    for stack, tails in by_stack.items():
        by_layers: dict[tuple[int, ...], list[str]] = defaultdict(list)
        for tail, layers in tails.items():
            by_layers[tuple(sorted(layers))].append(tail)
        for layers, group in by_layers.items():
            ids = "|".join(map(str, layers))
            pieces.append(f"{re.escape(stack)}(?:{ids})\\.(?:"
                          f"{'|'.join(re.escape(t) for t in sorted(group))})")
    return "|".join(pieces + plain)


def _array(x: Any) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x))


def save_peft_adapter(model: Gemma3 | Gemma3Multimodal, folder: str | Path, *,
                      base_model_name_or_path: str | None = None,
                      save_projector: bool | None = None, overwrite: bool = False) -> Path:
    """Write ``model``'s LoRA adapters as a PEFT adapter folder (``adapter_config.json`` +
    ``adapter_model.safetensors``; module docstring). ``save_projector``: put the projector
    (merged with its adapter) into ``modules_to_save``; default: when it has an adapter. All
    adapters must share one rank and scale; merged adapters are refused (unmerge first)."""
    table = adapters(model)
    if not table:
        raise ValueError("the model has no LoRA adapters: apply_lora first (a fully trained "
                         "model exports with medgemma_core.checkpoints.export.save_hf)")
    merged = [path for path, _, _, adapter in table if adapter.merged]
    if merged:
        raise ValueError(f"{len(merged)} adapters are merged into the base weights (e.g. "
                         f"{merged[0]}): unmerge_lora(model) first, or export the merged model "
                         f"with save_hf")
    ranks = {(adapter.rank, adapter.scale) for _, _, _, adapter in table}
    if len(ranks) > 1:
        raise ValueError(f"adapters of several ranks/scales {sorted(ranks)}: one PEFT adapter "
                         f"holds one; apply_lora with one LoRAConfig")
    (rank, scale), = ranks
    dropout = {(a.dropout.rate if a.dropout is not None else 0.0) for _, _, _, a in table}
    names = hf_module_names(model)
    projector = [(path, node, adapter) for path, node, _, adapter in table
                 if path == "projector/weight"]
    if save_projector is None:
        save_projector = bool(projector)
    if projector and not save_projector:
        raise ValueError("the projector has a LoRA adapter, which PEFT can only receive merged "
                         "(modules_to_save): pass save_projector=True or drop that adapter")
    if save_projector and not isinstance(model, Gemma3Multimodal):
        raise ValueError("save_projector: a text model has no projector")

    tensors, modules = [], []
    for path, _, _, adapter in table:
        if path == "projector/weight":
            continue
        if path not in names:
            raise ValueError(f"no Hugging Face module for the adapter of {path}: PEFT can only "
                             f"receive adapters of the decoder and vision projections")
        module = names[path]
        modules.append(module)
        a = _array(adapter.a[...]).reshape(-1, rank)  # [in, r]
        b = _array(adapter.b[...]).reshape(rank, -1)  # [r, out]
        for suffix, value in (("lora_A", a.T), ("lora_B", b.T)):
            value = np.ascontiguousarray(value)
            tensors.append(HFTensor(f"base_model.model.{module}.{suffix}.weight", value.shape,
                                    value.dtype, lambda v=value: v))
    if save_projector:
        weight = model.projector.weight.get_value()
        if projector:
            weight = (weight.astype(jnp.float32) + projector[0][2].delta()).astype(weight.dtype)
        for name, value in (("mm_input_projection_weight", _array(weight)),
                            ("mm_soft_emb_norm.weight",
                             _array(model.projector.norm.scale.get_value()))):
            tensors.append(HFTensor(f"base_model.model.{_PROJECTOR}{name}", value.shape, value.dtype,
                                    lambda v=value: v))
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        raise FileExistsError(f"{folder} is not empty: pass overwrite=True or a new folder")
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        (written,) = write_safetensors(tmp, tensors, max_shard_size=1 << 62)
        shutil.move(str(written), folder / ADAPTER_WEIGHTS)
    alpha = scale * rank
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": rank, "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "lora_dropout": max(dropout), "target_modules": _target_regex(modules),
        "modules_to_save": ["multi_modal_projector"] if save_projector else None,
        "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True,
        "use_rslora": False, "use_dora": False, "inference_mode": True,
        "rank_pattern": {}, "alpha_pattern": {}, "revision": None,
    }
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return folder
