"""Reading an ultrasound cine loop with pydicom (imported lazily by ``plugin.py``)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from medgemma_data import (
    ImagePart,
    InvalidInputError,
    Location,
    OptionError,
    Provenance,
    Sample,
    TextPart,
)

NAME = "ultrasound"


def _header(path: Path):  # noqa: ANN202 - a pydicom Dataset or None
    import pydicom

    if not path.is_file():
        return None
    with open(path, "rb") as f:
        if f.read(132)[128:132] != b"DICM":
            return None
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:
        return None


def detect(path: Path) -> int:
    """95 for a multi-frame DICOM with Modality US (ahead of the generic radiograph fallback)."""
    ds = _header(path)
    if ds is None or str(ds.get("Modality", "")).upper() != "US":
        return 0
    return 95 if int(ds.get("NumberOfFrames", 1) or 1) > 1 else 0


def frame_indices(n: int, k: int) -> list[int]:
    """``k`` evenly spaced frame indices of ``n`` (first and last included), in order."""
    if n <= k:
        return list(range(n))
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)}) if k > 1 else [0]


def _frame_seconds(ds) -> float | None:  # noqa: ANN001
    """Seconds between frames: FrameTime (ms), else 1 / CineRate or display frame rate."""
    for tag, to_seconds in (("FrameTime", lambda v: v / 1000.0),
                            ("CineRate", lambda v: 1.0 / v),
                            ("RecommendedDisplayFrameRate", lambda v: 1.0 / v)):
        value = ds.get(tag)
        try:
            if value is not None and float(value) > 0:
                return to_seconds(float(value))
        except (TypeError, ValueError):
            continue
    return None


def load(path: Path, options: Mapping[str, str]) -> list[Sample]:
    """One cine loop -> one sample of ``frames`` RGB images ``uint8 [H, W, 3]`` with times."""
    import pydicom

    try:
        k = int(options["frames"])
    except ValueError:
        raise OptionError(f"option frames={options['frames']!r} must be an integer") from None
    if k < 1:
        raise OptionError("option frames must be at least 1")
    if _header(path) is None:
        raise InvalidInputError(f"{path} is not a DICOM file; the ultrasound modality reads "
                                "multi-frame US DICOM")
    try:
        ds = pydicom.dcmread(path)
        arr = ds.pixel_array  # YBR is converted to RGB by pydicom
    except Exception as exc:
        raise InvalidInputError(f"{path}: cannot decode the cine loop ({type(exc).__name__}); "
                                "the file is truncated or corrupt") from None
    n = int(ds.get("NumberOfFrames", 1) or 1)
    if n < 2 or arr.ndim < 3:
        raise InvalidInputError(f"{path} has one frame; load it with --modality radiograph")
    if arr.ndim == 3:  # grayscale [F, H, W]: one intensity mapping for the whole loop
        lo, hi = float(arr.min()), float(arr.max())
        scaled = np.rint((arr - lo) * (255.0 / max(hi - lo, 1e-9))).astype(np.uint8)
        arr = np.repeat(scaled[..., None], 3, axis=-1)
    elif arr.dtype != np.uint8:
        raise InvalidInputError(f"{path}: {arr.dtype} colour frames are not supported")
    step = _frame_seconds(ds)
    parts, locations = [], []
    for j, i in enumerate(frame_indices(n, k), start=1):
        parts.append(ImagePart(arr[i]))
        parts.append(TextPart(f"FRAME {j} (t = {i * step:.2f} s)" if step else f"FRAME {j}"))
        locations.append(Location(str(path), frame=i))
    meta: dict[str, object] = {"modality": "US", "num_frames": n,
                               "num_selected": len(locations),
                               "rows": int(ds.Rows), "columns": int(ds.Columns)}
    if step:
        meta["frame_rate"] = round(1.0 / step, 3)
    return [Sample(tuple(parts), NAME, Provenance(str(path), tuple(locations)), meta)]
