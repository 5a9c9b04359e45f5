"""One road from a file to pixels: the same 16-bit PNG through the CLI (``medgemma generate
--image``), the API (a path in a message), the data plugins (``medgemma_data.load``) and the demo
(an upload to ``/chat``) reaches the model as the same pixels, and those are the image
min-max stretched to 8 bits (hand-computed), resized as transformers' Gemma3ImageProcessor does.

The model is a tiny random image-text MedGemma (``medgemma_core.testing``); what each path feeds
it is recorded at ``Processor.preprocess_images``, the step every image goes through.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import medgemma_data
import medsiglip
from medgemma_data.imaging import read_image

IMAGE_SIZE = 32  # MultimodalConfig.tiny()


def _smooth(seed: int, shape: tuple[int, int], lo: int, hi: int) -> np.ndarray:
    """uint16 values in [lo, hi] (both reached): 8 px blocks plus noise."""
    rng = np.random.default_rng(seed)
    blocks = rng.uniform(size=(-(-shape[0] // 8), -(-shape[1] // 8)))
    x = np.kron(blocks, np.ones((8, 8)))[:shape[0], :shape[1]]
    x = x + rng.normal(0.0, 0.05, size=shape)
    x = (x - x.min()) / (x.max() - x.min())
    return np.rint(lo + x * (hi - lo)).astype(np.uint16)


def _png16(path, values: np.ndarray):
    Image.fromarray(values).save(path)
    with Image.open(path) as im:
        assert im.mode == "I;16", im.mode  # a real 16-bit grayscale PNG
    return path


def _stretched_by_hand(values: np.ndarray) -> np.ndarray:
    v = values.astype(np.float64)
    lo, hi = v.min(), v.max()
    gray = np.rint((v - lo) * (255.0 / (hi - lo))).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=-1)


def _transformers_pixels(rgb: np.ndarray) -> np.ndarray:
    from transformers import Gemma3ImageProcessor

    out = Gemma3ImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})(
        images=[rgb], return_tensors="np")["pixel_values"]
    return out.transpose(0, 2, 3, 1)


CASES = {
    "12-bit data in a 16-bit PNG": dict(seed=0, shape=(56, 40), lo=37, hi=4000),
    "full 16-bit range": dict(seed=1, shape=(48, 64), lo=0, hi=65535),
}


@pytest.fixture(scope="module", params=list(CASES))
def png(request, tmp_path_factory):
    values = _smooth(**CASES[request.param])
    return _png16(tmp_path_factory.mktemp("png") / "cxr.png", values), values


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from medgemma_core.testing import save_tiny_orbax_mm

    return save_tiny_orbax_mm(tmp_path_factory.mktemp("ckpt") / "tiny-mm")


@pytest.fixture(scope="module")
def model(checkpoint):
    from medgemma_core import load

    return load(checkpoint)


@pytest.fixture
def seen(monkeypatch):
    """The pixel arrays every Processor hands the model during the test."""
    from medgemma_core import Processor

    recorded: list[np.ndarray] = []
    original = Processor.preprocess_images

    def spy(self, images):
        out = original(self, images)
        recorded.append(np.asarray(out[0]).copy())
        return out

    monkeypatch.setattr(Processor, "preprocess_images", spy)
    return recorded


def _one(recorded: list[np.ndarray]) -> np.ndarray:
    assert len(recorded) == 1, f"expected one image batch, saw {len(recorded)}"
    (pixels,) = recorded
    assert pixels.shape == (1, IMAGE_SIZE, IMAGE_SIZE, 3)
    return pixels


def _cli(checkpoint, path, seen, capsys) -> np.ndarray:
    from medgemma_core.cli import main

    rc = main(["generate", "--checkpoint", str(checkpoint), "--prompt", "Describe.",
               "--image", str(path), "--max-new-tokens", "1", "--json"])
    assert rc == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["images"] == 1
    return _one(seen)


def _api(model, path, seen) -> np.ndarray:
    model.chat_completion([{"role": "user", "content": [
        {"type": "text", "text": "Describe."}, {"type": "image", "image": str(path)}]}],
        max_new_tokens=1)
    return _one(seen)


def _data(checkpoint, path, seen) -> tuple[np.ndarray, np.ndarray]:
    from medgemma_core import Processor

    [sample] = medgemma_data.load(path)
    [image] = sample.images
    Processor.from_checkpoint(checkpoint)(sample.to_messages(question="Describe."))
    return image, _one(seen)


def _demo(model, path, seen) -> np.ndarray:
    from medgemma_demo.chat import ChatService
    from medgemma_demo.host import Loader

    ChatService(Loader.ready(model)).api_chat("Describe.", str(path), max_new_tokens=1)
    return _one(seen)


def test_cli_api_data_and_demo_feed_the_model_the_same_pixels(png, checkpoint, model, seen,
                                                               capsys):
    path, values = png
    by_hand = _stretched_by_hand(values)
    got = {"cli": _cli(checkpoint, path, seen, capsys)}
    seen.clear()
    got["api"] = _api(model, path, seen)
    seen.clear()
    image, got["data"] = _data(checkpoint, path, seen)
    seen.clear()
    got["demo"] = _demo(model, path, seen)

    np.testing.assert_array_equal(image, by_hand)  # the sample's image: stretched to 0..255
    for name in ("api", "data", "demo"):
        np.testing.assert_array_equal(got[name], got["cli"], err_msg=f"{name} != cli")
    # and those pixels are transformers' preprocessing of the stretched image
    np.testing.assert_allclose(got["cli"], _transformers_pixels(by_hand), atol=1e-5)
    # divided by 65535 instead, 12-bit data would stay below 4000 / 65535 * 2 - 1 = -0.88
    assert float(got["cli"].max()) > 0.5


# ---- the two readers, file by file ----------------------------------------------------------
def _readers_agree(path) -> np.ndarray:
    """medsiglip's reader and medgemma-data's give the same 8-bit image and model input."""
    data, _ = read_image(path)
    ours = medsiglip.load_image(path)
    if "A" not in ours.mode:  # with alpha, compositing on white happens in preprocess
        np.testing.assert_array_equal(np.asarray(ours.convert("RGB")), data)
    np.testing.assert_array_equal(medsiglip.preprocess(path, 16, resample="pil_bilinear"),
                                  medsiglip.preprocess(data, 16, resample="pil_bilinear"))
    return data


@pytest.mark.parametrize("seed", range(12))
def test_medsiglip_and_medgemma_data_read_16_bit_pngs_identically(seed, tmp_path):
    rng = np.random.default_rng(seed)
    lo = int(rng.integers(0, 30000))
    hi = lo + int(rng.integers(1, 65535 - lo + 1))
    values = rng.integers(lo, hi + 1, size=(int(rng.integers(2, 40)), int(rng.integers(2, 40))))
    values.flat[0], values.flat[-1] = lo, hi
    path = _png16(tmp_path / "x.png", values.astype(np.uint16))
    np.testing.assert_array_equal(_readers_agree(path), _stretched_by_hand(values))


def test_both_readers_agree_on_float_tiff_8_bit_exif_and_alpha(tmp_path):
    f = np.linspace(-3.0, 7.5, 30, dtype=np.float32).reshape(5, 6)
    Image.fromarray(f).save(tmp_path / "f.tif")
    np.testing.assert_array_equal(_readers_agree(tmp_path / "f.tif"), _stretched_by_hand(f))
    rgb = np.random.default_rng(0).integers(0, 256, size=(4, 7, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 8  # rotate 90 counter-clockwise to display
    Image.fromarray(rgb).save(tmp_path / "rot.png", exif=exif)
    np.testing.assert_array_equal(_readers_agree(tmp_path / "rot.png"), np.rot90(rgb, k=1))
    la = np.dstack([np.full((2, 2), 60, np.uint8), np.array([[0, 255], [128, 255]], np.uint8)])
    Image.fromarray(la).save(tmp_path / "la.png")
    # transparent -> white, opaque -> 60, half -> 60 * 128/255 + 255 * 127/255 = 157.1
    np.testing.assert_array_equal(_readers_agree(tmp_path / "la.png")[..., 0],
                                  [[255, 60], [157, 60]])
