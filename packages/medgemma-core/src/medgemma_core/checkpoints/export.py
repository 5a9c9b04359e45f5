"""Our models -> Hugging Face folders that transformers loads with ``from_pretrained``.

* :class:`~medgemma_core.transformer.Gemma3` -> the ``Gemma3ForCausalLM`` layout (``model.*``;
  the output head is tied to the embedding, so no ``lm_head`` is stored).
* :class:`~medgemma_core.multimodal.Gemma3Multimodal` -> ``Gemma3ForConditionalGeneration``,
  under the names transformers 5 writes with ``save_pretrained``: ``language_model.model.*``,
  ``vision_tower.*`` and ``multi_modal_projector.*``.

The tensors come from the same :class:`~medsiglip.weights.TensorSpec` tables the loaders use,
through each spec's inverse (a transpose or reshape back, so HF -> ours -> HF is bit for bit),
in the model's dtype, written one at a time into safetensors shards of at most
``max_shard_size`` (with ``model.safetensors.index.json`` when there are several) by
:func:`medsiglip.checkpoints.export.write_safetensors`. ``config.json`` is the config's
``to_hf_dict()`` plus ``dtype``. The tokenizer and processor files (:data:`TOKENIZER_FILES`)
are copied from a source folder; from a GGUF file the tokenizer is rebuilt (``tokenizer.model``
and a ``tokenizer_config.json`` that transformers' ``AutoTokenizer`` reads).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medsiglip.checkpoints.convert import vision_specs
from medsiglip.checkpoints.export import (
    copy_files,
    dtype_name,
    plan_tensors,
    prepare_folder,
    write_safetensors,
)
from medsiglip.weights import TensorSpec

from ..multimodal import Gemma3Multimodal
from ..tokenizer import Tokenizer
from ..transformer import Gemma3
from .multimodal import _projector_specs
from .names import text_specs

__all__ = ["MM_PREFIXES", "TEXT_PREFIX", "TOKENIZER_FILES", "convert_checkpoint", "hf_config",
           "hf_specs", "load_any", "save_hf", "write_tokenizer_files"]

#: The decoder's prefix in a Gemma3ForCausalLM folder.
TEXT_PREFIX = "model."
#: The prefixes of a Gemma3ForConditionalGeneration folder, as transformers 5 saves it.
MM_PREFIXES = {"decoder": "language_model.model.", "vision": "vision_tower.",
               "projector": "multi_modal_projector."}
#: Tokenizer, processor and generation files copied from a source folder when present.
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "generation_config.json",
                   "preprocessor_config.json", "processor_config.json", "chat_template.json",
                   "chat_template.jinja")


def _under(specs: list[TensorSpec], attr: str) -> list[TensorSpec]:
    return [dataclasses.replace(s, path=(attr,) + s.path) for s in specs]


def hf_specs(model: Gemma3 | Gemma3Multimodal) -> list[TensorSpec]:
    """Every parameter of ``model`` and the Hugging Face tensor it becomes."""
    if isinstance(model, Gemma3Multimodal):
        cfg = model.config
        return (_under(text_specs(cfg.text, MM_PREFIXES["decoder"]), "decoder")
                + _under(vision_specs(cfg.vision, MM_PREFIXES["vision"]), "vision")
                + _under(_projector_specs(cfg, MM_PREFIXES["projector"]), "projector"))
    if isinstance(model, Gemma3):
        return text_specs(model.config, TEXT_PREFIX)
    raise TypeError(f"cannot export a {type(model).__name__}: pass a Gemma3 (text) or a "
                    f"Gemma3Multimodal (image-text) model")


def hf_config(model: Gemma3 | Gemma3Multimodal) -> dict[str, Any]:
    """``config.json`` of the export: the config's ``to_hf_dict()`` with the weights' dtype."""
    config = model.config.to_hf_dict()
    config["dtype"] = dtype_name(model)
    text = config
    if isinstance(model, Gemma3Multimodal):
        text = config["text_config"] = dict(config["text_config"], dtype=config["dtype"])
    scalar = text.get("query_pre_attn_scalar")
    if isinstance(scalar, float) and scalar.is_integer():  # transformers 5 checks it is an int
        text["query_pre_attn_scalar"] = int(scalar)
    return config


def _gguf_file(source: str | Path | None) -> Path | None:
    if source is None:
        return None
    path = Path(source)
    if path.is_file() and path.suffix.lower() == ".gguf":
        return path
    return None


def write_tokenizer_files(folder: str | Path, tokenizer: Tokenizer, *,
                          chat_template: str | None = None) -> list[str]:
    """Write ``tokenizer.model`` and the ``tokenizer_config.json`` / ``special_tokens_map.json``
    with which transformers' ``AutoTokenizer`` (GemmaTokenizer: ``<bos>`` first) and
    :meth:`Tokenizer.from_checkpoint` load it, tokens added beyond the model (the image token)
    included; ``chat_template`` goes to ``chat_template.jinja``. Returns the files written."""
    folder = Path(folder)
    tokenizer.save(folder / "tokenizer.model")
    piece = tokenizer.id_to_piece
    special = {"bos_token": piece(tokenizer.bos_id), "eos_token": piece(tokenizer.eos_id),
               "pad_token": piece(tokenizer.pad_id), "unk_token": piece(tokenizer.unk_id)}
    config: dict[str, Any] = {
        "tokenizer_class": "GemmaTokenizer", "add_bos_token": True, "add_eos_token": False,
        "clean_up_tokenization_spaces": False, "model_max_length": 1_000_000_000_000_000,
        **special, "padding_side": "left",
        "added_tokens_decoder": {
            str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": i in tokenizer.special_ids}
            for i, t in sorted(tokenizer.added_tokens.items())},
    }
    if tokenizer.image_token_id is not None:
        config["extra_special_tokens"] = {"image_token": "<image_soft_token>",
                                          "boi_token": "<start_of_image>",
                                          "eoi_token": "<end_of_image>"}
    written = ["tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    if chat_template:
        (folder / "chat_template.jinja").write_text(chat_template)
        written.append("chat_template.jinja")
    return written


def _generation_config(model: Gemma3 | Gemma3Multimodal, tokenizer: Tokenizer | None
                       ) -> dict[str, Any]:
    cfg = model.config.text if isinstance(model, Gemma3Multimodal) else model.config
    eos = sorted(tokenizer.stop_ids) if tokenizer is not None else [cfg.eos_id]
    return {"bos_token_id": cfg.bos_id, "eos_token_id": eos if len(eos) > 1 else eos[0],
            "pad_token_id": cfg.pad_id}


def save_hf(model: Gemma3 | Gemma3Multimodal, folder: str | Path, *,
            source: str | Path | None = None, tokenizer: Tokenizer | None = None,
            max_shard_size: int | str = "5GB", overwrite: bool = False,
            progress: Callable[[str], None] | None = None) -> Path:
    """Write ``model`` as a Hugging Face folder (``Gemma3ForCausalLM`` for a text
    :class:`Gemma3`, ``Gemma3ForConditionalGeneration`` for a :class:`Gemma3Multimodal`).

    ``source``: the checkpoint the model came from. From a folder (Hugging Face or Orbax) the
    files of :data:`TOKENIZER_FILES` it holds are copied; from a ``.gguf`` file the tokenizer
    is rebuilt from its vocabulary (:func:`write_tokenizer_files`, with its chat template when
    it has one). ``tokenizer``: written when the source brings no ``tokenizer.model``.
    ``max_shard_size``: bytes or ``"5GB"``-style (10^9 bytes per GB, as transformers).
    A non-empty ``folder`` is refused unless ``overwrite``. ``progress(name)`` after each
    tensor. Returns the folder.
    """
    specs = hf_specs(model)
    folder = prepare_folder(folder, overwrite)
    write_safetensors(folder, plan_tensors(model, specs), max_shard_size=max_shard_size,
                      progress=progress)
    (folder / "config.json").write_text(json.dumps(hf_config(model), indent=2) + "\n")
    copied = copy_files(source, folder, TOKENIZER_FILES)
    gguf = _gguf_file(source)
    if "tokenizer.model" not in copied and (gguf is not None or tokenizer is not None):
        from .gguf_index import GGUFIndex

        template = None
        if gguf is not None:
            template = GGUFIndex(gguf).metadata.get("tokenizer.chat_template")
            tokenizer = tokenizer if tokenizer is not None else Tokenizer.from_gguf(gguf)
        copied += write_tokenizer_files(folder, tokenizer, chat_template=template)
    if "generation_config.json" not in copied:
        (folder / "generation_config.json").write_text(
            json.dumps(_generation_config(model, tokenizer), indent=2) + "\n")
    return folder


# ---- medgemma convert ---------------------------------------------------------------------
def _source_dtype(path: Path) -> str:
    """The dtype a checkpoint holds its weights in (``float32`` for GGUF: dequantized)."""
    from medsiglip import weights

    if path.is_dir() and weights.is_saved(path):
        name = str(weights.read_meta(path).get("dtype", "float32"))
        return "float32" if name == "int8" else name  # a quantized model computes in float32
    if path.is_dir() and (path / "config.json").is_file():
        raw = weights.read_hf_config(path)
        name = raw.get("dtype") or raw.get("torch_dtype") or (raw.get("text_config") or {}).get(
            "dtype") or "float32"
        return "bfloat16" if name == "bfloat16" else "float32"
    return "float32"


def load_any(source: str | Path, dtype: str = "auto") -> Gemma3 | Gemma3Multimodal:
    """The text or image-text model of any checkpoint ``medgemma_core.load`` reads (a Hugging
    Face folder, a GGUF file, an Orbax folder), in ``dtype`` (``auto``: the source's). A GGUF
    file is dequantized without writing the conversion cache."""
    from medsiglip import weights
    from medsiglip.weights import abstract_module, fill

    from . import load_decoder, resolve_dtype, text_source
    from .multimodal import is_multimodal, load_multimodal

    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder; pass a Hugging Face folder, "
                                f"a .gguf file or an Orbax folder")
    want = _source_dtype(path) if dtype == "auto" else dtype
    if is_multimodal(path):
        return load_multimodal(path, dtype=want)
    if path.is_dir() and weights.is_saved(path):
        return load_decoder(path, dtype=want)
    src, cfg, prefix = text_source(path)
    jdtype = resolve_dtype(want)
    abstract = abstract_module(lambda rngs: Gemma3(cfg, dtype=jdtype, rngs=rngs))
    return fill(abstract, src, text_specs(cfg, prefix))


def convert_checkpoint(source: str | Path, out: str | Path, *, to: str, dtype: str = "auto",
                       max_shard_size: int | str = "5GB", overwrite: bool = False,
                       say: Callable[[str], None] | None = None,
                       quantize: str | None = None) -> dict[str, Any]:
    """``medgemma convert``: load ``source`` (:func:`load_any`) and write ``out`` as a Hugging
    Face folder (``to="hf"``, :func:`save_hf`) or an Orbax folder (``to="orbax"``, which
    ``medgemma_core.load`` reads, tokenizer files included). ``say(text)`` reports progress
    (a line ending in ``\\r`` is overwritten by the next). ``quantize`` (``"int8"``,
    ``"int8-g32"``; text models, ``to="orbax"``): an Orbax folder of int8 weights that loads
    quantized. Returns a JSON-able summary."""
    from medsiglip.checkpoints.export import parse_size

    from . import save_decoder
    from .multimodal import save_multimodal

    say = say if say is not None else (lambda text: None)
    if to not in ("hf", "orbax"):
        raise ValueError(f"--to {to!r}: use hf or orbax")
    if dtype not in ("auto", "float32", "bfloat16"):
        raise ValueError(f"--dtype {dtype!r}: use auto, float32 or bfloat16")
    parse_size(max_shard_size)
    source, out = Path(source), Path(out)
    if not source.exists():
        raise FileNotFoundError(f"{source}: no such file or folder; pass a Hugging Face folder, "
                                f"a .gguf file or an Orbax folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ValueError(f"{out} exists and is not an empty folder: pass --overwrite or a new "
                         f"folder")
    if out.resolve() == source.resolve():
        raise ValueError(f"{out} is the source itself; write the conversion to a new folder")
    if quantize is not None:
        from .. import quant
        from . import load_decoder
        from .multimodal import is_multimodal

        quant.check_mode(quantize)
        if to != "orbax" or is_multimodal(source):
            raise ValueError("--quantize converts text models to Orbax folders only; use "
                             "--to orbax (image-text models: medgemma_core.load(..., "
                             "quantize=...))")
    say(f"reading {source}\n")
    if quantize is not None:
        model = load_decoder(source, dtype=_source_dtype(source) if dtype == "auto" else dtype,
                             quantize=quantize)
    else:
        model = load_any(source, dtype)
    kind = "image-text" if isinstance(model, Gemma3Multimodal) else "text"
    n = len(hf_specs(model))
    if to == "hf":
        done = [0]

        def progress(name: str) -> None:
            done[0] += 1
            say(f"writing tensors {done[0]}/{n}\r")

        save_hf(model, out, source=source, max_shard_size=max_shard_size, overwrite=True,
                progress=progress)
        say("\n")
    else:
        say("writing the Orbax checkpoint\n")
        if kind == "image-text":
            save_multimodal(model, out)
        else:
            save_decoder(model, out)
        copied = copy_files(source, out, TOKENIZER_FILES)
        gguf = _gguf_file(source)
        if "tokenizer.model" not in copied and gguf is not None:
            write_tokenizer_files(out, Tokenizer.from_gguf(gguf))
    say(f"wrote {out}\n")
    return {"converted": str(source), "to": to, "out": str(out), "kind": kind,
            "dtype": dtype_name(model), "tensors": n}
