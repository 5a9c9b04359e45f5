"""Preprocessing against transformers' SiglipImageProcessor (PIL backend) and torch resize."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from medsiglip import preprocess


@pytest.fixture(scope="module")
def hf_processor():
    return transformers.SiglipImageProcessorPil(size={"height": 48, "width": 48})


def _ref(proc, image):
    return proc(image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)


@pytest.mark.parametrize("shape", [(100, 75, 3), (30, 50, 3), (40, 40, 4), (90, 60)])
def test_bicubic_matches_reference_processor(hf_processor, shape):
    arr = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    img = Image.fromarray(arr)
    got = preprocess(img, 48)
    assert got.shape == (1, 48, 48, 3) and got.dtype == np.float32
    np.testing.assert_allclose(got[0], _ref(hf_processor, img), atol=1e-6)
    # The same pixels as a numpy array, and as a PNG file.
    np.testing.assert_allclose(preprocess(arr, 48)[0], got[0], atol=1e-6)


def test_png_file_and_batch(tmp_path, hf_processor):
    arr = np.random.default_rng(1).integers(0, 256, (64, 80, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "a.png")
    got = preprocess([tmp_path / "a.png", str(tmp_path / "a.png")], 48)
    assert got.shape == (2, 48, 48, 3)
    np.testing.assert_allclose(got[1], _ref(hf_processor, Image.fromarray(arr)), atol=1e-6)
    stacked = preprocess(np.stack([arr, arr[::-1]]), 48)  # a [B, H, W, C] array is a batch
    assert stacked.shape == (2, 48, 48, 3)
    np.testing.assert_allclose(stacked[0], got[0], atol=1e-6)


@pytest.mark.parametrize("size", [20, 96])
def test_bilinear_is_half_pixel_without_antialias(size):
    x = np.random.default_rng(2).uniform(0, 1, (50, 70, 3)).astype(np.float32)
    t = torch.from_numpy(x).permute(2, 0, 1)[None]
    want = torch.nn.functional.interpolate(t, size=(size, size), mode="bilinear",
                                           align_corners=False, antialias=False)
    want = want[0].permute(1, 2, 0).numpy() * 2 - 1
    np.testing.assert_allclose(preprocess(x, size, resample="bilinear")[0], want, atol=1e-5)


def test_uint16_grayscale_scales_to_full_range():
    img = np.zeros((10, 10), np.uint16)
    img[:, 5:] = 65535
    got = preprocess(img, 10, resample="bilinear")[0]
    assert got.shape == (10, 10, 3)
    np.testing.assert_allclose(got[:, :5], -1.0)
    np.testing.assert_allclose(got[:, 5:], 1.0)
    np.testing.assert_allclose(got[..., 0], got[..., 2])  # gray repeated over RGB
    pil16 = Image.fromarray(img)  # mode I;16
    np.testing.assert_allclose(preprocess(pil16, 10, resample="bilinear")[0], got)


def test_rgba_composited_on_white():
    rgba = np.zeros((4, 4, 4), np.uint16)  # fully transparent black -> white
    rgba[:2, ..., 3] = 65535  # top half opaque black
    got = preprocess(rgba, 4, resample="bilinear")[0]
    np.testing.assert_allclose(got[:2], -1.0)
    np.testing.assert_allclose(got[2:], 1.0)


def test_pad_to_square_centres_the_image():
    img = np.full((20, 40, 3), 255, np.uint8)
    got = preprocess(img, 40, resample="bilinear", pad_to_square=True)[0]
    np.testing.assert_allclose(got[10:30], 1.0)
    np.testing.assert_allclose(got[:10], -1.0)
    np.testing.assert_allclose(got[30:], -1.0)


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        preprocess(np.full((4, 4, 3), 2.0, np.float32), 4)
    with pytest.raises(ValueError, match="channels-last"):
        preprocess(np.zeros((4, 4, 7), np.uint8), 4)
    with pytest.raises(ValueError, match="resample"):
        preprocess(np.zeros((4, 4, 3), np.uint8), 4, resample="nearest")
    (tmp_path / "x.png").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable image"):
        preprocess(tmp_path / "x.png", 4)
    with pytest.raises(FileNotFoundError):
        preprocess(tmp_path / "absent.png", 4)


def test_pil_bilinear_matches_gemma3_processor():
    proc = transformers.Gemma3ImageProcessorPil(size={"height": 40, "width": 40})
    arr = np.random.default_rng(3).integers(0, 256, (90, 70, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    want = proc(img, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    np.testing.assert_allclose(preprocess(img, 40, resample="pil_bilinear")[0], want, atol=1e-6)
