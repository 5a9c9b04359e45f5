"""derm: dermatology photographs (colour JPEG/PNG) -> one RGB image, EXIF orientation applied."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from ..hookspecs import hookimpl
from ..sample import Sample
from ..spec import ModalitySpec
from .photo import fundus_like, load_photo, photo_options, small_rgb

NAME = "derm"


def detect(path: Path) -> int:
    """30 for a colour photograph (a generic claim); 20 when it looks like a fundus image."""
    arr = small_rgb(path)
    if arr is None:
        return 0
    return 20 if fundus_like(arr) else 30


def load(path: Path, options: Mapping[str, str]) -> list[Sample]:
    """Load one skin photograph."""
    return load_photo(path, options, NAME)


@hookimpl
def medgemma_register_modalities(register) -> None:  # noqa: ANN001
    register(ModalitySpec(
        name=NAME,
        description="Dermatology photographs: EXIF orientation applied, optional pad to square",
        claims=("*.jpg / *.png / *.webp / *.bmp (colour photographs)",),
        detect=detect,
        load=load,
        options=photo_options("ffffff"),
    ))
