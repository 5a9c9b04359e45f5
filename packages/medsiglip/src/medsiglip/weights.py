"""The weights layer: checkpoint tensors -> NNX parameters, and Orbax folders of parameters.

One small module shared by medsiglip's checkpoint code and medgemma-core's (public; see the
package README, "The weights layer"):

* :class:`TensorSource` (Protocol: ``names``, ``shape``, ``get``, ``where``): a checkpoint's
  tensors by name. :class:`SafetensorsSource` reads a Hugging Face folder, one tensor at a
  time and without a memory map; :class:`MappingSource` wraps a dict; :func:`as_source`
  accepts either.
* :class:`TensorSpec` and :func:`fill`: which tensor becomes which parameter, at which stored
  shape, through which conversion. ``fill`` checks every name and shape first, then reads,
  converts, casts and places one tensor at a time, dropping each before the next, so a model
  never exists twice in memory.
* :func:`abstract_module`: a module of ``jax.ShapeDtypeStruct`` leaves, built with no memory
  and no initialization (the target of ``fill`` and ``restore``); :func:`param_count`.
* :func:`save`, :func:`restore`, :func:`read_meta`, :func:`is_saved`: one Orbax folder layout,
  ``weights.json`` (``version``, ``kind``, ``dtype``, ``config``) beside ``params/`` (the
  Orbax ``StandardCheckpointer`` tree of the ``nnx.Param`` values as a plain dict).
* :class:`CheckpointError`: every failure of the above that the user can fix, one line naming
  the file, the tensor and the fix.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

__all__ = [
    "META",
    "CheckpointError",
    "MappingSource",
    "SafetensorsSource",
    "TensorSource",
    "TensorSpec",
    "abstract_module",
    "as_source",
    "fill",
    "is_saved",
    "param_count",
    "read_hf_config",
    "read_meta",
    "restore",
    "save",
]

M = TypeVar("M", bound=nnx.Module)
ParamPath = tuple[str | int, ...]


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: the message names the file, the tensor and the fix."""


# ---- tensor sources --------------------------------------------------------------------------
@runtime_checkable
class TensorSource(Protocol):
    """Read-only access to the tensors of a checkpoint by (Hugging Face) name."""

    def names(self) -> list[str]:
        """Every tensor name the checkpoint holds."""
        ...

    def shape(self, name: str) -> tuple[int, ...]:
        """The stored shape of ``name``, without reading its data."""
        ...

    def get(self, name: str) -> Any:
        """A fresh array (anything ``np.asarray`` takes) holding ``name``."""
        ...

    def where(self, name: str) -> str:
        """The file holding ``name`` (the checkpoint itself when absent), for error messages."""
        ...


class MappingSource:
    """A :class:`TensorSource` over a mapping ``name -> array`` (numpy, ``ml_dtypes.bfloat16``,
    jax or CPU torch arrays: anything ``np.asarray`` takes)."""

    def __init__(self, tensors: Mapping[str, Any], *, label: str = "tensors"):
        self._tensors = tensors
        self._label = label

    def names(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in np.shape(self._tensors[name]))

    def get(self, name: str) -> np.ndarray:
        return np.asarray(self._tensors[name])

    def where(self, name: str) -> str:
        return self._label


def as_source(tensors: TensorSource | Mapping[str, Any]) -> TensorSource:
    """``tensors`` itself when it is a :class:`TensorSource`, a :class:`MappingSource` of a
    mapping."""
    if isinstance(tensors, TensorSource):
        return tensors
    if isinstance(tensors, Mapping):
        return MappingSource(tensors)
    raise TypeError(f"tensors must be a TensorSource (names/shape/get/where) or a mapping "
                    f"name -> array, not {type(tensors).__name__}")


_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
           "BOOL": np.bool_}


class SafetensorsSource:
    """Tensors of a Hugging Face folder (one ``*.safetensors`` file, or shards listed in
    ``model.safetensors.index.json``), read into fresh arrays (unbuffered reads, no mmap).

    The headers are parsed with ``json`` and checked against the file sizes; each ``get``
    allocates one array and fills it from the file, so a loader that converts and drops each
    tensor before the next (:func:`fill`) holds one tensor at a time. A memory map would keep
    every page read resident in this process until it is closed, doubling the peak of a 4B
    load. bfloat16 tensors come back as ``ml_dtypes.bfloat16`` arrays.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.exists():
            try:
                files = sorted({self.folder / f for f in
                                json.loads(index.read_text())["weight_map"].values()})
            except (OSError, ValueError, KeyError, AttributeError, TypeError,
                    RecursionError) as exc:
                raise CheckpointError(f"{index}: not a valid safetensors index ({exc})") from None
        else:
            files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            extra = (" (only pytorch_model.bin: re-save it with safe_serialization=True)"
                     if (self.folder / "pytorch_model.bin").exists() else "")
            raise CheckpointError(
                f"{self.folder}: no *.safetensors files{extra}; pass a Hugging Face model folder "
                f"(config.json + model.safetensors)")
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
                if not isinstance(header, dict):
                    raise ValueError("the header is not a JSON object")
        except (OSError, ValueError, RecursionError) as exc:
            raise CheckpointError(f"{file}: not a readable safetensors file ({exc}); it is "
                                  f"truncated or corrupt, re-download it") from None
        base = 8 + n
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            try:
                begin, end = (int(v) for v in meta["data_offsets"])
                dtype, shape = str(meta["dtype"]), tuple(int(d) for d in meta["shape"])
            except (KeyError, TypeError, ValueError, OverflowError):
                raise CheckpointError(f"{file}: tensor {name!r} has a malformed header entry; "
                                      f"the file is corrupt, re-download it") from None
            if any(d < 0 for d in shape):
                raise CheckpointError(f"{file}: tensor {name!r} has a negative dimension "
                                      f"{list(shape)}; the file is corrupt, re-download it")
            if not 0 <= begin <= end or base + end > size:
                raise CheckpointError(f"{file}: tensor {name!r} runs past the end of the file; "
                                      f"it is truncated, re-download it")
            self._info[name] = (file, dtype, shape, base + begin, end - begin)

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
        want = math.prod(shape) * np.dtype(_DTYPES[dtype]).itemsize
        if want != nbytes:  # checked before allocating: a header may claim any shape
            raise CheckpointError(f"{file}: tensor {name!r} has {nbytes} bytes, expected "
                                  f"{want} for {dtype} {list(shape)}")
        out = np.empty(shape, _DTYPES[dtype])
        view = memoryview(out.reshape(-1).view(np.uint8))
        with open(file, "rb", buffering=0) as f:  # unbuffered reads straight into ``out``
            f.seek(offset)
            done = 0
            while done < nbytes:
                got = f.readinto(view[done:])
                if not got:
                    raise CheckpointError(f"{file}: tensor {name!r} is cut short; re-download it")
                done += got
        return out


def read_hf_config(folder: str | Path) -> dict[str, Any]:
    """The ``config.json`` of a Hugging Face folder as a dict."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder}: no config.json; pass a Hugging Face model folder "
                              f"(config.json + *.safetensors) or an Orbax folder saved by this "
                              f"package")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: holds a JSON {type(config).__name__}, not an object; "
                              "it is not a Hugging Face config.json")
    return config


# ---- tensors -> parameters -------------------------------------------------------------------
def _same(x: np.ndarray) -> np.ndarray:
    return x


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One parameter and where it comes from.

    ``path``: the parameter's path in ``nnx.state(module)`` (e.g. ``("encoder", "layers", 0,
    "mlp", "fc1", "kernel")``). ``name``: the checkpoint tensor (full name, prefix included;
    several specs may read one tensor, which is then read once). ``shape``: the stored shape
    the tensor must have, checked from the header before anything is read; ``None`` when it
    may vary (``convert`` then checks it). ``convert``: stored numpy array -> the parameter's
    layout (e.g. a transpose); the result is checked against the parameter's shape and cast to
    its dtype. ``inverse``: the parameter's layout -> the stored one, bit for bit (the export
    back to the checkpoint format, :mod:`medsiglip.checkpoints.export`); it defaults to the
    identity when ``convert`` is the identity and is ``None`` (not exportable) otherwise. When
    several specs read one tensor, their inverses' results are concatenated along axis 0 in
    spec order (a packed q, k, v ``in_proj``).
    """

    path: ParamPath
    name: str
    shape: tuple[int, ...] | None
    convert: Callable[[np.ndarray], np.ndarray] = _same
    inverse: Callable[[np.ndarray], np.ndarray] | None = None

    def __post_init__(self) -> None:
        if self.inverse is None and self.convert is _same:
            object.__setattr__(self, "inverse", _same)


def fill(abstract: M, source: TensorSource, specs: Iterable[TensorSpec]) -> M:
    """Materialize ``abstract`` (from :func:`abstract_module`) from ``source``.

    Every parameter must have exactly one spec. All names and stored shapes are checked
    before the first read (a :class:`CheckpointError` naming the tensor). Then each tensor is
    read once, converted, cast to its parameter's dtype (the abstract module's, so a model
    built in bfloat16 loads in bfloat16) and checked for NaN/inf before the next is read.
    """
    graphdef, state = nnx.split(abstract)
    flat = dict(nnx.to_flat_state(state))
    by_name: dict[str, list[TensorSpec]] = defaultdict(list)
    for spec in specs:
        if spec.path not in flat:
            raise AssertionError(f"internal: no parameter {spec.path} for tensor {spec.name!r}")
        by_name[spec.name].append(spec)
    unplanned = set(flat) - {s.path for group in by_name.values() for s in group}
    if unplanned:
        raise AssertionError(f"internal: parameters without a source: {sorted(unplanned)[:3]}")
    available = set(source.names())
    missing = [name for name in by_name if name not in available]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(
            f"{source.where(missing[0])}: tensor {missing[0]!r} is missing{more}; the checkpoint "
            f"is incomplete or does not match its config (number of layers, head, name prefix)")
    for name, group in by_name.items():
        stored = tuple(source.shape(name))
        for spec in group:
            if spec.shape is not None and stored != tuple(spec.shape):
                raise CheckpointError(
                    f"{source.where(name)}: tensor {name!r} has shape {list(stored)} but the "
                    f"config expects {list(spec.shape)}; the config and the weights do not match")
    for name, group in by_name.items():
        try:
            raw = np.asarray(source.get(name))
        except CheckpointError:
            raise
        except Exception as exc:  # truncated file, bad data offsets, an unreadable array, ...
            raise CheckpointError(
                f"{source.where(name)}: cannot read tensor {name!r} ({exc}); the file is "
                f"truncated or corrupt, re-download it") from None
        for spec in group:
            var = flat[spec.path]
            value = spec.convert(raw)
            if tuple(np.shape(value)) != tuple(var.shape):
                raise CheckpointError(
                    f"{source.where(name)}: tensor {name!r} has shape {list(raw.shape)}, which "
                    f"gives {list(np.shape(value))} where {list(var.shape)} is expected; the "
                    f"config and the weights do not match")
            value = jnp.asarray(value, dtype=var.dtype)
            if not np.isfinite(np.asarray(jnp.sum(value, dtype=jnp.float32))):
                raise CheckpointError(f"{source.where(name)}: tensor {name!r} holds NaN or inf "
                                      f"values; the file is corrupt, re-download it")
            flat[spec.path] = var.replace(value=value)
            del value
        del raw
    return nnx.merge(graphdef, nnx.from_flat_state(list(flat.items())))


# ---- abstract modules ------------------------------------------------------------------------
class _ConstantRngs:
    """Stands in for ``nnx.Rngs`` when only shapes are wanted: hands out one fixed key.

    Under ``nnx.eval_shape`` every ``nnx.Rngs`` draw updates a counter variable with a tracer,
    which costs ~20 ms per draw in flax 0.12 (about a minute for the two so400m towers);
    initial values are thrown away here, so a constant key is enough.
    """

    def params(self) -> jax.Array:
        return jax.random.key(0)

    __call__ = params


def abstract_module(build: Callable[[Any], M]) -> M:
    """``build(rngs)``'s module with ``jax.ShapeDtypeStruct`` leaves: no memory, no init.

    ``build`` receives a stand-in for ``nnx.Rngs`` (``rngs.params()`` and ``rngs()`` work),
    e.g. ``abstract_module(lambda rngs: VisionTower(config, dtype=jnp.bfloat16, rngs=rngs))``.
    """
    return nnx.eval_shape(lambda: build(_ConstantRngs()))


def param_count(build: Callable[[Any], nnx.Module]) -> int:
    """Parameters of the module ``build(rngs)`` makes, counted with no memory."""
    state = nnx.state(abstract_module(build), nnx.Param)
    return int(sum(np.prod(x.shape, dtype=np.int64) for x in jax.tree.leaves(state)))


# ---- Orbax folders ---------------------------------------------------------------------------
META = "weights.json"
_PARAMS = "params"
_VERSION = 1
# The layouts before this module (one per package): recognized only to say what to do.
_OLD_META = {"medsiglip.json": "medsiglip 0.1", "medgemma.json": "medgemma-core 0.1"}


def _main_dtype(params: Any) -> str:
    """The dtype most parameter elements have (a bfloat16 SigLIP keeps float32 logit scalars)."""
    counts: dict[str, int] = defaultdict(int)
    for x in jax.tree.leaves(params):
        counts[jnp.dtype(x.dtype).name] += int(np.prod(x.shape, dtype=np.int64))
    return max(counts, key=counts.__getitem__) if counts else "float32"


def save(model: nnx.Module, folder: str | Path, *, kind: str, config: Mapping[str, Any],
         overwrite: bool = False) -> Path:
    """Write ``folder/params`` (Orbax, the ``nnx.Param`` values) and ``folder/weights.json``
    (``kind``, the dtype most parameters have, and ``config``, a JSON-able dict).

    A non-empty ``folder`` is refused unless ``overwrite``. The meta file is written last, so
    an interrupted save is not mistaken for a saved folder.
    """
    import orbax.checkpoint as ocp

    folder = Path(folder).absolute()
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        raise FileExistsError(f"{folder} is not empty: pass overwrite=True or a new folder")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / META).unlink(missing_ok=True)
    params = nnx.state(model, nnx.Param)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(folder / _PARAMS, nnx.to_pure_dict(params), force=True)
        ckpt.wait_until_finished()
    meta = {"version": _VERSION, "kind": kind, "dtype": _main_dtype(params),
            "config": dict(config)}
    (folder / META).write_text(json.dumps(meta, indent=1))
    return folder


def is_saved(folder: str | Path) -> bool:
    """Whether ``folder`` is an Orbax folder written by :func:`save` (or by the per-package
    layouts before it, which :func:`read_meta` rejects with the fix)."""
    folder = Path(folder)
    if (folder / META).is_file() and (folder / _PARAMS).is_dir():
        return True
    return any((folder / old).is_file() for old in _OLD_META)


def read_meta(folder: str | Path) -> dict[str, Any]:
    """``weights.json`` of a saved folder: ``{"version", "kind", "dtype", "config"}``."""
    folder = Path(folder)
    path = folder / META
    if not path.is_file():
        for old, by in _OLD_META.items():
            if (folder / old).is_file():
                raise CheckpointError(
                    f"{folder}: saved by {by} ({old}), a layout this version does not read; "
                    f"load the original checkpoint and save it again")
        raise CheckpointError(f"{folder}: no {META}; not an Orbax folder saved by this package")
    try:
        meta = json.loads(path.read_text())
        if not isinstance(meta, dict) or not {"kind", "config"} <= meta.keys():
            raise ValueError("kind or config missing")
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable ({exc}); save the model again") from None
    if meta.get("version", _VERSION) > _VERSION:
        raise CheckpointError(f"{path}: layout version {meta['version']} is newer than this "
                              f"package reads ({_VERSION}); upgrade it")
    return meta


def restore(abstract: M, folder: str | Path) -> M:
    """The parameters :func:`save` wrote, restored into ``abstract`` (from
    :func:`abstract_module`), in ``abstract``'s dtypes."""
    import orbax.checkpoint as ocp

    folder = Path(folder).absolute()
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    # Every process reads the whole array onto its first local device: without a sharding
    # Orbax would restore the saving process's topology, which fails in a run of several
    # processes ("Topology mismatch"); the trainer shards the parameters afterwards.
    local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=local),
                          nnx.to_pure_dict(params))
    try:
        with ocp.StandardCheckpointer() as ckpt:
            restored = ckpt.restore(folder / _PARAMS, target)
    except Exception as exc:  # noqa: BLE001 - Orbax raises many kinds; all mean the same here
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise CheckpointError(
            f"{folder / _PARAMS}: cannot restore the Orbax checkpoint ({type(exc).__name__}: "
            f"{first}); it does not match {META}'s config or is incomplete") from None
    nnx.replace_by_pure_dict(params, restored)
    return nnx.merge(graphdef, params, rest)
