"""Checkpoint loading: Hugging Face folders, GGUF files, Orbax folders of our own.

The weights machinery (tensor sources, ``fill``, abstract modules, the Orbax folder layout,
:class:`CheckpointError`) is medsiglip's :mod:`medsiglip.weights`; what is here is Gemma's:
the name tables (:mod:`.names`), GGUF (:mod:`.gguf_file`) and the config mapping.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import warnings
from pathlib import Path

import jax.numpy as jnp

from medsiglip import weights
from medsiglip.weights import (
    CheckpointError,
    SafetensorsSource,
    TensorSource,
    abstract_module,
    fill,
    read_hf_config,
)

from .. import quant
from ..config import Gemma3Config
from ..transformer import Gemma3
from .gguf_file import GGUFSource
from .names import TEXT_PREFIXES, find_prefix, text_specs

__all__ = ["CheckpointError", "TensorSource", "load_decoder", "save_decoder", "resolve_dtype",
           "text_source"]


KIND = "gemma3_text"
QUANT_KEY = "medgemma_quantize"  # in a saved folder's config: the quantize mode of its weights


def resolve_dtype(dtype) -> jnp.dtype:
    table = {"float32": jnp.float32, "f32": jnp.float32, "bfloat16": jnp.bfloat16,
             "bf16": jnp.bfloat16}
    if isinstance(dtype, str):
        if dtype not in table:
            raise ValueError(f"unknown dtype {dtype!r}; use float32 or bfloat16")
        return table[dtype]
    return jnp.dtype(dtype)


def text_source(path: str | Path) -> tuple[TensorSource, Gemma3Config, str]:
    """The tensor source, decoder config and name prefix of a HF folder or a GGUF file."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder; pass a model folder or a .gguf file")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise CheckpointError(
                f"{path}: not a checkpoint; pass a Hugging Face folder, an Orbax folder saved by "
                f"medgemma-core, or a .gguf file")
        src = GGUFSource(path)
        return src, src.config(), ""
    raw = read_hf_config(path)
    src = SafetensorsSource(path)
    prefix = find_prefix(src.names(), TEXT_PREFIXES)
    if prefix is None:
        raise CheckpointError(
            f"{path}: no Gemma 3 text weights found (looked for embed_tokens.weight under "
            f"{', '.join(repr(p) for p in TEXT_PREFIXES if p)}); is this a Gemma 3 checkpoint?")
    model_type = raw.get("model_type", "")
    if model_type and not str(model_type).startswith("gemma3"):
        raise CheckpointError(
            f"{path / 'config.json'}: model_type is {model_type!r}, not a Gemma 3 model")
    try:
        config = Gemma3Config.from_hf_dict(raw)
    except CheckpointError:
        raise
    except ValueError as exc:
        raise CheckpointError(f"{path / 'config.json'}: {exc}") from None
    return src, config, prefix


def load_decoder(path: str | Path, *, dtype="float32", quantize: str | None = None) -> Gemma3:
    """Load the Gemma 3 text decoder from a HF folder, a GGUF file or an Orbax folder.

    ``quantize="int8"`` (one scale per output channel) or ``"int8-g32"`` (groups of 32):
    int8 weights (:mod:`medgemma_core.quant`), quantized one tensor at a time as they are
    read. A GGUF file whose weights are Q8_0 loads its blocks as they are (groups of 32,
    whichever int8 mode is asked for), without a float copy. An Orbax folder of a quantized
    model loads quantized whatever ``quantize`` says."""
    dtype = resolve_dtype(dtype)
    quant.check_mode(quantize)
    path = Path(path)
    if path.is_dir() and weights.is_saved(path):
        meta = weights.read_meta(path)
        if meta["kind"] != KIND:
            raise CheckpointError(
                f"{path}: holds a {meta['kind']!r} model, not a Gemma 3 text decoder; load it "
                f"with the loader of that kind (medgemma_core.load for image-text models)")
        cfg = Gemma3Config.from_hf_dict(meta["config"])
        saved = meta["config"].get(QUANT_KEY)
        if saved is not None:
            abstract = quant.abstract_quantized(
                lambda rngs: Gemma3(cfg, dtype=dtype, rngs=rngs), quant.check_mode(saved))
            return weights.restore(abstract, path)
        abstract = abstract_module(lambda rngs: Gemma3(cfg, dtype=dtype, rngs=rngs))
        model = weights.restore(abstract, path)
        return model if quantize is None else quant.quantize(model, quantize)
    cached = _conversion_cache(path, dtype, quantize)
    if cached is not None and weights.is_saved(cached):
        try:
            return load_decoder(cached, dtype=dtype)
        except CheckpointError:
            shutil.rmtree(cached, ignore_errors=True)  # stale or partial: convert again
    src, cfg, prefix = text_source(path)
    specs = text_specs(cfg, prefix)
    if quantize is None:
        abstract = abstract_module(lambda rngs: Gemma3(cfg, dtype=dtype, rngs=rngs))
    else:
        if isinstance(src, GGUFSource) and any(
                src.is_q8_0(n) for n in src.names() if not n.endswith("norm.weight")):
            quantize, src = quant.q8_0_mode(quantize), quant.Q8Source(src)  # its own blocks
        abstract = quant.abstract_quantized(
            lambda rngs: Gemma3(cfg, dtype=dtype, rngs=rngs), quantize)
        specs = quant.quantized_specs(specs, quantize)
    model = fill(abstract, src, specs)
    if cached is not None:
        _cache_converted(model, cached)
    return model


def _cache_converted(model: Gemma3, cached: Path) -> None:
    """Save ``model`` as the conversion cache ``cached``: written beside it under a name of this
    process and renamed into place, so that another process loading the same file at the same
    time never reads a half-written cache nor has its own deleted (the first rename wins)."""
    tmp = cached.with_name(f"{cached.name}.tmp{os.getpid()}")
    try:
        save_decoder(model, tmp)
        try:
            tmp.rename(cached)
        except OSError:  # another process cached it first (or a stale folder is in the way)
            if not weights.is_saved(cached):
                shutil.rmtree(cached, ignore_errors=True)
                tmp.rename(cached)
    except Exception as exc:  # a full disk must not stop the load
        warnings.warn(f"could not cache the converted weights in {cached}: {exc}", stacklevel=2)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _conversion_cache(path: Path, dtype, quantize: str | None = None) -> Path | None:
    """Where the dequantized weights of a GGUF file are kept (Orbax), so that the next load
    skips dequantization. ``MEDGEMMA_CONVERT_CACHE=0`` turns this off; ``=DIR`` moves it."""
    setting = os.environ.get("MEDGEMMA_CONVERT_CACHE", "")
    if setting == "0" or not path.is_file() or path.suffix.lower() != ".gguf":
        return None
    root = Path(setting) if setting else Path.home() / ".cache" / "medgemma" / "converted"
    stat = path.stat()
    # the last field is the cache layout: 2 = medsiglip.weights' folders (1 held medgemma.json)
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{jnp.dtype(dtype).name}|2"
    if quantize is not None:  # quantized weights are kept apart (float keys unchanged)
        key += f"|{quantize}"
    return root / f"{path.stem}-{hashlib.sha1(key.encode()).hexdigest()[:16]}"


def save_decoder(model: Gemma3, folder: str | Path) -> Path:
    """Save with Orbax (restorable by :func:`load_decoder`), replacing what ``folder`` holds.
    A quantized model is saved quantized (int8 values and scales; its mode in the config)."""
    config = model.config.to_hf_dict()
    mode = quant.mode_of(model)
    if mode is not None:
        config[QUANT_KEY] = mode
    return weights.save(model, folder, kind=KIND, config=config, overwrite=True)
