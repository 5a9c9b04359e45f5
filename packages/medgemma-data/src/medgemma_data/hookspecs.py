"""The hooks a medgemma-data plugin may implement.

Plugins are found through the entry-point group ``medgemma.modalities``; the entry point
names a light module holding ``@hookimpl`` functions. Hooks are called with keywords only.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pluggy

from .sample import Sample
from .spec import ModalitySpec

PROJECT = "medgemma"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def medgemma_register_modalities(register: Callable[[ModalitySpec], None]) -> None:
    """Register the modalities this plugin adds by calling ``register(ModalitySpec(...))``.

    Called once per process, when the host first needs its registry. Keep this cheap: import
    heavy readers inside ``detect`` and ``load``, not at module level.

    Example::

        from medgemma_data import ModalitySpec, Option, hookimpl

        @hookimpl
        def medgemma_register_modalities(register):
            register(ModalitySpec(
                name="ultrasound",
                description="Ultrasound cine loops (multi-frame DICOM, Modality US)",
                claims=("*.dcm (Modality US, multi-frame)",),
                detect=_detect,            # Path -> 0..100
                load=_load,                # (Path, {option: str}) -> list[Sample]
                options=(Option("frames", "8", "frames sampled from the loop"),),
            ))
    """


@hookspec
def medgemma_samples_loaded(modality: str, path: Path, samples: list[Sample]) -> None:
    """Inspect the samples a loader produced, before they are returned to the caller.

    Every plugin sees every load (any modality). Use it to audit or count; raise a
    :class:`medgemma_data.errors.InvalidInputError` to reject the load (for instance a site
    policy that forbids images above a size). The list must not be modified.

    Example::

        from medgemma_data import hookimpl
        from medgemma_data.errors import InvalidInputError

        @hookimpl
        def medgemma_samples_loaded(modality, path, samples):
            if modality == "wsi" and not samples:
                raise InvalidInputError(f"{path}: no tissue patches; check the slide")
    """
