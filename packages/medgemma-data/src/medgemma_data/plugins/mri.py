"""mri: an MR series (a folder, or one file) -> sampled slices, min-max over the volume.

The whole acquisition (every slice of the series, after the modality LUT) sets the range
mapped to 0..255, so relative intensities between slices are kept.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from ..hookspecs import hookimpl
from ..limits import MAX_PIXELS_OPTION
from ..sample import Sample
from ..spec import ModalitySpec, Option
from .ct import volume_samples

NAME = "mri"


def detect(path: Path) -> int:
    """90 for a DICOM file or a folder whose images are mostly Modality MR."""
    from ..series import detect_volume

    return detect_volume(path, "MR")


def load(path: Path, options: Mapping[str, str]) -> list[Sample]:
    """Load an MR series folder or file into one sample per series."""
    from .. import series
    from ..imaging import gray_to_rgb, to_uint8
    from ..limits import max_pixels

    limit = max_pixels(options)

    def to_rgb(vol, keep):  # noqa: ANN001, ANN202
        everything, _ = series.read_slices(vol, list(range(len(vol.slices))), limit)
        lo = float(min(s.min() for s in everything))
        hi = float(max(s.max() for s in everything))
        images = [gray_to_rgb(to_uint8(everything[i], lo, hi)) for i in keep]
        return images, {"intensity_range": [lo, hi]}

    return volume_samples(path, options, NAME, to_rgb)


@hookimpl
def medgemma_register_modalities(register) -> None:  # noqa: ANN001
    register(ModalitySpec(
        name=NAME,
        description="MR series: min-max over the whole acquisition, slices in spatial order, "
                    "up to 85 sampled, each followed by 'SLICE k'",
        claims=("folder of DICOM slices (Modality MR), split by series", "*.dcm (Modality MR)"),
        detect=detect,
        load=load,
        options=(Option("max_slices", "85", "slices kept per series (uniform sampling)"),
                 MAX_PIXELS_OPTION),
    ))
