"""The plugin module the entry point names: light, it only registers the modality.

The reader (and pydicom with it) is imported when a file is detected or loaded.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

from medgemma_data import ModalitySpec, Option, Sample, hookimpl


def _detect(path: Path) -> int:
    from .reader import detect

    return detect(path)


def _load(path: Path, options: Mapping[str, str]) -> list[Sample]:
    from .reader import load

    return load(path, options)


@hookimpl
def medgemma_register_modalities(register: Callable[[ModalitySpec], None]) -> None:
    register(ModalitySpec(
        name="ultrasound",
        description="Ultrasound cine loops (multi-frame DICOM, Modality US): evenly sampled "
                    "frames, each followed by 'FRAME k (t = ... s)'",
        claims=("*.dcm (Modality US, multi-frame)",),
        detect=_detect,
        load=_load,
        options=(Option("frames", "8", "frames sampled from the loop, first and last included"),),
    ))
