"""Hugging Face folders: ``config.json`` + ``model*.safetensors`` (sharded with an index)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from .build import CheckpointError

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
           "BOOL": np.bool_}


class SafetensorsSource:
    """Tensors of a Hugging Face folder (one file, or shards listed in
    ``model.safetensors.index.json``), read into fresh arrays (unbuffered file reads, no mmap).

    Implements the :class:`~.build.TensorSource` protocol. The headers are parsed with ``json``
    and checked against the file sizes; each ``get`` allocates one array and fills it from the
    file, so a loader that converts and drops each tensor before the next holds one tensor at a
    time (a memory map would keep every page read resident in this process until closed).
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
            raise CheckpointError(
                f"{self.folder}: no *.safetensors files; pass a Hugging Face model folder "
                f"(config.json + model.safetensors) or a .gguf file")
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
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{file}: not a readable safetensors file ({exc}); it is "
                                  f"truncated or corrupt, re-download it") from None
        base = 8 + n
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            try:
                begin, end = (int(v) for v in meta["data_offsets"])
                dtype, shape = str(meta["dtype"]), tuple(int(d) for d in meta["shape"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{file}: tensor {name!r} has a malformed header entry; "
                                      f"the file is corrupt, re-download it") from None
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
        out = np.empty(shape, _DTYPES[dtype])
        if out.nbytes != nbytes:
            raise CheckpointError(f"{file}: tensor {name!r} has {nbytes} bytes, expected "
                                  f"{out.nbytes} for {dtype} {list(shape)}")
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

    def __call__(self, name: str) -> np.ndarray:  # medsiglip's "callable name -> array"
        return self.get(name)


def read_config(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / "config.json"
    if not path.exists():
        raise CheckpointError(f"{path}: missing; a Hugging Face model folder needs its config.json")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
