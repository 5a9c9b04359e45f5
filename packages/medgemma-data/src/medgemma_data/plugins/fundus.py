"""fundus: colour fundus photographs (JPEG/PNG) -> one RGB image, EXIF orientation applied."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from ..hookspecs import hookimpl
from ..sample import Sample
from ..spec import ModalitySpec
from .photo import fundus_like, load_photo, photo_options, small_rgb

NAME = "fundus"


def detect(path: Path) -> int:
    """60 for a colour photograph with a bright disc on a dark surround."""
    arr = small_rgb(path)
    return 60 if arr is not None and fundus_like(arr) else 0


def load(path: Path, options: Mapping[str, str]) -> list[Sample]:
    """Load one fundus photograph."""
    return load_photo(path, options, NAME)


@hookimpl
def medgemma_register_modalities(register) -> None:  # noqa: ANN001
    register(ModalitySpec(
        name=NAME,
        description="Colour fundus photographs: EXIF orientation applied, optional pad to "
                    "square (black)",
        claims=("*.jpg / *.png (a bright retinal disc on a black surround)",),
        detect=detect,
        load=load,
        options=photo_options("000000"),
    ))
