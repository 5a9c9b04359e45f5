"""The ``Sample`` record every modality plugin returns.

A sample is what the model sees for one case: an ordered list of parts, each either text or an
RGB image (``uint8``, shape ``[H, W, 3]``), plus where it came from and a small set of
non-identifying metadata. Patient identifiers (names, ids, birth dates, accession numbers, free
text descriptions) never enter a sample: :data:`ALLOWED_METADATA_KEYS` is an allow-list and
anything else is rejected when the sample is built.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

#: Metadata keys a sample may carry. Non-identifying by construction: acquisition geometry,
#: modality and anatomy terms, dataset bookkeeping. Never names, ids, dates or free text.
ALLOWED_METADATA_KEYS: frozenset[str] = frozenset({
    "modality",            # the DICOM Modality (CT, MR, CR, DX, SM, US...) or the plugin's name
    "body_part",           # BodyPartExamined
    "view",                # ViewPosition (PA, AP, LATERAL...)
    "laterality",          # L / R
    "photometric",         # PhotometricInterpretation of the source
    "bits_stored",
    "transfer_syntax",     # e.g. "JPEG Baseline (Process 1)"
    "rows",
    "columns",
    "pixel_spacing",       # [row, column] in mm
    "slice_thickness",     # mm
    "spacing",             # distance between sampled slices, mm
    "num_slices",          # slices in the series
    "num_frames",          # frames in a multi-frame object
    "num_selected",        # images kept after sampling
    "frame_rate",          # frames per second (cine loops)
    "windows",             # CT windows used, [[lo, hi], ...] in HU
    "voi_window",          # [center, width] of the DICOM VOI window applied
    "intensity_range",     # [min, max] of the source values mapped to 0..255
    "vendor",              # slide format as OpenSlide names it (aperio, generic-tiff, dicom...)
    "level",               # pyramid level used
    "downsample",          # of that level relative to level 0
    "mpp",                 # microns per pixel of the patches
    "objective_power",     # of level 0
    "patch_size",
    "num_patches",         # tissue patches found before sampling
    "image_size",          # [width, height] of the source image
    "exif_orientation",    # the EXIF orientation tag that was applied
    "padded",              # whether the image was padded to a square
    "dataset",             # QA set name (medqa, medmcqa, pubmedqa, mmlu, afrimedqa, vqa)
    "subject",             # QA subject or exam step
    "answer_type",         # OPEN / CLOSED for VQA
    "question_index",      # line / item number within the dataset file
    "num_options",
    "resource_counts",     # FHIR resource type -> count
    "gender",              # FHIR administrative gender (not identifying alone)
})


@dataclass(frozen=True)
class TextPart:
    """A piece of text, in order among the sample's parts."""

    text: str

    def __post_init__(self) -> None:
        if not isinstance(self.text, str):
            raise TypeError(f"TextPart.text must be str, got {type(self.text).__name__}")


@dataclass(frozen=True, eq=False)
class ImagePart:
    """An RGB image, ``uint8`` of shape ``[H, W, 3]``, C-contiguous and read-only."""

    image: np.ndarray

    def __post_init__(self) -> None:
        img = self.image
        if not isinstance(img, np.ndarray) or img.dtype != np.uint8:
            raise TypeError("ImagePart.image must be a uint8 numpy array; convert with "
                            "medgemma_data.imaging.to_uint8 first")
        if img.ndim != 3 or img.shape[2] != 3 or img.shape[0] == 0 or img.shape[1] == 0:
            raise ValueError(f"ImagePart.image must have shape [H, W, 3], got {img.shape}; "
                             "use medgemma_data.imaging.gray_to_rgb for grayscale")
        img = np.ascontiguousarray(img)
        img.setflags(write=False)
        object.__setattr__(self, "image", img)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ImagePart) and np.array_equal(self.image, other.image)

    __hash__ = None  # type: ignore[assignment]


Part = TextPart | ImagePart


@dataclass(frozen=True)
class Location:
    """Where one image part came from inside the source.

    ``file``: the file it was read from (for a series folder, the slice's file);
    ``frame``: 0-based frame of a multi-frame object; ``slice_index``: 0-based position of the
    slice in the spatially ordered series; ``patch``: ``(x, y, width, height)`` in level-0
    pixels of a slide; ``level``: the pyramid level read.
    """

    file: str
    frame: int | None = None
    slice_index: int | None = None
    patch: tuple[int, int, int, int] | None = None
    level: int | None = None


@dataclass(frozen=True)
class Provenance:
    """The source path given to the loader and one :class:`Location` per image part."""

    source: str
    locations: tuple[Location, ...] = ()


def _check_metadata_value(key: str, value: object) -> None:
    if value is None or isinstance(value, bool | int | float | str):
        return
    if isinstance(value, Sequence):
        for item in value:
            _check_metadata_value(key, item)
        return
    if isinstance(value, Mapping):
        for k, item in value.items():
            if not isinstance(k, str):
                raise TypeError(f"metadata[{key!r}] keys must be str")
            _check_metadata_value(key, item)
        return
    raise TypeError(f"metadata[{key!r}] must be JSON-like (str, number, list, dict), "
                    f"got {type(value).__name__}")


@dataclass(frozen=True)
class Sample:
    """One model-ready case.

    ``parts``: text and images in the order the model reads them; ``modality``: the registered
    modality name of the plugin that made it; ``provenance``: source and per-image locations;
    ``metadata``: allow-listed, JSON-like, non-identifying facts (:data:`ALLOWED_METADATA_KEYS`);
    ``label``: a target when the source carries one (the answer letter of a QA item).
    """

    parts: tuple[Part, ...]
    modality: str
    provenance: Provenance
    metadata: Mapping[str, object] = field(default_factory=dict)
    label: str | None = None

    def __post_init__(self) -> None:
        parts = tuple(self.parts)
        for part in parts:
            if not isinstance(part, TextPart | ImagePart):
                raise TypeError(f"Sample parts must be TextPart or ImagePart, got "
                                f"{type(part).__name__}")
        object.__setattr__(self, "parts", parts)
        bad = sorted(set(self.metadata) - ALLOWED_METADATA_KEYS)
        if bad:
            raise ValueError(f"metadata keys {bad} are not on the non-identifying allow-list "
                             "(medgemma_data.sample.ALLOWED_METADATA_KEYS); drop them")
        for key, value in self.metadata.items():
            _check_metadata_value(key, value)
        object.__setattr__(self, "metadata", dict(self.metadata))
        n_images = sum(isinstance(p, ImagePart) for p in parts)
        locs = self.provenance.locations
        if locs and len(locs) != n_images:
            raise ValueError(f"provenance has {len(locs)} locations for {n_images} images")

    @property
    def images(self) -> list[np.ndarray]:
        """The image parts' arrays, in order (each ``uint8 [H, W, 3]``)."""
        return [p.image for p in self.parts if isinstance(p, ImagePart)]

    @property
    def texts(self) -> list[str]:
        """The text parts, in order."""
        return [p.text for p in self.parts if isinstance(p, TextPart)]

    def to_messages(self, question: str | None = None, *, answer: str | None = None,
                    system: str | None = None, images: bool = True) -> list[dict]:
        """This sample as chat messages: ``[system?, user, assistant?]``.

        The user turn is ``question`` then the parts in order (images as
        ``{"type": "image", "image": uint8 [H, W, 3]}``, texts such as ``SLICE k`` as
        ``{"type": "text"}`` items); see :func:`medgemma_data.to_messages` (several samples,
        ``images=False`` for text-only models).
        """
        from .messages import to_messages

        return to_messages(self, question, answer=answer, system=system, images=images)
