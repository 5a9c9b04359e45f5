"""ct: a CT series (a folder, or one slice) -> slices as 3-window RGB images + ``SLICE k``.

Hounsfield units come from the modality LUT (rescale slope/intercept). Each channel is one
window, clipped and scaled to 0..255 (default, MedGemma's CT notebook: R -1024..1024,
G -135..215, B 0..80). Slices are in spatial order; several series in a folder give one
sample each; more than ``max_slices`` slices are sampled uniformly.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..hookspecs import hookimpl
from ..limits import MAX_PIXELS_OPTION
from ..sample import ImagePart, Location, Provenance, Sample, TextPart
from ..spec import ModalitySpec, Option, opt_int

NAME = "ct"

#: Named window sets, (lo, hi) in HU per channel R, G, B.
WINDOW_PRESETS: dict[str, tuple[tuple[float, float], ...]] = {
    # MedGemma's CT notebook (the default).
    "notebook": ((-1024.0, 1024.0), (-135.0, 215.0), (0.0, 80.0)),
    # Google's serving code: the soft-tissue channel starts at +135.
    "serving": ((-1024.0, 1024.0), (135.0, 215.0), (0.0, 80.0)),
    # The 2025 technical report: WW/WL 2250/-100, 350/40, 80/40.
    "report": ((-1225.0, 1025.0), (-135.0, 215.0), (0.0, 80.0)),
}


def parse_windows(text: str) -> tuple[tuple[float, float], ...]:
    """A preset name, or three ``lo:hi`` pairs in HU separated by commas."""
    from ..errors import OptionError

    t = text.strip().lower()
    if t in WINDOW_PRESETS:
        return WINDOW_PRESETS[t]
    try:
        pairs = tuple(tuple(float(v) for v in w.split(":")) for w in t.split(","))
    except ValueError:
        pairs = ()
    if len(pairs) != 3 or any(len(p) != 2 or not p[1] > p[0] for p in pairs):
        raise OptionError(f"option windows={text!r} must be a preset "
                          f"({', '.join(WINDOW_PRESETS)}) or three lo:hi HU windows, "
                          "e.g. -1024:1024,-135:215,0:80")
    return pairs  # type: ignore[return-value]


def window_rgb(hu: np.ndarray, windows: tuple[tuple[float, float], ...]) -> np.ndarray:
    """``[H, W]`` HU -> ``uint8 [H, W, 3]``, one window per channel."""
    from ..imaging import to_uint8

    return np.stack([to_uint8(hu, lo, hi) for lo, hi in windows], axis=-1)


def detect(path: Path) -> int:
    """90 for a DICOM file or a folder whose images are mostly Modality CT."""
    from ..series import detect_volume

    return detect_volume(path, "CT")


def volume_samples(path: Path, options: Mapping[str, str], name: str, to_rgb) -> list[Sample]:  # noqa: ANN001
    """Shared CT/MR loader: ``to_rgb(list of HU/value slices) -> list of uint8 RGB``."""
    from .. import dicom, series

    max_slices = opt_int(options, "max_slices", minimum=1)
    samples = []
    for vol in series.volumes(path):
        keep = series.sample_indices(len(vol.slices), max_slices)
        images, extra = to_rgb(vol, keep)
        parts: list = []
        for k, image in enumerate(images, start=1):
            parts.append(ImagePart(image))
            parts.append(TextPart(f"SLICE {k}"))
        meta = dicom.basic_metadata(vol.header)
        meta.pop("transfer_syntax", None)
        meta.update(num_slices=len(vol.slices), num_selected=len(keep), **extra)
        thickness = dicom.safe_float_list(vol.header.get("SliceThickness"))
        if thickness:
            meta["slice_thickness"] = thickness[0]
        spacing = series.slice_spacing(vol, keep)
        if spacing is not None:
            meta["spacing"] = spacing
        locs = tuple(Location(str(vol.slices[i].file), frame=vol.slices[i].frame,
                              slice_index=i) for i in keep)
        samples.append(Sample(tuple(parts), name, Provenance(str(path), locs), meta))
    return samples


def load(path: Path, options: Mapping[str, str]) -> list[Sample]:
    """Load a CT series folder or slice into one sample per series."""
    from .. import series
    from ..limits import max_pixels

    windows = parse_windows(options["windows"])
    limit = max_pixels(options)

    def to_rgb(vol, keep):  # noqa: ANN001, ANN202
        hu, _ = series.read_slices(vol, keep, limit)
        return [window_rgb(h, windows) for h in hu], {"windows": [list(w) for w in windows]}

    return volume_samples(path, options, NAME, to_rgb)


@hookimpl
def medgemma_register_modalities(register) -> None:  # noqa: ANN001
    register(ModalitySpec(
        name=NAME,
        description="CT series: HU in three windows as RGB, slices in spatial order, "
                    "up to 85 sampled, each followed by 'SLICE k'",
        claims=("folder of DICOM slices (Modality CT), split by series", "*.dcm (Modality CT)"),
        detect=detect,
        load=load,
        options=(
            Option("windows", "notebook", "R,G,B windows in HU: a preset (notebook, serving, "
                   "report) or lo:hi,lo:hi,lo:hi"),
            Option("max_slices", "85", "slices kept per series (uniform sampling)"),
            MAX_PIXELS_OPTION,
        ),
    ))
