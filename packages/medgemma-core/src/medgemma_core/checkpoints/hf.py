"""Hugging Face folders: ``config.json`` + ``model*.safetensors`` (sharded with an index)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import safe_open

from .build import CheckpointError


class SafetensorsSource:
    """Tensors of a Hugging Face folder (one file, or shards listed in
    ``model.safetensors.index.json``), opened lazily; each ``get`` reads one tensor."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        self._where: dict[str, Path] = {}
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError) as exc:
                raise CheckpointError(f"{index}: not a valid safetensors index ({exc})") from None
            files = sorted({self.folder / f for f in weight_map.values()})
        else:
            files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise CheckpointError(
                f"{self.folder}: no *.safetensors files; pass a Hugging Face model folder "
                f"(config.json + model.safetensors) or a .gguf file")
        self._handles: dict[Path, Any] = {}
        for file in files:
            if not file.exists():
                raise CheckpointError(f"{file}: listed in the index but missing; re-download it")
            for name in self._open(file).keys():
                self._where[name] = file

    def _open(self, file: Path):
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(str(file), framework="flax")
            except Exception as exc:
                raise CheckpointError(
                    f"{file}: not a readable safetensors file ({exc}); it is truncated or "
                    f"corrupt, re-download it") from None
        return self._handles[file]

    def names(self) -> list[str]:
        return list(self._where)

    def where(self, name: str) -> str:
        return str(self._where.get(name, self.folder))

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._open(self._where[name]).get_slice(name).get_shape())

    def get(self, name: str):
        return self._open(self._where[name]).get_tensor(name)


def read_config(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / "config.json"
    if not path.exists():
        raise CheckpointError(f"{path}: missing; a Hugging Face model folder needs its config.json")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
