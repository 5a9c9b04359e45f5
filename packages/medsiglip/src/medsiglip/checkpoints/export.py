"""NNX parameters -> Hugging Face folders (``config.json`` + safetensors shards + index).

The inverse of :func:`medsiglip.weights.fill`: the same :class:`~medsiglip.weights.TensorSpec`
tables, read backwards through each spec's ``inverse``. Tensors are written in the model's
dtypes (bfloat16 as ``BF16``), one at a time, straight into the files (no copy of the whole
model, no safetensors or torch import), in shards of at most ``max_shard_size`` bytes with a
``model.safetensors.index.json`` when there is more than one, as transformers'
``save_pretrained`` writes them.

Generic parts (used by medgemma-core's export too): :func:`plan_tensors`,
:func:`write_safetensors`, :func:`parse_size`, :func:`copy_files`. SigLIP's:
:func:`save_hf` for a two-tower :class:`~medsiglip.model.SiglipModel` (``SiglipModel`` names,
the MAP head's packed ``in_proj``) or a :class:`~medsiglip.vision.VisionTower`
(``SiglipVisionModel``, the names transformers 5 writes: no ``vision_model.`` prefix).
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from medsiglip.checkpoints.convert import text_specs, vision_specs
from medsiglip.model import SiglipModel
from medsiglip.vision import VisionTower
from medsiglip.weights import TensorSpec

__all__ = ["INDEX", "SIGLIP_FILES", "HFTensor", "cast", "convert_checkpoint", "copy_files",
           "dtype_name", "load_any", "parse_size", "plan_tensors", "prepare_folder", "save_hf",
           "siglip_specs", "write_safetensors"]

INDEX = "model.safetensors.index.json"
#: Tokenizer and processor files of a SigLIP folder, copied from the source when present.
SIGLIP_FILES = ("spiece.model", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "preprocessor_config.json", "processor_config.json")

_CODES = {np.dtype(np.float64): "F64", np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
          np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(np.int64): "I64",
          np.dtype(np.int32): "I32", np.dtype(np.int16): "I16", np.dtype(np.int8): "I8",
          np.dtype(np.uint8): "U8", np.dtype(np.bool_): "BOOL"}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes of ``5_000_000_000``, ``"5GB"`` (10^9, as transformers reads it), ``"100KiB"``..."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*", str(size), re.IGNORECASE)
        unit = m.group(2).upper() if m else None
        if m is None or unit not in _UNITS:
            raise ValueError(f"max_shard_size {size!r}: give bytes or a size like '5GB', "
                             f"'500MB' or '2GiB'")
        value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ValueError(f"max_shard_size {size!r} must be positive")
    return value


@dataclasses.dataclass(frozen=True)
class HFTensor:
    """One tensor to write: its name, stored shape and dtype, and how to make it."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    make: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def plan_tensors(model: nnx.Module, specs: Iterable[TensorSpec]) -> list[HFTensor]:
    """The checkpoint tensors of ``model`` through ``specs`` (paths into ``nnx.state(model)``),
    in the parameters' dtypes. Every parameter must be covered by exactly one spec with an
    inverse (LoRA adapters must be merged: their parameters are then left out); a tensor several specs read (a packed ``in_proj``) is their inverses' results
    concatenated along axis 0. Nothing is computed until each tensor's ``make()``."""
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    lora = [path for path, var in flat.items() if isinstance(var, nnx.LoRAParam)]
    if lora:  # merged adapters are already in the base weights; unmerged ones have no place
        from medsiglip.lora import adapters

        unmerged = [path for path, _, _, adapter in adapters(model) if not adapter.merged]
        if unmerged:
            raise ValueError(f"the model carries {len(unmerged)} unmerged LoRA adapters (e.g. "
                             f"{unmerged[0]}): fold them into the base weights with "
                             f"medsiglip.lora.merge_lora(model) first, or export them alone as "
                             f"a PEFT adapter")
        for path in lora:
            del flat[path]
    groups: dict[str, list[TensorSpec]] = {}
    for spec in specs:
        if spec.path not in flat:
            raise AssertionError(f"internal: no parameter {spec.path} for tensor {spec.name!r}")
        if spec.inverse is None:
            raise AssertionError(f"internal: tensor {spec.name!r} has no inverse conversion")
        groups.setdefault(spec.name, []).append(spec)
    covered = {s.path for group in groups.values() for s in group}
    extra = sorted((p for p in flat if p not in covered), key=str)
    if extra:
        path = "/".join(str(k) for k in extra[0])
        hint = (" (LoRA adapters: merge them into the base weights first, or export them as a "
                "PEFT adapter)" if any("lora" in str(k).lower() for p in extra for k in p)
                else "")
        raise ValueError(f"parameter {path} (and {len(extra) - 1} more) has no place in the "
                         f"Hugging Face layout{hint}")
    out = []
    for name, group in groups.items():
        dtypes = {np.dtype(flat[s.path].get_value().dtype) for s in group}
        if len(dtypes) != 1:
            raise AssertionError(f"internal: tensor {name!r} gathers parameters of dtypes "
                                 f"{sorted(map(str, dtypes))}")
        dtype = dtypes.pop()
        if dtype not in _CODES:
            raise ValueError(f"tensor {name!r}: dtype {dtype} has no safetensors code")
        first = group[0]
        shape = first.shape if first.shape is not None else tuple(flat[first.path].get_value().shape)

        def make(group=group, name=name, shape=shape) -> np.ndarray:
            parts = [s.inverse(np.asarray(flat[s.path].get_value())) for s in group]
            value = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
            if tuple(value.shape) != tuple(shape):
                raise AssertionError(f"internal: tensor {name!r} comes out {list(value.shape)}, "
                                     f"expected {list(shape)}")
            return np.ascontiguousarray(value)

        out.append(HFTensor(name, tuple(int(d) for d in shape), dtype, make))
    return out


def _shards(tensors: Sequence[HFTensor], limit: int) -> list[list[HFTensor]]:
    """Tensors in name order, cut into consecutive groups of at most ``limit`` bytes (a tensor
    larger than ``limit`` gets a shard of its own, as transformers does)."""
    shards: list[list[HFTensor]] = [[]]
    size = 0
    for t in sorted(tensors, key=lambda t: t.name):
        if shards[-1] and size + t.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def _write_file(path: Path, tensors: Sequence[HFTensor], progress: Callable[[str], None] | None
                ) -> None:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": _CODES[t.dtype], "shape": list(t.shape),
                          "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for t in tensors:
            value = t.make()
            if value.dtype != t.dtype:
                raise AssertionError(f"internal: tensor {t.name!r} is {value.dtype}, not {t.dtype}")
            f.write(memoryview(value.reshape(-1).view(np.uint8)))
            del value
            if progress is not None:
                progress(t.name)


def write_safetensors(folder: str | Path, tensors: Sequence[HFTensor], *,
                      max_shard_size: int | str = "5GB",
                      progress: Callable[[str], None] | None = None) -> list[Path]:
    """Write ``tensors`` as ``model.safetensors`` or, past ``max_shard_size``, as
    ``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json``. Returns the
    files written. ``progress(name)`` is called after each tensor."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for old in [*folder.glob("model*.safetensors"), folder / INDEX]:
        old.unlink(missing_ok=True)  # a stale shard would be read with the new ones
    shards = _shards(tensors, parse_size(max_shard_size))
    if len(shards) == 1:
        _write_file(folder / "model.safetensors", shards[0], progress)
        return [folder / "model.safetensors"]
    files, weight_map = [], {}
    for i, shard in enumerate(shards):
        file = folder / f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _write_file(file, shard, progress)
        files.append(file)
        weight_map.update({t.name: file.name for t in shard})
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors),
                          "total_parameters": sum(int(np.prod(t.shape, dtype=np.int64))
                                                  for t in tensors)},
             "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return files


def copy_files(source: str | Path | None, folder: Path, names: Iterable[str]) -> list[str]:
    """Copy those of ``names`` that exist in the folder ``source`` into ``folder``; returns the
    names copied."""
    if source is None or not Path(source).is_dir() or Path(source).resolve() == folder.resolve():
        return []
    copied = []
    for name in names:
        src = Path(source) / name
        if src.is_file():
            shutil.copyfile(src, folder / name)
            copied.append(name)
    return copied


def prepare_folder(folder: str | Path, overwrite: bool) -> Path:
    """``folder``, created; a non-empty one is refused unless ``overwrite``."""
    folder = Path(folder)
    if folder.is_file():
        raise FileExistsError(f"{folder} is a file; pass a folder to write the checkpoint into")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise FileExistsError(f"{folder} is not empty: pass overwrite=True (--overwrite) or a "
                              f"new folder")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def dtype_name(model: nnx.Module) -> str:
    """The dtype most parameter elements have (``config.json``'s ``dtype``)."""
    counts: dict[str, int] = {}
    for var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = var[1].get_value()
        name = jnp.dtype(value.dtype).name
        counts[name] = counts.get(name, 0) + int(np.prod(value.shape, dtype=np.int64))
    return max(counts, key=counts.__getitem__) if counts else "float32"


def _prefixed(specs: Iterable[TensorSpec], path: tuple[str, ...]) -> list[TensorSpec]:
    return [dataclasses.replace(s, path=path + s.path) for s in specs]


def siglip_specs(model: SiglipModel | VisionTower) -> list[TensorSpec]:
    """The specs of a two-tower model (``SiglipModel`` names) or a vision tower
    (``SiglipVisionModel`` names as transformers 5 writes them: no prefix)."""
    if isinstance(model, SiglipModel):
        cfg = model.config
        specs = _prefixed(vision_specs(cfg.vision, "vision_model."), ("vision",))
        specs += _prefixed(text_specs(cfg.text), ("text",))
        return specs + [TensorSpec(("logit_scale",), "logit_scale", (1,)),
                        TensorSpec(("logit_bias",), "logit_bias", (1,))]
    if isinstance(model, VisionTower):
        return vision_specs(model.config, "")
    raise TypeError(f"cannot export a {type(model).__name__}: pass a SiglipModel or VisionTower")


def save_hf(model: SiglipModel | VisionTower, folder: str | Path, *,
            source: str | Path | None = None, max_shard_size: int | str = "5GB",
            overwrite: bool = False, progress: Callable[[str], None] | None = None) -> Path:
    """Write ``model`` as a Hugging Face folder that ``transformers.SiglipModel`` (or
    ``SiglipVisionModel`` for a vision tower) loads with ``from_pretrained``: ``config.json``,
    safetensors shards of at most ``max_shard_size`` (+ index), and the tokenizer and processor
    files (:data:`SIGLIP_FILES`) copied from the folder ``source`` when given."""
    specs = siglip_specs(model)
    folder = prepare_folder(folder, overwrite)
    if isinstance(model, SiglipModel):
        config = dict(model.config.to_hf_dict(), architectures=["SiglipModel"])
        config["vision_config"] = dict(config["vision_config"], model_type="siglip_vision_model")
        config["text_config"] = dict(config["text_config"], model_type="siglip_text_model")
    else:
        config = dict(model.config.to_hf_dict(), architectures=["SiglipVisionModel"],
                      model_type="siglip_vision_model")
    config["dtype"] = dtype_name(model)
    write_safetensors(folder, plan_tensors(model, specs), max_shard_size=max_shard_size,
                      progress=progress)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    copy_files(source, folder, SIGLIP_FILES)
    return folder


def load_any(source: str | Path, dtype: str = "auto") -> SiglipModel | VisionTower:
    """A two-tower model or a vision tower from any folder medsiglip reads (HF ``siglip``,
    ``siglip_vision_model``, a Gemma 3 image-text folder's tower, an Orbax folder), in
    ``dtype`` (``auto``: the source's)."""
    from medsiglip import weights
    from medsiglip.checkpoints.hf import load_siglip, load_vision_tower
    from medsiglip.checkpoints.orbax_io import restore_checkpoint

    source = Path(source)
    if not source.is_dir():
        raise FileNotFoundError(f"{source}: no such checkpoint folder; pass a Hugging Face "
                                f"SigLIP folder or an Orbax folder saved by medsiglip")
    if weights.is_saved(source):
        model = restore_checkpoint(source)
        if dtype != "auto":
            model = cast(model, dtype)
        return model
    raw = weights.read_hf_config(source)
    want = jnp.dtype(dtype if dtype != "auto" else _hf_dtype(raw))
    if raw.get("model_type") == "siglip":
        return load_siglip(source, dtype=want)
    return load_vision_tower(source, dtype=want)


def _hf_dtype(raw: dict[str, Any]) -> str:
    name = raw.get("dtype") or raw.get("torch_dtype") or "float32"
    return "bfloat16" if name == "bfloat16" else "float32"


def cast(model: nnx.Module, dtype: str) -> nnx.Module:
    """``model`` with its floating parameters in ``dtype`` (SiglipModel's ``logit_scale`` and
    ``logit_bias`` stay float32, as a model built in that dtype has them)."""
    want = jnp.dtype(dtype)
    graphdef, state = nnx.split(model)
    flat = dict(nnx.to_flat_state(state))
    for path, var in flat.items():
        keep = path in (("logit_scale",), ("logit_bias",))
        if isinstance(var, nnx.Param) and not keep and jnp.issubdtype(var.dtype, jnp.floating):
            flat[path] = var.replace(value=jnp.asarray(var.get_value(), want))
    return nnx.merge(graphdef, nnx.from_flat_state(list(flat.items())))


def convert_checkpoint(source: str | Path, out: str | Path, *, to: str, dtype: str = "auto",
                       max_shard_size: int | str = "5GB", overwrite: bool = False,
                       quiet: bool = False) -> dict[str, Any]:
    """``medsiglip convert``: load ``source`` (:func:`load_any`), write ``out`` as a Hugging
    Face folder (``to="hf"``) or an Orbax folder (``to="orbax"``, with ``spiece.model``).
    Progress goes to stderr unless ``quiet``. Returns a JSON-able summary."""
    import sys

    from medsiglip.checkpoints.orbax_io import save_checkpoint

    if to not in ("hf", "orbax"):
        raise ValueError(f"--to {to!r}: use hf or orbax")
    parse_size(max_shard_size)
    out = Path(out)
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} is not empty: pass --overwrite or a new folder")
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    say(f"reading {source}")
    model = load_any(source, dtype)
    kind = "siglip" if isinstance(model, SiglipModel) else "vision"
    if to == "hf":
        total = len(plan_tensors(model, siglip_specs(model)))
        done = [0]

        def progress(name: str) -> None:
            done[0] += 1
            if not quiet:
                print(f"\rwriting tensors {done[0]}/{total}", end="", file=sys.stderr)

        save_hf(model, out, source=source, max_shard_size=max_shard_size, overwrite=True,
                progress=progress)
        say("")
    else:
        spiece = Path(source) / "spiece.model"
        save_checkpoint(model, out, tokenizer_file=spiece if spiece.is_file() else None,
                        overwrite=True)
        copy_files(source, out, [n for n in SIGLIP_FILES if n != "spiece.model"])
    say(f"wrote {out}")
    return {"converted": str(source), "to": to, "out": str(out), "kind": kind,
            "dtype": dtype_name(model)}
