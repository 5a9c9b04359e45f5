"""Small numpy/Pillow helpers every plugin uses to make model-ready RGB images.

All outputs are ``uint8`` arrays of shape ``[H, W, 3]``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import InvalidInputError


def to_uint8(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map ``[lo, hi]`` linearly to ``0..255``: clip, scale, round half to even. Any shape.

    A degenerate range (``hi <= lo``) maps everything to 0.
    """
    x = np.asarray(values, dtype=np.float64)
    if not hi > lo:
        return np.zeros(x.shape, np.uint8)
    y = (np.clip(x, lo, hi) - lo) * (255.0 / (hi - lo))
    return np.rint(y).astype(np.uint8)


def stretch(values: np.ndarray) -> np.ndarray:
    """Min-max stretch of the whole array to ``0..255`` (``uint8``, same shape)."""
    x = np.asarray(values)
    return to_uint8(x, float(x.min()), float(x.max()))


def gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    """``uint8 [H, W]`` -> ``uint8 [H, W, 3]`` (the gray value in every channel)."""
    if gray.ndim != 2:
        raise ValueError(f"expected a [H, W] image, got shape {gray.shape}")
    return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))


def pad_to_square(image: np.ndarray, color: tuple[int, int, int]) -> np.ndarray:
    """Pad ``[H, W, 3]`` symmetrically with ``color`` to ``[S, S, 3]``, ``S = max(H, W)``."""
    h, w = image.shape[:2]
    s = max(h, w)
    out = np.empty((s, s, 3), np.uint8)
    out[...] = np.asarray(color, np.uint8)
    top, left = (s - h) // 2, (s - w) // 2
    out[top:top + h, left:left + w] = image
    return out


def parse_color(text: str) -> tuple[int, int, int]:
    """``"000000"``/``"#ffffff"``/``"255,255,255"`` -> an RGB triple."""
    t = text.strip().lstrip("#")
    try:
        if "," in t:
            r, g, b = (int(v) for v in t.split(","))
        elif len(t) == 6:
            r, g, b = (int(t[i:i + 2], 16) for i in (0, 2, 4))
        else:
            raise ValueError
    except ValueError:
        raise InvalidInputError(f"colour {text!r} must be RRGGBB hex or r,g,b") from None
    if not all(0 <= v <= 255 for v in (r, g, b)):
        raise InvalidInputError(f"colour {text!r} has a channel outside 0..255")
    return r, g, b


#: Pillow modes holding one channel of more than 8 bits: 16-bit PNG/TIFF (``I;16*``),
#: 32-bit integer (``I``) and floating point (``F``) images.
HIGH_BIT_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "F"})


def read_image(path: Path, max_pixels: int | None = None) -> tuple[np.ndarray, dict[str, object]]:
    """Read a PNG/JPEG/... file into ``uint8 [H, W, 3]``: the one way every plugin reads one.

    EXIF orientation applied, then :func:`pil_to_rgb`. Returns the image and facts for the
    sample's metadata: ``image_size`` ``[width, height]``, ``exif_orientation`` (when the
    file has the tag) and ``intensity_range`` ``[min, max]`` (the source values stretched to
    0..255, for single-channel images of more than 8 bits). ``medsiglip.load_image`` applies
    the same rule, pixel for pixel (a test in the repository's ``tests/`` proves it).

    ``max_pixels``: a header claiming more (width x height) is refused before decoding
    (default :func:`medgemma_data.limits.max_pixels`, see :mod:`medgemma_data.limits`).
    """
    import warnings

    from PIL import Image, ImageOps, UnidentifiedImageError

    from .limits import ENV_MAX_PIXELS, allow_in_pillow, check_pixels
    from .limits import max_pixels as default_limit

    limit = default_limit() if max_pixels is None else max_pixels
    allow_in_pillow(limit)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                check_pixels(path, im.width * im.height, f"its header ({im.width} x "
                             f"{im.height})", limit)
                orientation = im.getexif().get(0x0112)
                im = ImageOps.exif_transpose(im)
                im.load()
    except Image.DecompressionBombError as exc:  # Pillow's own check, inside Image.open
        raise InvalidInputError(f"{path}: its header claims more than the limit of {limit:,} "
                                f"pixels ({exc}); if the file is real, raise the limit with "
                                f"--option max_pixels=N or {ENV_MAX_PIXELS}=N") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InvalidInputError(f"{path} is not a readable image ({exc}); check the file") \
            from None
    facts: dict[str, object] = {"image_size": [im.width, im.height]}
    if orientation:
        facts["exif_orientation"] = int(orientation)
    if im.mode in HIGH_BIT_MODES:
        values = np.asarray(im)
        facts["intensity_range"] = [float(values.min()), float(values.max())]
    return pil_to_rgb(im), facts


def pil_to_rgb(im) -> np.ndarray:  # noqa: ANN001 - a PIL image
    """A Pillow image of any mode -> ``uint8 [H, W, 3]``.

    The rule for more than 8 bits: a single-channel image of more than 8 bits (16-bit
    PNG/TIFF, 32-bit integer, float; :data:`HIGH_BIT_MODES`) is min-max stretched over the
    whole image to 0..255 (:func:`stretch`) and repeated in the three channels. Such files in
    medicine are radiographs and scans whose detector data fill only part of the container
    (12-bit data in a 16-bit PNG reach 4095 of 65535: divided by 65535 they are a nearly black
    image) and carry no display window, so stretching to the full range is what MedGemma's
    radiograph handling does (window, then stretch). Colour images are not stretched: Pillow
    reads a 16-bit colour PNG as 8 bits per channel (the high byte), so a photograph keeps its
    exposure; a rare 16-bit grayscale photograph is contrast-stretched, which keeps the order
    of its intensities. Palette and alpha images become RGB (alpha composited on white);
    8-bit images keep their values.
    """
    from PIL import Image

    if im.mode in HIGH_BIT_MODES:
        return gray_to_rgb(stretch(np.asarray(im)))
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, rgba)
    return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
