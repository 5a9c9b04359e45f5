"""Gemma3ForConditionalGeneration checkpoints (google/medgemma-4b-it, -27b-it) and Orbax folders
of the whole image-text model.

A Hugging Face folder holds ``config.json`` (``text_config``, ``vision_config``,
``mm_tokens_per_image``, ``image_token_index``, ...) and ``model*.safetensors`` (sharded with an
index). Tensors: the decoder under one of :data:`~.names.TEXT_PREFIXES`, the vision tower under
medsiglip's prefixes, and the projector::

    [model.]multi_modal_projector.mm_soft_emb_norm.weight            [Dv]
    [model.]multi_modal_projector.mm_input_projection_weight         [Dv, D]  (no transpose)

Tensors are read with ``pread`` into fresh buffers, one at a time, converted and cast before the
next (:class:`PreadSource`): memory-mapped reads would leave every page of the file resident in
this process (counted in its RSS) until the file is closed, doubling the peak for a 4B model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from flax import nnx

from ..multimodal import Gemma3Multimodal, MultimodalConfig
from . import orbax_io, resolve_dtype
from .build import CheckpointError, fill
from .hf import read_config
from .names import TEXT_PREFIXES, TensorSpec, find_prefix, text_specs

__all__ = ["KIND", "PROJECTOR_PREFIXES", "PreadSource", "is_multimodal", "load_multimodal",
           "read_multimodal_config", "save_multimodal"]

KIND = "gemma3_multimodal"
PROJECTOR_PREFIXES = ("model.multi_modal_projector.", "multi_modal_projector.")
_NORM, _PROJ = "mm_soft_emb_norm.weight", "mm_input_projection_weight"
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
           "BOOL": np.bool_}


class PreadSource:
    """Tensors of a Hugging Face folder's safetensors files, read with ``os.pread`` (no mmap).

    Implements the :class:`~.build.TensorSource` protocol. The headers are parsed with
    ``json``; each ``get`` allocates one array and fills it from the file.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.exists():
            try:
                files = sorted({self.folder / f for f in
                                json.loads(index.read_text())["weight_map"].values()})
            except (OSError, ValueError, KeyError) as exc:
                raise CheckpointError(f"{index}: not a valid safetensors index ({exc})") from None
        else:
            files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{self.folder}: no *.safetensors files; pass a Hugging Face "
                                  f"model folder (config.json + model.safetensors)")
        self._info: dict[str, tuple[Path, str, tuple[int, ...], int, int]] = {}
        for file in files:
            self._read_header(file)

    def _read_header(self, file: Path) -> None:
        if not file.exists():
            raise CheckpointError(f"{file}: listed in the index but missing; re-download it")
        size = file.stat().st_size
        try:
            with open(file, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                if not 0 < n <= min(size - 8, 100 << 20):
                    raise ValueError(f"header length {n} does not fit the file ({size} bytes)")
                header = json.loads(f.read(n))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{file}: not a readable safetensors file ({exc}); it is "
                                  f"truncated or corrupt, re-download it") from None
        base = 8 + n
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            begin, end = meta["data_offsets"]
            if base + end > size:
                raise CheckpointError(f"{file}: tensor {name!r} runs past the end of the file; "
                                      f"it is truncated, re-download it")
            self._info[name] = (file, meta["dtype"], tuple(meta["shape"]), base + begin,
                                end - begin)

    def names(self) -> list[str]:
        return list(self._info)

    def where(self, name: str) -> str:
        return str(self._info[name][0]) if name in self._info else str(self.folder)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._info[name][2]

    def get(self, name: str) -> np.ndarray:
        file, dtype, shape, offset, nbytes = self._info[name]
        if dtype not in _DTYPES:
            raise CheckpointError(f"{file}: tensor {name!r} has unsupported dtype {dtype}")
        out = np.empty(shape, _DTYPES[dtype])
        if out.nbytes != nbytes:
            raise CheckpointError(f"{file}: tensor {name!r} has {nbytes} bytes, expected "
                                  f"{out.nbytes} for {dtype} {list(shape)}")
        view = memoryview(out.reshape(-1).view(np.uint8))
        fd = os.open(file, os.O_RDONLY)
        try:
            done = 0
            while done < nbytes:
                got = os.preadv(fd, [view[done:]], offset + done)
                if got <= 0:
                    raise CheckpointError(f"{file}: tensor {name!r} is cut short; re-download it")
                done += got
        finally:
            os.close(fd)
        return out

    def __call__(self, name: str) -> np.ndarray:  # medsiglip's "callable name -> array"
        return self.get(name)


def is_multimodal(path: str | Path) -> bool:
    """A Gemma3ForConditionalGeneration folder (``vision_config`` in config.json) or an Orbax
    folder saved by :func:`save_multimodal`."""
    path = Path(path)
    if not path.is_dir():
        return False
    if orbax_io.is_orbax(path):
        return orbax_io.read_meta(path).get("kind") == KIND
    cfg = path / "config.json"
    if not cfg.is_file():
        return False
    try:
        return "vision_config" in json.loads(cfg.read_text())
    except (OSError, ValueError):
        return False


def read_multimodal_config(path: str | Path) -> MultimodalConfig:
    path = Path(path)
    raw = orbax_io.read_meta(path)["config"] if orbax_io.is_orbax(path) else read_config(path)
    try:
        return MultimodalConfig.from_hf_dict(raw)
    except ValueError as exc:
        raise CheckpointError(f"{path / 'config.json'}: {exc}") from None


def _projector_specs(cfg: MultimodalConfig) -> list[TensorSpec]:
    dv, d = cfg.vision.hidden_size, cfg.text.hidden_size
    return [TensorSpec(_NORM, ("norm", "scale"), (dv,), lambda x: x),
            TensorSpec(_PROJ, ("weight",), (dv, d), lambda x: x)]


def load_multimodal(path: str | Path, *, dtype: Any = "float32") -> Gemma3Multimodal:
    """Load the image-text model from a Hugging Face folder or one of our Orbax folders."""
    dtype = resolve_dtype(dtype)
    path = Path(path)
    cfg = read_multimodal_config(path)
    abstract = nnx.eval_shape(lambda: Gemma3Multimodal(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    if orbax_io.is_orbax(path):
        return orbax_io.restore(abstract, path)
    import medsiglip

    src = PreadSource(path)
    names = src.names()
    describe = os.fspath(path)
    prefix = find_prefix(names, TEXT_PREFIXES)
    if prefix is None:
        raise CheckpointError(f"{path}: no Gemma 3 text weights (embed_tokens.weight) found; is "
                              f"this a Gemma 3 image-text checkpoint?")
    decoder = fill(abstract.decoder, src, text_specs(cfg.text), prefix, dtype, describe)
    pprefix = find_prefix(names, PROJECTOR_PREFIXES, anchor=_PROJ)
    if pprefix is None:
        raise CheckpointError(f"{describe}: tensor 'multi_modal_projector.{_PROJ}' is missing "
                              f"(looked under {', '.join(PROJECTOR_PREFIXES)}); the checkpoint "
                              f"is incomplete, re-download it")
    try:
        vision = medsiglip.load_vision_tower_from_tensors(cfg.vision, src, names, dtype=dtype)
    except (KeyError, ValueError) as exc:
        msg = exc.args[0] if exc.args else exc
        raise CheckpointError(f"{describe}: vision tower: {msg}") from None
    projector = fill(abstract.projector, src, _projector_specs(cfg), pprefix, dtype, describe)
    model = abstract
    model.decoder, model.vision, model.projector = decoder, vision, projector
    return model


def save_multimodal(model: Gemma3Multimodal, folder: str | Path, *, tokenizer: Any = None) -> Path:
    """Save the whole image-text model with Orbax (restorable by :func:`load_multimodal` and
    ``medgemma_core.load``); with ``tokenizer``, its ``tokenizer.model`` and added tokens too."""
    folder = orbax_io.save(model, folder, config=model.config.to_hf_dict(), kind=KIND)
    # config.json too, so that Processor.from_checkpoint(folder) reads the sizes
    (folder / "config.json").write_text(json.dumps(model.config.to_hf_dict(), indent=1))
    if tokenizer is not None:
        tokenizer.save(folder)
        decoder = {str(i): {"content": t, "special": i in tokenizer.special_ids}
                   for i, t in tokenizer.added_tokens.items()}
        (folder / "tokenizer_config.json").write_text(
            json.dumps({"added_tokens_decoder": decoder}, indent=1))
    return folder
