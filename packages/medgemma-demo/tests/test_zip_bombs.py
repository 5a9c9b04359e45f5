"""Zip bombs are refused before anything large is written or allocated.

Each zip is unpacked in a child process that reports its peak resident memory
(``VmHWM``) and what it wrote: the refusal must be an :class:`UploadError`, nothing past
the limit reaches the disk, and the child's peak stays under 500 MB.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

MB = 1024 * 1024
RSS_LIMIT_MB = 500
MAX_BYTES = MB  # the demo's upload limit here; a zip may unpack to UNZIP_FACTOR times that

CHILD = r"""
import json, resource, sys
from pathlib import Path
from medgemma_demo.uploads import UploadError, unpack_zip
path, dest, max_bytes = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
dest.mkdir()
try:
    unpack_zip(path, dest, max_bytes=max_bytes)
    out = {"error": None, "message": ""}
except UploadError as exc:
    out = {"error": "UploadError", "message": str(exc)}
out["written"] = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
# VmHWM: this process image's peak (ru_maxrss would carry the forking parent's over exec)
hwm = [ln for ln in open("/proc/self/status") if ln.startswith("VmHWM:")]
out["peak_mb"] = (int(hwm[0].split()[1]) if hwm else
                  resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024
print(json.dumps(out))
"""


def unpack_in_child(path: Path, tmp_path: Path) -> dict:
    result = subprocess.run([sys.executable, "-c", CHILD, str(path), str(tmp_path / "out"),
                             str(MAX_BYTES)], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _zeros_zip(path: Path, size: int) -> Path:
    """One deflated member of ``size`` zero bytes, streamed (the test never holds it)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf, zf.open("s0.dcm", "w") as f:
        for _ in range(size // MB):
            f.write(bytes(MB))
    return path


def _set_claimed_size(path: Path, size: int) -> None:
    """Overwrite the uncompressed size a zip's (only) member claims, in both headers."""
    data = bytearray(path.read_bytes())
    local = data.index(b"PK\x03\x04")
    data[local + 22:local + 26] = struct.pack("<I", size)
    central = data.index(b"PK\x01\x02")
    data[central + 24:central + 28] = struct.pack("<I", size)
    path.write_bytes(bytes(data))


def assert_refused(out: dict) -> None:
    assert out["error"] == "UploadError", out
    assert out["written"] <= 4 * MAX_BYTES, out
    assert out["peak_mb"] < RSS_LIMIT_MB, f"peak RSS {out['peak_mb']:.0f} MB"


def test_member_claiming_past_the_limit_is_refused_before_writing(tmp_path):
    """A 3 KB zip whose member claims 4 GB: refused on the claim, nothing written."""
    path = _zeros_zip(tmp_path / "claims.zip", 0)
    with zipfile.ZipFile(path, "a") as zf:
        zf.writestr("s1.dcm", b"x" * 3000)
    data = bytearray(path.read_bytes())
    for sig, off in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        at = data.rindex(sig)
        data[at + off:at + off + 4] = struct.pack("<I", 2**32 - 1)
    path.write_bytes(bytes(data))
    out = unpack_in_child(path, tmp_path)
    assert_refused(out)
    assert out["written"] == 0 and "unpacks to" in out["message"], out


def test_member_expanding_past_its_claim_is_cut_at_the_claim(tmp_path):
    """64 MB of zeros deflated to ~64 KB, its headers claiming 1000 bytes: zipfile stops
    at the claim and the CRC check fails; at most the claimed bytes reach the disk."""
    path = _zeros_zip(tmp_path / "expands.zip", 64 * MB)
    assert path.stat().st_size < MB
    _set_claimed_size(path, 1000)
    out = unpack_in_child(path, tmp_path)
    assert_refused(out)
    assert out["written"] <= 1000, out


def test_honest_high_ratio_zip_over_the_limit_is_refused(tmp_path):
    """The same 64 MB claimed truthfully: over 4 x the upload limit, refused on the claim."""
    out = unpack_in_child(_zeros_zip(tmp_path / "honest.zip", 64 * MB), tmp_path)
    assert_refused(out)
    assert out["written"] == 0 and "64 MB" in out["message"], out


def test_zip_of_too_many_members_is_refused(tmp_path):
    path = tmp_path / "many.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for i in range(5001):
            zf.writestr(f"s{i}.dcm", b"")
    out = unpack_in_child(path, tmp_path)
    assert_refused(out)
    assert out["written"] == 0 and "5001 files" in out["message"], out
