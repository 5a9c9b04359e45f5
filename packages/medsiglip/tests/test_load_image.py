"""load_image: the file rule (EXIF orientation; >8-bit grayscale min-max stretched to 8 bits),
checked against hand-computed pixels."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from medsiglip import load_image, preprocess


def _png16(path, values: np.ndarray) -> None:
    Image.fromarray(values.astype(np.uint16)).save(path)  # mode I;16, a 16-bit PNG
    with Image.open(path) as im:
        assert im.mode == "I;16"


def test_12_bit_data_in_a_16_bit_png_is_stretched_not_divided(tmp_path):
    values = np.array([[0, 819, 4095], [4095, 819, 0]], np.uint16)  # 12-bit data
    _png16(tmp_path / "cxr.png", values)
    img = load_image(tmp_path / "cxr.png")
    assert img.mode == "L"
    # (v - 0) * 255 / 4095: 819 -> 51 exactly, 4095 -> 255 (divided by 65535 it would be 16)
    np.testing.assert_array_equal(np.asarray(img), [[0, 51, 255], [255, 51, 0]])


def test_full_range_and_offset_16_bit(tmp_path):
    _png16(tmp_path / "full.png", np.array([[0, 32768, 65535]]))
    # 32768 * 255 / 65535 = 127.502 -> 128
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "full.png")), [[0, 128, 255]])
    _png16(tmp_path / "offset.png", np.array([[1000, 1500, 3000]]))
    # (1500 - 1000) * 255 / 2000 = 63.75 -> 64
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "offset.png")),
                                  [[0, 64, 255]])
    _png16(tmp_path / "flat.png", np.full((2, 2), 700))
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "flat.png")), 0)


def test_8_bit_files_keep_their_values(tmp_path):
    gray = np.array([[10, 20], [30, 40]], np.uint8)
    Image.fromarray(gray).save(tmp_path / "g.png")
    img = load_image(tmp_path / "g.png")
    assert img.mode == "L"
    np.testing.assert_array_equal(np.asarray(img), gray)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def test_16_bit_colour_png_is_not_stretched(tmp_path):
    """Pillow reads a 48-bit RGB PNG as 8 bits per channel (the high byte): no stretch, so a
    photograph keeps its exposure."""
    rgb = np.array([[[256 * 10, 256 * 20 + 255, 256 * 30], [256 * 40, 0, 256 * 50]]], ">u2")
    raw = b"".join(b"\x00" + row.tobytes() for row in rgb)
    png = (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", 2, 1, 16, 2, 0, 0, 0))
           + _chunk(b"IDAT", zlib.compress(raw)) + _chunk(b"IEND", b""))
    (tmp_path / "rgb48.png").write_bytes(png)
    img = load_image(tmp_path / "rgb48.png")
    assert img.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(img), [[[10, 20, 30], [40, 0, 50]]])


def test_exif_orientation_is_applied(tmp_path):
    arr = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 10
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    Image.fromarray(arr).save(tmp_path / "rot.png", exif=exif)
    got = np.asarray(load_image(tmp_path / "rot.png"))
    np.testing.assert_array_equal(got, np.rot90(arr, k=-1))  # clockwise


def test_a_path_and_the_stretched_array_give_the_same_pixels(tmp_path):
    values = np.array([[0, 819, 4095, 2000]] * 4, np.uint16)
    _png16(tmp_path / "cxr.png", values)
    by_hand = np.rint(values.astype(np.float64) * 255 / 4095).astype(np.uint8)
    np.testing.assert_array_equal(preprocess(tmp_path / "cxr.png", 8, resample="pil_bilinear"),
                                  preprocess(by_hand, 8, resample="pil_bilinear"))


def test_not_an_image(tmp_path):
    (tmp_path / "x.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="not a readable image"):
        load_image(tmp_path / "x.png")
    with pytest.raises(FileNotFoundError):
        load_image(tmp_path / "missing.png")
