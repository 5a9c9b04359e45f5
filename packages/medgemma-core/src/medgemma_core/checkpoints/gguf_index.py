"""A fast index of a GGUF file: metadata scalars and tensor locations, read from the header.

The ``gguf`` package's ``GGUFReader`` builds a numpy view for each of the 262,144 vocabulary
strings of a Gemma file (over ten seconds); loading weights needs only the scalar metadata and
the tensor table, so this walk skips the arrays' contents. Dequantization stays with ``gguf``.
"""

from __future__ import annotations

import dataclasses
import math
import mmap
import struct
from pathlib import Path
from typing import Any

import numpy as np

_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
           10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    dims: tuple[int, ...]  # GGUF order: innermost (contiguous) first
    qtype: int
    offset: int  # absolute offset in the file

    @property
    def shape(self) -> tuple[int, ...]:
        """numpy order ([out, in] for a matrix)."""
        return tuple(reversed(self.dims))


class GGUFIndex:
    """Metadata and the tensor table of a GGUF file, memory-mapped.

    Array values are read (as lists) only for keys starting with one of ``keep_arrays``
    (e.g. ``("tokenizer.",)``), otherwise skipped.
    """

    def __init__(self, path: str | Path, *, keep_arrays: tuple[str, ...] = ()):
        self.path = Path(path)
        self._keep = keep_arrays
        with open(self.path, "rb") as f:
            if not f.read(4):
                raise ValueError("empty file, not a GGUF file")
            self._buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            self._parse()
        except (struct.error, IndexError, UnicodeDecodeError, OverflowError, TypeError,
                RecursionError) as exc:
            raise ValueError(f"truncated or corrupt GGUF header ({exc})") from None

    def _parse(self) -> None:
        buf = self._buf
        if buf[:4] != b"GGUF":
            raise ValueError("not a GGUF file (no GGUF magic bytes)")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
        if version & 0xFFFF == 0:
            raise ValueError("a big-endian GGUF file; convert it to little-endian")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version}; versions 2 and 3 are supported")
        pos = 24
        self._fits(n_kv, 12, pos, "metadata entries")  # each at least a key length and a type
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key, pos = self._string(pos)
            (kind,) = struct.unpack_from("<I", buf, pos)
            value, pos = self._value(kind, pos + 4, key.startswith(self._keep) if self._keep
                                     else False)
            if value is not None:
                self.metadata[key] = value
        infos = []
        self._fits(n_tensors, 24, pos, "tensors")
        for _ in range(n_tensors):
            name, pos = self._string(pos)
            (n_dims,) = struct.unpack_from("<I", buf, pos)
            self._fits(n_dims, 8, pos + 4, "dimensions")
            dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
            qtype, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
            pos += 4 + 8 * n_dims + 12
            infos.append((name, tuple(int(d) for d in dims), qtype, offset))
        align = int(self.metadata.get("general.alignment", 32))
        if align < 1:
            raise ValueError(f"general.alignment is {align}")
        start = (pos + align - 1) // align * align
        self.tensors = {n: TensorInfo(n, d, q, start + o) for n, d, q, o in infos}

    def _fits(self, count: int, size: int, at: int, what: str) -> None:
        """Refuse ``count`` items of at least ``size`` bytes from ``at`` on when the file cannot
        hold them: a header may claim any count (10^12 array elements), and nothing is
        allocated or walked for such a claim."""
        if count * size > len(self._buf) - at:
            raise ValueError(f"truncated or corrupt GGUF header (it claims {count} {what} "
                             f"from byte {at}, more than the {len(self._buf)}-byte file holds)")

    def _string(self, at: int) -> tuple[str, int]:
        (n,) = struct.unpack_from("<Q", self._buf, at)
        self._fits(n, 1, at + 8, "bytes of a string")
        return self._buf[at + 8: at + 8 + n].decode("utf-8"), at + 8 + n

    def _value(self, kind: int, at: int, keep: bool = False) -> tuple[Any, int]:
        if kind in _SCALAR:
            fmt = _SCALAR[kind]
            return struct.unpack_from(fmt, self._buf, at)[0], at + struct.calcsize(fmt)
        if kind == _STRING:
            return self._string(at)
        if kind != _ARRAY:
            raise ValueError(f"unknown GGUF metadata type {kind}")
        item, count = struct.unpack_from("<IQ", self._buf, at)
        at += 12
        if item in _SCALAR:
            fmt = _SCALAR[item]
            self._fits(count, struct.calcsize(fmt), at, "array elements")
            size = struct.calcsize(fmt) * count
            items = list(struct.unpack_from(f"<{count}{fmt[1]}", self._buf, at)) if keep else None
            return items, at + size
        self._fits(count, 8 if item == _STRING else 12, at, "array elements")
        items = []
        for _ in range(count):  # arrays of strings (or nested arrays)
            value, at = self._value(item, at, keep)
            items.append(value)
        return (items if keep else None), at

    def raw(self, info: TensorInfo) -> np.ndarray:
        """The stored bytes of a tensor, shaped as ``gguf.quants.dequantize`` expects."""
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        qtype = GGMLQuantizationType(info.qtype)
        block, size = GGML_QUANT_SIZES[qtype]
        row_bytes = info.dims[0] // block * size
        rows = math.prod(info.dims[1:])
        end = info.offset + rows * row_bytes
        if end > len(self._buf):
            raise ValueError(f"data ends at byte {end} but the file has {len(self._buf)} bytes")
        data = np.frombuffer(self._buf, np.uint8, rows * row_bytes, info.offset)
        if qtype == GGMLQuantizationType.F32:
            return data.view(np.float32).reshape(info.shape)
        if qtype == GGMLQuantizationType.F16:
            return data.view(np.float16).reshape(info.shape)
        return data.reshape(*info.shape[:-1], row_bytes)
