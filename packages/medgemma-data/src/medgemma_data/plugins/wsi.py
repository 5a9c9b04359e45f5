"""wsi: whole-slide images (anything OpenSlide opens) -> tissue patches in spatial order.

1. The pyramid level nearest the target magnification (default 10X) or microns per pixel.
2. An Otsu tissue mask on a low-resolution thumbnail, built tile by tile from the smallest
   level (never a whole large level in memory).
3. Non-overlapping ``patch_size`` patches of that level whose tissue fraction reaches
   ``min_tissue``; a level smaller than one patch gives one patch padded with background.
4. Up to ``max_patches`` of them, evenly spaced in row-major order (deterministic), each read
   on its own with ``read_region`` and composited on the slide's background colour.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..hookspecs import hookimpl
from ..limits import MAX_PIXELS_OPTION
from ..sample import ImagePart, Location, Provenance, Sample
from ..spec import ModalitySpec, Option, opt_float, opt_int

NAME = "wsi"
THUMB_SIDE = 1024      # longest side of the tissue-mask thumbnail
THUMB_TILE = 2048      # tile size when streaming the thumbnail's source level
ASSUMED_MPP_AT_10X = 1.0


def detect(path: Path) -> int:
    """80 when OpenSlide recognises the file's format (SVS, tiled TIFF, DICOM WSI, ...)."""
    if not path.is_file():
        return 0
    import openslide

    try:
        return 80 if openslide.OpenSlide.detect_format(str(path)) else 0
    except Exception:
        return 0


def open_slide(path: Path):  # noqa: ANN201 - an openslide.OpenSlide
    """Open a slide; an unopenable file is a clear :class:`InvalidInputError`."""
    import openslide

    from ..errors import InvalidInputError

    if path.is_dir():
        raise InvalidInputError(f"{path} is a folder; point the wsi modality at the slide "
                                "file (for DICOM WSI, any file of the slide)")
    try:
        return openslide.OpenSlide(str(path))
    except (openslide.OpenSlideError, OSError) as exc:
        raise InvalidInputError(f"OpenSlide cannot open {path} ({exc}); check the file is a "
                                "whole, supported slide") from None


def choose_level(slide, magnification: float | None, mpp: float | None) -> int:  # noqa: ANN001
    """The level whose downsample is nearest (in log scale) the one the target asks for."""
    import openslide

    props = slide.properties
    base_mpp = _float(props.get(openslide.PROPERTY_NAME_MPP_X))
    objective = _float(props.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER))
    if mpp is not None and base_mpp:
        want = mpp / base_mpp
    elif magnification is not None and objective:
        want = objective / magnification
    elif magnification is not None and base_mpp:
        want = ASSUMED_MPP_AT_10X * 10.0 / magnification / base_mpp
    else:
        want = 1.0
    want = max(want, 1e-9)
    dists = [abs(math.log(d / want)) for d in slide.level_downsamples]
    return int(np.argmin(dists))


def _float(value: str | None) -> float | None:
    try:
        v = float(value) if value is not None else None
    except ValueError:
        return None
    return v if v and v > 0 else None


def _background(slide) -> tuple[int, int, int]:  # noqa: ANN001
    import openslide

    from ..imaging import parse_color

    return parse_color(slide.properties.get(openslide.PROPERTY_NAME_BACKGROUND_COLOR, "ffffff"))


def _composite(region, background: tuple[int, int, int]) -> np.ndarray:  # noqa: ANN001
    """RGBA Pillow image -> ``uint8 [H, W, 3]`` over ``background`` (alpha compositing)."""
    from PIL import Image

    region = region.convert("RGBA")
    if region.getchannel("A").getextrema() == (255, 255):  # opaque: nothing to composite
        return np.asarray(region.convert("RGB"))
    bg = Image.new("RGBA", region.size, (*background, 255))
    return np.asarray(Image.alpha_composite(bg, region).convert("RGB"))


def _read(slide, path: Path, xy: tuple[int, int], level: int, size: tuple[int, int]):  # noqa: ANN001, ANN202
    import openslide

    from ..errors import InvalidInputError

    try:
        return slide.read_region(xy, level, size)
    except openslide.OpenSlideError as exc:
        raise InvalidInputError(f"OpenSlide cannot read {path} ({exc}); the slide is "
                                "damaged or truncated") from None


def thumbnail(slide, path: Path, background: tuple[int, int, int]) -> tuple[np.ndarray, float]:  # noqa: ANN001
    """A thumbnail ``uint8 [h, w, 3]`` (longest side <= 1024) and its level-0 pixels per pixel.

    Streams the smallest level in tiles, each resized into place.
    """
    from PIL import Image

    w0, h0 = slide.dimensions
    scale = max(w0, h0) / THUMB_SIDE if max(w0, h0) > THUMB_SIDE else 1.0
    tw, th = max(1, round(w0 / scale)), max(1, round(h0 / scale))
    level = slide.level_count - 1
    lw, lh = slide.level_dimensions[level]
    ds = slide.level_downsamples[level]
    thumb = Image.new("RGB", (tw, th), background)
    for ty in range(0, lh, THUMB_TILE):
        for tx in range(0, lw, THUMB_TILE):
            size = (min(THUMB_TILE, lw - tx), min(THUMB_TILE, lh - ty))
            region = _read(slide, path, (round(tx * ds), round(ty * ds)), level, size)
            tile = Image.fromarray(_composite(region, background))
            x0, y0 = round(tx * ds / scale), round(ty * ds / scale)
            x1 = round((tx + size[0]) * ds / scale)
            y1 = round((ty + size[1]) * ds / scale)
            if x1 > x0 and y1 > y0:
                thumb.paste(tile.resize((x1 - x0, y1 - y0), Image.Resampling.BOX), (x0, y0))
    return np.asarray(thumb), scale


def tissue_mask(thumb: np.ndarray) -> np.ndarray:
    """Otsu threshold of the grayscale thumbnail: tissue is darker than the glass. ``bool [h, w]``."""
    from skimage.filters import threshold_otsu

    gray = thumb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    if float(gray.max() - gray.min()) < 1.0:
        return np.zeros(gray.shape, bool)  # one flat colour: no tissue to separate
    return gray < threshold_otsu(gray)


def tissue_patches(slide, mask: np.ndarray, scale: float, level: int, patch: int,  # noqa: ANN001
                   min_tissue: float) -> list[tuple[int, int]]:
    """Level-0 ``(x, y)`` of the patches with enough tissue, in row-major order."""
    lw, lh = slide.level_dimensions[level]
    ds = slide.level_downsamples[level]
    nx = max(1, lw // patch)
    ny = max(1, lh // patch)
    mh, mw = mask.shape
    found = []
    for j in range(ny):
        for i in range(nx):
            x0, y0 = i * patch * ds, j * patch * ds
            x1, y1 = min((i + 1) * patch * ds, slide.dimensions[0]), \
                min((j + 1) * patch * ds, slide.dimensions[1])
            mx0, my0 = int(x0 / scale), int(y0 / scale)
            mx1 = min(mw, max(mx0 + 1, math.ceil(x1 / scale)))
            my1 = min(mh, max(my0 + 1, math.ceil(y1 / scale)))
            window = mask[my0:my1, mx0:mx1]
            if window.size and window.mean() >= min_tissue:
                found.append((round(x0), round(y0)))
    return found


def evenly(items: list, k: int) -> list:
    """Up to ``k`` items, evenly spaced, in their original order."""
    if len(items) <= k:
        return list(items)
    idx = np.unique(np.rint(np.linspace(0, len(items) - 1, k)).astype(int))
    return [items[i] for i in idx]


def load(path: Path, options: Mapping[str, str]) -> list[Sample]:
    """Load a slide into one sample of tissue patches (``uint8 [P, P, 3]`` each)."""
    import openslide

    from ..errors import InvalidInputError
    from ..limits import check_pixels, max_pixels

    patch = opt_int(options, "patch_size", minimum=16)
    max_patches = opt_int(options, "max_patches", minimum=1)
    magnification = opt_float(options, "magnification", positive=True)
    mpp = opt_float(options, "mpp", positive=True)
    min_tissue = opt_float(options, "min_tissue")
    if min_tissue is None or not 0.0 <= min_tissue <= 1.0:
        raise InvalidInputError(f"option min_tissue={options['min_tissue']!r} must be in 0..1")
    limit = max_pixels(options)
    slide = open_slide(path)
    try:
        lw, lh = slide.level_dimensions[-1]
        check_pixels(path, lw * lh, f"its smallest level ({lw} x {lh}; the tissue mask reads "
                     "it whole, tile by tile)", limit)
        background = _background(slide)
        level = choose_level(slide, magnification, mpp)
        thumb, scale = thumbnail(slide, path, background)
        coords = tissue_patches(slide, tissue_mask(thumb), scale, level, patch, min_tissue)
        if not coords:
            raise InvalidInputError(f"{path}: no tissue found (Otsu mask on the thumbnail); "
                                    "lower min_tissue or check the slide")
        chosen = evenly(coords, max_patches)
        ds = slide.level_downsamples[level]
        parts, locs = [], []
        for x, y in chosen:
            region = _read(slide, path, (x, y), level, (patch, patch))
            parts.append(ImagePart(_composite(region, background)))
            locs.append(Location(str(path), patch=(x, y, round(patch * ds), round(patch * ds)),
                                 level=level))
        props = slide.properties
        base_mpp = _float(props.get(openslide.PROPERTY_NAME_MPP_X))
        meta: dict[str, object] = {
            "modality": "SM", "vendor": props.get(openslide.PROPERTY_NAME_VENDOR, "unknown"),
            "level": level, "downsample": float(ds), "patch_size": patch,
            "num_patches": len(coords), "num_selected": len(chosen),
            "image_size": list(slide.dimensions),
        }
        if base_mpp:
            meta["mpp"] = base_mpp * float(ds)
        objective = _float(props.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER))
        if objective:
            meta["objective_power"] = objective
    finally:
        slide.close()
    return [Sample(tuple(parts), NAME, Provenance(str(path), tuple(locs)), meta)]


@hookimpl
def medgemma_register_modalities(register) -> None:  # noqa: ANN001
    register(ModalitySpec(
        name=NAME,
        description="Whole-slide images: tissue patches (Otsu mask) at the level nearest "
                    "10X, up to 125, in spatial order, on the slide's background colour",
        claims=("*.svs, *.tif(f), *.ndpi, *.mrxs, *.scn, *.bif, *.vms (OpenSlide formats)",
                "*.dcm (VL Whole Slide Microscopy)"),
        detect=detect,
        load=load,
        options=(
            Option("magnification", "10", "target objective magnification (X)"),
            Option("mpp", "none", "target microns per pixel (overrides magnification)"),
            Option("patch_size", "896", "patch side in pixels at the chosen level"),
            Option("max_patches", "125", "patches kept, evenly spaced in spatial order"),
            Option("min_tissue", "0.25", "fraction of a patch the tissue mask must cover"),
            MAX_PIXELS_OPTION,
        ),
    ))
