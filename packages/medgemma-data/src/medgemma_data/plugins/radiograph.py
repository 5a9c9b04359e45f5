"""radiograph: projection radiographs (DICOM CR/DX/MG..., or PNG/JPEG) -> one RGB image.

DICOM: modality LUT (rescale), then the first VOI LUT or window when present (pydicom), a
min-max stretch to 0..255, and MONOCHROME1 inverted (pydicom does not invert). Multi-frame
objects keep their frames (evenly sampled) with ``FRAME k`` text after each. PNG/JPEG files
are read as every package reads them (:func:`medgemma_data.imaging.read_image`: EXIF
orientation, 16-bit grayscale min-max stretched to 8 bits), then made gray and stretched the
same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..hookspecs import hookimpl
from ..limits import MAX_PIXELS_OPTION
from ..sample import ImagePart, Location, Provenance, Sample, TextPart
from ..spec import ModalitySpec, Option, opt_bool, opt_int
from . import IMAGE_SUFFIXES, MAX_DETECT_PIXELS

NAME = "radiograph"
PROJECTION_MODALITIES = frozenset({"CR", "DX", "MG", "RG", "PX", "IO", "XA", "RF", "DR"})
VOLUME_MODALITIES = frozenset({"CT", "MR", "PT", "NM"})


def detect(path: Path) -> int:
    """90 for DICOM CR/DX/MG..., 60 for a grayscale PNG/JPEG, 10 for any other 2-D DICOM."""
    from .. import dicom

    ds = dicom.header(path)
    if ds is not None:
        if "Rows" not in ds or dicom.is_wsi(ds):
            return 0
        modality = str(ds.get("Modality", "")).upper()
        if modality in PROJECTION_MODALITIES:
            return 90
        if modality in VOLUME_MODALITIES:
            return 0
        return 10  # any other DICOM image (RT dose, secondary capture, ...): a fallback
    if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
        return 60 if _is_grayscale_image(path) else 0
    return 0


def _is_grayscale_image(path: Path) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.mode in ("L", "I", "I;16", "I;16B", "I;16L", "F", "1"):
                return True
            if im.mode not in ("RGB", "RGBA") or im.width * im.height > MAX_DETECT_PIXELS:
                return False
            im.draft("RGB", (128, 128))
            small = np.asarray(im.convert("RGB").resize((64, 64)), dtype=np.int16)
    except Exception:
        return False
    return bool(np.abs(small - small[..., :1]).max() <= 2)


def dicom_to_rgb(path: Path, *, apply_voi: bool = True, max_frames: int = 85,
                 max_pixels: int | None = None
                 ) -> tuple[list[np.ndarray], list[int | None], dict[str, object]]:
    """One DICOM file -> its display images ``uint8 [H, W, 3]``, their frame numbers, metadata.

    The intensity mapping (VOI, stretch range, inversion) is shared by all frames.
    """
    from .. import dicom, series
    from ..imaging import gray_to_rgb, to_uint8

    ds = dicom.read(path)
    arr = dicom.frames(ds, path, max_pixels)  # [F, H, W] or [F, H, W, 3]
    n = arr.shape[0]
    keep = series.sample_indices(n, max_frames)
    meta = dicom.basic_metadata(ds)
    if n > 1:
        meta["num_frames"] = n
        meta["num_selected"] = len(keep)
    if arr.ndim == 4:  # colour (pydicom converts YBR to RGB)
        if arr.dtype == np.uint8:
            images = [arr[i] for i in keep]
        else:
            lo, hi = float(arr.min()), float(arr.max())
            images = [to_uint8(arr[i], lo, hi) for i in keep]
            meta["intensity_range"] = [lo, hi]
        return images, ([None] if n == 1 else keep), meta
    values = dicom.modality_lut(arr[keep], ds)
    if apply_voi:
        values, window = dicom.voi_window(values, ds)
        if window is not None:
            meta["voi_window"] = window
    lo, hi = float(values.min()), float(values.max())
    meta["intensity_range"] = [lo, hi]
    gray = to_uint8(values, lo, hi)
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        gray = 255 - gray
    images = [gray_to_rgb(g) for g in gray]
    return images, ([None] if n == 1 else keep), meta


def _image_file(path: Path, max_pixels: int | None = None) -> tuple[np.ndarray, dict[str, object]]:
    """A PNG/JPEG read the shared way (:func:`~medgemma_data.imaging.read_image`: 16-bit
    grayscale already stretched), then the radiograph rule: gray (mean of RGB), stretched."""
    from ..imaging import gray_to_rgb, read_image, stretch

    image, facts = read_image(path, max_pixels)
    gray = image.mean(axis=2)
    lo, hi = float(gray.min()), float(gray.max())
    meta = {"modality": "radiograph", "image_size": facts["image_size"],
            "intensity_range": facts.get("intensity_range", [lo, hi])}
    return gray_to_rgb(stretch(gray)), meta


def load(path: Path, options: Mapping[str, str]) -> list[Sample]:
    """Load a radiograph file into one sample (``FRAME k`` texts for multi-frame DICOM)."""
    from .. import dicom
    from ..errors import InvalidInputError
    from ..limits import max_pixels as pixel_limit

    if path.is_dir():
        raise InvalidInputError(f"{path} is a folder; the radiograph modality reads one file")
    max_frames = opt_int(options, "max_frames", minimum=1)
    limit = pixel_limit(options)
    if dicom.has_dicom_preamble(path):
        images, frame_ids, meta = dicom_to_rgb(path, apply_voi=opt_bool(options, "voi"),
                                               max_frames=max_frames, max_pixels=limit)
    elif path.suffix.lower() in IMAGE_SUFFIXES:
        image, meta = _image_file(path, limit)
        images, frame_ids = [image], [None]
    else:
        raise InvalidInputError(f"{path} is neither DICOM nor a PNG/JPEG image; "
                                "check the path or pass the right --modality")
    parts: list = []
    for k, image in enumerate(images, start=1):
        parts.append(ImagePart(image))
        if len(images) > 1:
            parts.append(TextPart(f"FRAME {k}"))
    locations = tuple(Location(str(path), frame=f) for f in frame_ids)
    return [Sample(tuple(parts), NAME, Provenance(str(path), locations), meta)]


@hookimpl
def medgemma_register_modalities(register) -> None:  # noqa: ANN001
    register(ModalitySpec(
        name=NAME,
        description="Projection radiographs: DICOM CR/DX/MG (any transfer syntax) or a "
                    "grayscale PNG/JPEG -> one display-ready RGB image",
        claims=("*.dcm (Modality CR, DX, MG, RG, PX, IO, XA, RF)", "*.png / *.jpg (grayscale)",
                "any other 2-D DICOM image (fallback)"),
        detect=detect,
        load=load,
        options=(
            Option("voi", "true", "apply the DICOM VOI LUT / window when present"),
            Option("max_frames", "85", "frames kept from a multi-frame object (evenly sampled)"),
            MAX_PIXELS_OPTION,
        ),
    ))
