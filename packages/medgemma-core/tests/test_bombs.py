"""Checkpoint headers that claim more than their file holds are refused before allocating.

Each file is small and read in a child process that reports its peak resident memory
(``VmHWM``): the refusal must be a ``CheckpointError`` (``ValueError`` for the tokenizer)
and the child's peak stays under 500 MB. Honouring any of these claims would need terabytes.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

RSS_LIMIT_MB = 500

CHILD = r"""
import json, resource, sys
from pathlib import Path
kind, path = sys.argv[1], Path(sys.argv[2])
try:
    if kind == "tokenizer":
        from medgemma_core.tokenizer import Tokenizer
        Tokenizer.from_checkpoint(path)
    else:
        from medgemma_core.checkpoints import text_source
        src, _, _ = text_source(path)
        for name in src.names():
            src.get(name)
    out = {"error": None, "message": ""}
except ValueError as exc:  # CheckpointError is one
    out = {"error": type(exc).__name__, "message": str(exc)}
# VmHWM: this process image's peak (ru_maxrss would carry the forking parent's over exec)
hwm = [ln for ln in open("/proc/self/status") if ln.startswith("VmHWM:")]
out["peak_mb"] = (int(hwm[0].split()[1]) if hwm else
                  resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024
print(json.dumps(out))
"""


def read_in_child(kind: str, path: Path) -> dict:
    result = subprocess.run([sys.executable, "-c", CHILD, kind, str(path)], capture_output=True,
                            text=True, timeout=300,
                            env={**os.environ, "PYTHONWARNINGS": "ignore", "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def assert_refused(out: dict, error: str = "CheckpointError") -> None:
    assert out["error"] == error, out
    assert out["peak_mb"] < RSS_LIMIT_MB, f"peak RSS {out['peak_mb']:.0f} MB"


# ---- GGUF -----------------------------------------------------------------------------------

def _gguf_string(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def gguf_claiming(path: Path, *, n_tensors: int = 0, kv: bytes = b"", n_kv: int = 0,
                  tail: bytes = b"") -> Path:
    """A GGUF v3 header (magic, version, counts), its key-value bytes and ``tail``."""
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + kv + tail)
    return path


ARCH = _gguf_string("general.architecture") + struct.pack("<I", 8) + _gguf_string("gemma3")


@pytest.mark.parametrize("item", [0, 8, 9], ids=["uint8", "string", "array"])
def test_gguf_array_claiming_1e12_elements_is_refused(tmp_path, item):
    """tokenizer.ggml.tokens claiming 10^12 elements (kept as a list by the tokenizer)."""
    kv = ARCH + _gguf_string("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, item, 10**12)
    path = gguf_claiming(tmp_path / "bomb.gguf", n_kv=2, kv=kv, tail=bytes(64))
    for kind in ("tokenizer", "checkpoint"):
        out = read_in_child(kind, path)
        assert_refused(out, "ValueError" if kind == "tokenizer" else "CheckpointError")
        assert "1000000000000 array elements" in out["message"], out


def test_gguf_claiming_1e12_tensors_or_dimensions_is_refused(tmp_path):
    assert_refused(read_in_child("checkpoint", gguf_claiming(
        tmp_path / "tensors.gguf", n_tensors=10**12, n_kv=1, kv=ARCH, tail=bytes(64))))
    tensor = _gguf_string("token_embd.weight") + struct.pack("<I", 2**31) + bytes(64)
    out = read_in_child("checkpoint", gguf_claiming(tmp_path / "dims.gguf", n_tensors=1,
                                                    n_kv=1, kv=ARCH, tail=tensor))
    assert_refused(out)
    assert "dimensions" in out["message"], out


def test_gguf_tensor_claiming_1e12_values_is_refused(tmp_path):
    """One F32 tensor of 10^6 x 10^6 values whose data would lie past the end of the file."""
    arch_keys = [("gemma3.block_count", 1), ("gemma3.embedding_length", 8),
                 ("gemma3.attention.head_count", 2), ("gemma3.feed_forward_length", 16)]
    kv = ARCH + b"".join(_gguf_string(k) + struct.pack("<II", 4, v) for k, v in arch_keys)
    tensor = (_gguf_string("token_embd.weight") + struct.pack("<I", 2)
              + struct.pack("<QQ", 10**6, 10**6) + struct.pack("<IQ", 0, 0))
    out = read_in_child("checkpoint", gguf_claiming(tmp_path / "big.gguf", n_tensors=1,
                                                    n_kv=1 + len(arch_keys), kv=kv,
                                                    tail=tensor + bytes(64)))
    assert_refused(out)
    assert "data ends at byte" in out["message"], out


# ---- safetensors ----------------------------------------------------------------------------

def safetensors_folder(folder: Path, header: dict, data: bytes) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gemma3_text"}))
    raw = json.dumps(header).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return folder


def test_safetensors_offsets_past_the_file_are_refused(tmp_path):
    header = {"model.embed_tokens.weight": {"dtype": "F32", "shape": [10**6, 10**6],
                                            "data_offsets": [0, 4 * 10**12]}}
    out = read_in_child("checkpoint", safetensors_folder(tmp_path / "past", header, bytes(64)))
    assert_refused(out)
    assert "runs past the end of the file" in out["message"], out


def test_safetensors_shape_claiming_more_than_its_bytes_is_refused(tmp_path):
    """Offsets inside the file, but a shape of 10^12 values: refused before np.empty."""
    header = {"model.embed_tokens.weight": {"dtype": "F32", "shape": [10**6, 10**6],
                                            "data_offsets": [0, 64]}}
    out = read_in_child("checkpoint", safetensors_folder(tmp_path / "shape", header, bytes(64)))
    assert_refused(out)
    assert "has 64 bytes, expected 4000000000000" in out["message"], out


def test_safetensors_header_length_past_the_file_is_refused(tmp_path):
    folder = tmp_path / "len"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", 2**62) + b"{}")
    out = read_in_child("checkpoint", folder)
    assert_refused(out)
    assert "does not fit the file" in out["message"], out
