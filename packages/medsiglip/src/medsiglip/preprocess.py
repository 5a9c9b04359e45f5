"""Image preprocessing for the vision tower: any image -> float32 ``[B, S, S, 3]`` in [-1, 1].

Steps per image: read (a file path through :func:`load_image`, a PIL image or an array),
convert to RGB (grayscale repeated, alpha composited onto white as transformers'
``convert_rgb`` does), optionally zero-pad to a centred square, resize to ``S x S`` (aspect
ratio not kept), scale to [0, 1], then ``(x - 0.5) / 0.5``.

Accepted arrays: ``[H, W]``, ``[H, W, 1|2|3|4]`` of uint8 (0..255), uint16 (0..65535) or
float in [0, 1]. Files are read by :func:`load_image`, which min-max stretches 16-bit
grayscale files (radiographs) to 8 bits, as medgemma-data does.

``resample``:

* ``"bicubic"`` (default) reproduces transformers' ``SiglipImageProcessor`` (PIL bicubic,
  uint8 images resized as uint8, as the reference processor does); it is what
  ``SiglipModel.from_pretrained`` users get.
* ``"bilinear"``: bilinear at half-pixel centres without antialiasing, i.e.
  ``tf.image.resize(method="bilinear", antialias=False)`` used by Google's MedSigLIP model card
  (and ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)``).
* ``"pil_bilinear"``: PIL bilinear (antialiased when shrinking), which reproduces
  transformers' ``Gemma3ImageProcessor`` (PIL backend), MedGemma's processor in HF.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import jax
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

Resample = Literal["bicubic", "bilinear", "pil_bilinear"]
_PIL_FILTERS = {"bicubic": Image.Resampling.BICUBIC, "pil_bilinear": Image.Resampling.BILINEAR}
ImageLike = str | Path | Image.Image | np.ndarray


#: Pillow modes holding one channel of more than 8 bits: 16-bit PNG/TIFF, 32-bit int, float.
_HIGH_BIT_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "F"})


def _stretch_to_uint8(values: np.ndarray) -> np.ndarray:
    """Min-max over the whole image to 0..255, rounded half to even (a constant image -> 0).

    The same arithmetic, step for step, as ``medgemma_data.imaging.stretch`` (float64 clip,
    scale by ``255 / (hi - lo)``, ``rint``), so both packages give identical pixels.
    """
    x = np.asarray(values, dtype=np.float64)
    lo, hi = float(x.min()), float(x.max())
    if not hi > lo:
        return np.zeros(x.shape, np.uint8)
    return np.rint((np.clip(x, lo, hi) - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def load_image(path: str | Path) -> Image.Image:
    """Open an image file (PNG, JPEG, TIFF, ...) as every MedGemma package reads one.

    The EXIF orientation is applied (as transformers' ``load_image`` does). A single-channel
    image of more than 8 bits (16-bit PNG/TIFF, 32-bit integer, float) becomes 8-bit
    grayscale (mode ``L``) by a min-max stretch over the whole image. Why: such files in
    medicine are radiographs and scans whose detector data fill only part of the container
    (12-bit data in a 16-bit PNG reach 4095 of 65535, so dividing by 65535 gives a nearly
    black image) and carry no display window; radiographs are shown stretched to the full
    range. Colour files are not stretched: Pillow reads a 16-bit colour PNG as 8 bits per
    channel, so photographs keep their exposure. medgemma-data's plugins read files by the
    same rule, pixel for pixel. Arrays and PIL images given to :func:`preprocess` directly are
    taken at their stated scale instead (uint16 / 65535).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such image file")
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            img.load()
    except Image.DecompressionBombError as err:  # a header claiming more than Pillow allows
        raise ValueError(f"{path}: {err}; if the image is real, raise PIL.Image.MAX_IMAGE_PIXELS")\
            from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"{path}: not a readable image ({err}); pass a PNG or JPEG") from None
    if img.mode in _HIGH_BIT_MODES:
        return Image.fromarray(_stretch_to_uint8(np.asarray(img)))  # uint8 [H, W]: mode L
    return img


def _pil_to_array(img: Image.Image) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L"):
        return np.asarray(img, dtype=np.uint16)
    if img.mode == "I":
        arr = np.asarray(img)
        if arr.min() < 0 or arr.max() > 65535:
            raise ValueError("32-bit integer image outside 0..65535: scale it to uint16 first")
        return arr.astype(np.uint16)
    if img.mode == "F":
        return np.asarray(img, dtype=np.float32)
    has_alpha = img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info
    return np.asarray(img.convert("RGBA" if has_alpha else "RGB"))


def _as_array(image: Any) -> np.ndarray:
    if isinstance(image, (str, Path)):
        image = load_image(image)
    if isinstance(image, Image.Image):
        return _pil_to_array(image)
    arr = np.asarray(image)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    return arr


def _to_rgb(arr: np.ndarray) -> np.ndarray:
    """``[H, W(, C)]`` -> ``[H, W, 3]``, alpha composited onto white, same dtype."""
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 2, 3, 4):
        raise ValueError(
            f"image of shape {list(arr.shape)}: expected [H, W] or [H, W, C] with C in 1..4 "
            "(channels-last)"
        )
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"empty image of shape {list(arr.shape)}")
    c = arr.shape[-1]
    if c in (2, 4):
        color, alpha = arr[..., :-1], arr[..., -1:]
        if arr.dtype == np.uint8:  # exactly as PIL's alpha_composite onto white (HF convert_rgb)
            rgba = np.concatenate([np.repeat(color, 3 // color.shape[-1], -1), alpha], -1)
            white = Image.new("RGBA", rgba.shape[1::-1], (255, 255, 255, 255))
            out = Image.alpha_composite(white, Image.fromarray(rgba, "RGBA")).convert("RGB")
            return np.asarray(out)
        top = _max_value(arr.dtype)
        a = alpha.astype(np.float32) / top
        arr = color.astype(np.float32) / top * a + (1.0 - a)  # float32 in [0, 1]
        c -= 1
    return np.repeat(arr, 3, axis=-1) if c == 1 else arr


def _max_value(dtype: np.dtype) -> float:
    if dtype == np.uint8:
        return 255.0
    if dtype == np.uint16:
        return 65535.0
    if np.issubdtype(dtype, np.floating):
        return 1.0
    raise ValueError(f"unsupported image dtype {dtype}: use uint8, uint16 or float in [0, 1]")


def _pad_square(arr: np.ndarray) -> np.ndarray:
    h, w = arr.shape[:2]
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    return np.pad(arr, ((top, side - h - top), (left, side - w - left), (0, 0)))


def _resize_pil(arr: np.ndarray, size: int, resample: Image.Resampling) -> np.ndarray:
    """PIL resize (antialiased when shrinking). uint8 stays uint8 (rounded), as HF does."""
    if arr.dtype == np.uint8:
        out = Image.fromarray(arr, "RGB").resize((size, size), resample)
        return np.asarray(out).astype(np.float32) / 255.0
    x = arr.astype(np.float32) / _max_value(arr.dtype)
    chans = [
        np.asarray(Image.fromarray(x[..., i], "F").resize((size, size), resample))
        for i in range(3)
    ]
    return np.stack(chans, axis=-1)


def _resize_bilinear(arr: np.ndarray, size: int) -> np.ndarray:
    x = arr.astype(np.float32) / _max_value(arr.dtype)
    out = jax.image.resize(x, (size, size, 3), method="linear", antialias=False)
    return np.asarray(out, dtype=np.float32)


def preprocess_one(image: ImageLike, size: int = 448, *, resample: Resample = "bicubic",
                   pad_to_square: bool = False) -> np.ndarray:
    """One image -> float32 ``[size, size, 3]`` in [-1, 1]."""
    arr = _as_array(image)
    _max_value(arr.dtype)  # rejects unsupported dtypes early
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)) or arr.min() < 0.0 or arr.max() > 1.0:
            raise ValueError("float images must hold finite values in [0, 1]: divide by the "
                             "maximum (255 or 65535) first")
    arr = _to_rgb(arr)
    if pad_to_square:
        arr = _pad_square(arr)
    if resample in _PIL_FILTERS:
        x = _resize_pil(arr, size, _PIL_FILTERS[resample])
    elif resample == "bilinear":
        x = _resize_bilinear(arr, size)
    else:
        raise ValueError(f"resample={resample!r}: use 'bicubic', 'bilinear' or 'pil_bilinear'")
    return (x - 0.5) / 0.5


def preprocess(images: ImageLike | Sequence[ImageLike], size: int = 448, *,
               resample: Resample = "bicubic", pad_to_square: bool = False) -> np.ndarray:
    """Images (paths, PIL images or arrays; one or a list) -> float32 ``[B, size, size, 3]``
    in [-1, 1], ready for :class:`medsiglip.VisionTower` (NHWC).

    ``size``: the tower's ``image_size`` (448 for MedSigLIP, 896 for MedGemma).
    ``pad_to_square``: zero-pad (black) to a centred square first, keeping the aspect ratio.
    """
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    # One image: a path, a PIL image or a [H, W] / [H, W, C] array; a [B, H, W, C] array or a
    # list is a batch.
    single = isinstance(images, (str, Path, Image.Image)) or (
        isinstance(images, np.ndarray) and images.ndim in (2, 3)
    )
    batch = [images] if single else list(images)
    if not batch:
        raise ValueError("no images given")
    out = [preprocess_one(im, size, resample=resample, pad_to_square=pad_to_square)
           for im in batch]
    return np.stack(out).astype(np.float32)
