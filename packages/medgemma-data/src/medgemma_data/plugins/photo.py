"""Shared loader of the derm and fundus photograph plugins (JPEG/PNG with EXIF orientation)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..limits import MAX_PIXELS_OPTION
from ..sample import ImagePart, Location, Provenance, Sample
from ..spec import Option, opt_bool
from . import IMAGE_SUFFIXES, MAX_DETECT_PIXELS


def small_rgb(path: Path, side: int = 64) -> np.ndarray | None:
    """A ``side x side`` RGB preview for detectors, or ``None`` when not a colour photo."""
    if not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES:
        return None
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.mode not in ("RGB", "RGBA", "P", "CMYK", "YCbCr"):
                return None
            if im.width * im.height > MAX_DETECT_PIXELS:
                return None
            im.draft("RGB", (side * 2, side * 2))
            arr = np.asarray(im.convert("RGB").resize((side, side)), dtype=np.int16)
    except Exception:
        return None
    if np.abs(arr - arr[..., :1]).max() <= 2:
        return None  # a gray image stored as RGB: the radiograph plugin's
    return arr


def fundus_like(arr: np.ndarray) -> bool:
    """A colour fundus photograph: a bright disc on a black surround (dark corners)."""
    s = arr.shape[0]
    c = max(2, s // 8)
    corners = [arr[:c, :c], arr[:c, -c:], arr[-c:, :c], arr[-c:, -c:]]
    centre = arr[s // 4: 3 * s // 4, s // 4: 3 * s // 4]
    return all(float(k.mean()) < 25 for k in corners) and float(centre.mean()) > 40


def photo_options(pad_color: str) -> tuple[Option, ...]:
    return (
        Option("pad_square", "false", "pad the photograph to a square (no cropping)"),
        Option("pad_color", pad_color, "padding colour, RRGGBB hex"),
        MAX_PIXELS_OPTION,
    )


def load_photo(path: Path, options: Mapping[str, str], name: str) -> list[Sample]:
    """One photograph -> one sample with one RGB image (EXIF orientation applied)."""
    from ..errors import InvalidInputError
    from ..imaging import pad_to_square, parse_color, read_image
    from ..limits import max_pixels

    if not path.is_file():
        raise InvalidInputError(f"{path} is not a file; the {name} modality reads one "
                                "JPEG/PNG photograph")
    pad = opt_bool(options, "pad_square")
    color = parse_color(options["pad_color"])
    image, facts = read_image(path, max_pixels(options))
    meta: dict[str, object] = {"modality": name, "image_size": facts["image_size"]}
    if "exif_orientation" in facts:
        meta["exif_orientation"] = facts["exif_orientation"]
    if pad:
        image = pad_to_square(image, color)
    meta["padded"] = pad
    return [Sample((ImagePart(image),), name, Provenance(str(path), (Location(str(path)),)),
                   meta)]
