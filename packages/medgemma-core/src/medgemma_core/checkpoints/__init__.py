"""Checkpoint loading: Hugging Face folders, GGUF files, Orbax folders of our own."""

from __future__ import annotations

import hashlib
import os
import shutil
import warnings
from pathlib import Path

import jax.numpy as jnp
from flax import nnx

from ..config import Gemma3Config
from ..transformer import Gemma3
from . import orbax_io
from .build import CheckpointError, TensorSource, fill
from .gguf_file import GGUFSource
from .hf import SafetensorsSource, read_config
from .names import TEXT_PREFIXES, find_prefix, text_specs

__all__ = ["CheckpointError", "TensorSource", "load_decoder", "save_decoder", "resolve_dtype",
           "text_source"]


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
    raw = read_config(path)
    src = SafetensorsSource(path)
    prefix = find_prefix(src.names(), TEXT_PREFIXES)
    if prefix is None:
        raise CheckpointError(
            f"{path}: no Gemma 3 text weights found (looked for embed_tokens.weight under "
            f"{', '.join(repr(p) for p in TEXT_PREFIXES if p)}); is this a Gemma 3 checkpoint?")
    model_type = raw.get("model_type", "")
    if model_type and not model_type.startswith("gemma3"):
        raise CheckpointError(
            f"{path / 'config.json'}: model_type is {model_type!r}, not a Gemma 3 model")
    return src, Gemma3Config.from_hf_dict(raw), prefix


def load_decoder(path: str | Path, *, dtype="float32") -> Gemma3:
    """Load the Gemma 3 text decoder from a HF folder, a GGUF file or an Orbax folder."""
    dtype = resolve_dtype(dtype)
    path = Path(path)
    if path.is_dir() and orbax_io.is_orbax(path):
        meta = orbax_io.read_meta(path)
        cfg = Gemma3Config.from_hf_dict(meta["config"])
        abstract = nnx.eval_shape(lambda: Gemma3(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
        return orbax_io.restore(abstract, path)
    cached = _conversion_cache(path, dtype)
    if cached is not None and orbax_io.is_orbax(cached):
        try:
            return load_decoder(cached, dtype=dtype)
        except CheckpointError:
            shutil.rmtree(cached, ignore_errors=True)  # stale or partial: convert again
    src, cfg, prefix = text_source(path)
    abstract = nnx.eval_shape(lambda: Gemma3(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    model = fill(abstract, src, text_specs(cfg), prefix, dtype, describe=os.fspath(path))
    if cached is not None:
        try:
            save_decoder(model, cached)
        except Exception as exc:  # a full disk must not stop the load
            shutil.rmtree(cached, ignore_errors=True)
            warnings.warn(f"could not cache the converted weights in {cached}: {exc}",
                          stacklevel=2)
    return model


def _conversion_cache(path: Path, dtype) -> Path | None:
    """Where the dequantized weights of a GGUF file are kept (Orbax), so that the next load
    skips dequantization. ``MEDGEMMA_CONVERT_CACHE=0`` turns this off; ``=DIR`` moves it."""
    setting = os.environ.get("MEDGEMMA_CONVERT_CACHE", "")
    if setting == "0" or not path.is_file() or path.suffix.lower() != ".gguf":
        return None
    root = Path(setting) if setting else Path.home() / ".cache" / "medgemma" / "converted"
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{jnp.dtype(dtype).name}|1"
    return root / f"{path.stem}-{hashlib.sha1(key.encode()).hexdigest()[:16]}"


def save_decoder(model: Gemma3, folder: str | Path) -> Path:
    """Save with Orbax (restorable by :func:`load_decoder`)."""
    return orbax_io.save(model, folder, config=model.config.to_hf_dict(), kind="gemma3_text")
