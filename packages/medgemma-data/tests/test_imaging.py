"""The file rule every plugin reads images by (imaging.read_image), on hand-computed pixels."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import medgemma_data as md
from medgemma_data.imaging import read_image


def _png16(path, values) -> None:
    Image.fromarray(np.asarray(values, np.uint16)).save(path)
    with Image.open(path) as im:
        assert im.mode == "I;16"


def test_12_bit_png_is_stretched_to_the_full_range(tmp_path):
    _png16(tmp_path / "cxr.png", [[0, 819, 4095], [4095, 819, 0]])
    image, facts = read_image(tmp_path / "cxr.png")
    # (v - 0) * 255 / 4095: 819 -> 51, 4095 -> 255 (divided by 65535, 4095 would be 16)
    want = np.array([[0, 51, 255], [255, 51, 0]], np.uint8)
    assert image.dtype == np.uint8 and image.shape == (2, 3, 3)
    for c in range(3):
        np.testing.assert_array_equal(image[..., c], want)
    assert facts == {"image_size": [3, 2], "intensity_range": [0.0, 4095.0]}


def test_offset_16_bit_and_constant(tmp_path):
    _png16(tmp_path / "a.png", [[1000, 1500, 3000]])
    image, facts = read_image(tmp_path / "a.png")
    np.testing.assert_array_equal(image[0, :, 0], [0, 64, 255])  # 500 * 255 / 2000 = 63.75
    assert facts["intensity_range"] == [1000.0, 3000.0]
    _png16(tmp_path / "flat.png", np.full((2, 2), 700))
    np.testing.assert_array_equal(read_image(tmp_path / "flat.png")[0], 0)


def test_8_bit_values_are_kept_and_alpha_goes_on_white(tmp_path):
    gray = np.array([[10, 20], [30, 40]], np.uint8)
    Image.fromarray(gray).save(tmp_path / "g.png")
    image, facts = read_image(tmp_path / "g.png")
    np.testing.assert_array_equal(image[..., 1], gray)
    assert "intensity_range" not in facts
    la = np.dstack([np.full((1, 2), 100, np.uint8), np.array([[0, 255]], np.uint8)])
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    image, _ = read_image(tmp_path / "la.png")
    np.testing.assert_array_equal(image[0, :, 0], [255, 100])  # transparent -> white


def test_the_radiograph_plugin_reads_a_16_bit_png_by_the_same_rule(tmp_path):
    values = np.array([[0, 819, 4095, 2000]] * 3, np.uint16)
    _png16(tmp_path / "cxr.png", values)
    assert md.detect(tmp_path / "cxr.png") == "radiograph"
    [s] = md.load(tmp_path / "cxr.png")
    want = np.rint(values.astype(np.float64) * 255 / 4095).astype(np.uint8)
    np.testing.assert_array_equal(s.images[0][..., 0], want)
    np.testing.assert_array_equal(s.images[0], read_image(tmp_path / "cxr.png")[0])
    assert s.metadata["intensity_range"] == [0.0, 4095.0]
    assert s.metadata["image_size"] == [4, 3]


def test_not_an_image(tmp_path):
    (tmp_path / "x.png").write_bytes(b"not a png")
    with pytest.raises(md.InvalidInputError, match="not a readable image"):
        read_image(tmp_path / "x.png")
