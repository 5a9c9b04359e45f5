"""Decompression and allocation bombs are refused before anything large is allocated.

Each bomb is a small file whose header claims a huge image. It is loaded in a child process,
which reports its peak resident memory (``VmHWM``): the refusal must come as an
``InvalidInputError`` naming the limit, with the child's peak under 500 MB. (Decoding any of
these would need gigabytes: 10^10 pixels, 65535 x 65535 x 10000 frames.)
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from _gen import write_dicom_slice

import medgemma_data
from medgemma_data import InvalidInputError, OptionError
from medgemma_data.limits import DEFAULT_MAX_PIXELS, ENV_MAX_PIXELS, max_pixels

RSS_LIMIT_MB = 500

CHILD = r"""
import json, resource, sys
import medgemma_data
path, modality, options = sys.argv[1], sys.argv[2] or None, json.loads(sys.argv[3])
try:
    medgemma_data.load(path, modality=modality, options=options)
    out = {"error": None, "message": ""}
except medgemma_data.MedgemmaDataError as exc:
    out = {"error": type(exc).__name__, "message": str(exc)}
# VmHWM: this process image's peak (ru_maxrss would carry the forking parent's over exec)
hwm = [ln for ln in open("/proc/self/status") if ln.startswith("VmHWM:")]
out["peak_mb"] = (int(hwm[0].split()[1]) if hwm else
                  resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024
print(json.dumps(out))
"""


def load_in_child(path: Path, modality: str | None, options: dict | None = None,
                  env: dict | None = None) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), modality or "", json.dumps(options or {})],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, **(env or {}), "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def assert_refused(out: dict) -> None:
    assert out["error"] == "InvalidInputError", out
    assert "max_pixels" in out["message"] and ENV_MAX_PIXELS in out["message"], out["message"]
    assert out["peak_mb"] < RSS_LIMIT_MB, f"peak RSS {out['peak_mb']:.0f} MB"


def png_claiming(path: Path, width: int, height: int) -> Path:
    """A PNG whose IHDR claims ``width x height`` RGB pixels, with 64 bytes of image data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    return path


def jpeg_claiming(path: Path, width: int, height: int) -> Path:
    """A real 8 x 8 JPEG with its SOF0 frame header patched to ``width x height``."""
    from PIL import Image

    Image.new("RGB", (8, 8), (200, 30, 30)).save(path, format="JPEG")
    data = bytearray(path.read_bytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    path.write_bytes(bytes(data))
    return path


def dicom_claiming(path: Path, rows: int, cols: int, frames: int = 1, *,
                   modality: str = "CT", position: float = 0.0) -> Path:
    """An RLE-compressed 8 x 8 slice whose header then claims ``rows x cols x frames``:
    pylibjpeg-rle would allocate the whole claimed output before decoding."""
    import pydicom
    from pydicom.uid import RLELossless

    write_dicom_slice(path, np.arange(64, dtype=np.int16).reshape(8, 8), modality=modality,
                      position=(0.0, 0.0, position))
    ds = pydicom.dcmread(path)
    ds.compress(RLELossless)
    ds.Rows, ds.Columns = rows, cols
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.save_as(path)
    return path


# ---- images: a header claiming 10^5 x 10^5 pixels -------------------------------------------

@pytest.mark.parametrize("modality", ["radiograph", "derm", None])
def test_png_claiming_1e10_pixels_is_refused_before_decoding(tmp_path, modality):
    path = png_claiming(tmp_path / "bomb.png", 100_000, 100_000)
    if modality is None:  # detection judges by the header too, then load refuses
        out = load_in_child(path, None)
        assert out["error"] in ("InvalidInputError", "DetectionError"), out
        assert out["peak_mb"] < RSS_LIMIT_MB
        return
    assert_refused(load_in_child(path, modality))


def test_jpeg_claiming_65500_squared_is_refused(tmp_path):
    assert_refused(load_in_child(jpeg_claiming(tmp_path / "bomb.jpg", 65_500, 65_500), "derm"))


def test_raised_limit_still_refuses_what_is_over_it(tmp_path):
    """With the limit raised to 10^9 (above Pillow's own), a 40000^2 header is still refused."""
    path = png_claiming(tmp_path / "bomb.png", 40_000, 40_000)
    assert_refused(load_in_child(path, "radiograph", env={ENV_MAX_PIXELS: str(10**9)}))


# ---- DICOM: Rows x Columns x frames ---------------------------------------------------------

@pytest.mark.parametrize("modality", ["radiograph", "ct", "mri"])
def test_dicom_claiming_65535_squared_by_10000_frames_is_refused(tmp_path, modality):
    path = dicom_claiming(tmp_path / "bomb.dcm", 65535, 65535, 10_000,
                          modality="MR" if modality == "mri" else "CT")
    assert_refused(load_in_child(path, modality))


def test_dicom_one_frame_over_the_default_is_refused(tmp_path):
    side = int(DEFAULT_MAX_PIXELS**0.5) + 1
    assert_refused(load_in_child(dicom_claiming(tmp_path / "big.dcm", side, side), "radiograph"))


def test_series_whose_slices_add_up_past_the_limit_is_refused(tmp_path):
    """Three 8192^2 slices: each under the limit, together over it; MR reads them all."""
    folder = tmp_path / "series"
    folder.mkdir()
    for i in range(3):
        dicom_claiming(folder / f"s{i}.dcm", 8192, 8192, modality="MR", position=2.5 * i)
    out = load_in_child(folder, "mri")
    assert_refused(out)
    assert "3 DICOM files" in out["message"]


# ---- the limit is documented and raised by an option or the environment ---------------------

def test_limit_comes_from_the_option_then_the_environment(monkeypatch):
    monkeypatch.delenv(ENV_MAX_PIXELS, raising=False)
    assert max_pixels() == DEFAULT_MAX_PIXELS == 2 * 89_478_485  # Pillow's error threshold
    monkeypatch.setenv(ENV_MAX_PIXELS, "1_000_000_000")
    assert max_pixels() == 10**9
    assert max_pixels({"max_pixels": "5000"}) == 5000
    assert max_pixels({"max_pixels": ""}) == 10**9
    with pytest.raises(OptionError, match="max_pixels"):
        max_pixels({"max_pixels": "lots"})
    monkeypatch.setenv(ENV_MAX_PIXELS, "0")
    with pytest.raises(OptionError, match=ENV_MAX_PIXELS):
        max_pixels()


def test_option_max_pixels_draws_the_line_exactly(tmp_path):
    """A 16 x 16 slice: refused at max_pixels=255, read at 256 (DICOM and PNG alike)."""
    from PIL import Image

    dcm = write_dicom_slice(tmp_path / "s.dcm", np.zeros((16, 16), np.int16))
    png = tmp_path / "p.png"
    Image.new("L", (16, 16), 7).save(png)
    for path, modality in ((dcm, "ct"), (dcm, "radiograph"), (png, "radiograph"),
                           (png, "fundus")):
        with pytest.raises(InvalidInputError, match="256 pixels, over the limit of 255"):
            medgemma_data.load(path, modality=modality, options={"max_pixels": "255"})
        [sample] = medgemma_data.load(path, modality=modality, options={"max_pixels": "256"})
        assert sample.images[0].shape[:2] == (16, 16)


def test_every_image_plugin_declares_the_option():
    declared = {p.name: {o.name for o in p.options} for p in medgemma_data.list_plugins()}
    for name in ("radiograph", "ct", "mri", "derm", "fundus", "qa", "wsi"):
        assert "max_pixels" in declared[name], name


def test_slide_whose_smallest_level_is_over_the_limit_is_refused(fixtures):
    """The tissue mask streams the smallest level tile by tile: a slide without a pyramid of
    10^10 pixels would take hours. Shown with a real slide (250 x 300) and a lowered limit."""
    path = fixtures / "wsi" / "boxes.tiff"
    with pytest.raises(InvalidInputError, match=r"smallest level \(37 x 31.*max_pixels"):
        medgemma_data.load(path, modality="wsi", options={"max_pixels": str(37 * 31 - 1)})
    [sample] = medgemma_data.load(path, modality="wsi", options={"max_pixels": str(37 * 31)})
    assert sample.images
