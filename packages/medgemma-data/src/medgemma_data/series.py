"""DICOM volumes: collect a series folder, split it by series, order slices in space, sample.

Slices are ordered by the projection of ImagePositionPatient on the slice normal
(the cross product of the two ImageOrientationPatient direction cosines), never by
InstanceNumber or file name, which scanners and anonymisers do not keep consistent.
A single multi-frame file is a volume of its frames (RT dose grids, enhanced CT/MR).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import dicom
from .errors import InvalidInputError

MAX_FILES = 20000


@dataclass(frozen=True)
class Slice:
    """One 2-D image of a volume: its file, frame (for multi-frame files) and position (mm)."""

    file: Path
    frame: int | None
    position: float | None


@dataclass(frozen=True)
class Volume:
    """One series, its slices in spatial order, and the header of its first slice."""

    slices: tuple[Slice, ...]
    header: object  # pydicom Dataset of the first file (read-only)


def detect_volume(path: Path, modality: str) -> int:
    """A detector score for volume plugins: 90 when ``path`` (a DICOM file, or a folder's
    sniffed DICOM headers) is mostly of DICOM ``Modality`` ``modality`` (``"CT"``, ``"MR"``,
    ...) and holds no slide, else 0."""
    headers = dicom.sniff(path)
    if not headers or any(dicom.is_wsi(ds) for ds in headers):
        return 0
    hits = sum(str(ds.get("Modality", "")).upper() == modality for ds in headers)
    return 90 if hits * 2 > len(headers) else 0


def dicom_files(path: Path) -> list[Path]:
    """The DICOM files of a folder (recursive, sorted) or ``[path]`` for a DICOM file."""
    if path.is_file():
        if not dicom.has_dicom_preamble(path):
            raise InvalidInputError(f"{path} is not a DICOM file (no DICM preamble); "
                                    "check the path or pass the right --modality")
        return [path]
    files = []
    for p in sorted(path.rglob("*")):
        if p.is_file() and dicom.has_dicom_preamble(p):
            files.append(p)
            if len(files) > MAX_FILES:
                raise InvalidInputError(f"{path} holds more than {MAX_FILES} DICOM files; "
                                        "point at one series folder")
    if not files:
        raise InvalidInputError(f"folder {path} holds no DICOM files; point at a series folder")
    return files


def _normal(ds) -> np.ndarray | None:  # noqa: ANN001
    iop = dicom.safe_float_list(ds.get("ImageOrientationPatient"))
    if not iop or len(iop) != 6:
        return None
    n = np.cross(np.asarray(iop[:3]), np.asarray(iop[3:]))
    norm = np.linalg.norm(n)
    return n / norm if norm > 0 else None


def _position(ds, normal: np.ndarray | None) -> float | None:  # noqa: ANN001
    ipp = dicom.safe_float_list(ds.get("ImagePositionPatient"))
    if not ipp or len(ipp) != 3 or normal is None:
        return None
    return float(np.dot(np.asarray(ipp), normal))


def _frame_positions(ds, n_frames: int) -> list[float | None]:  # noqa: ANN001
    """Positions of the frames of a multi-frame object along its normal, when stated."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and len(per_frame) == n_frames:
        shared = ds.get("SharedFunctionalGroupsSequence")
        out: list[float | None] = []
        for item in per_frame:
            orient = item.get("PlaneOrientationSequence") or (
                shared[0].get("PlaneOrientationSequence") if shared else None)
            pos = item.get("PlanePositionSequence")
            if not orient or not pos:
                return [None] * n_frames
            out.append(_position(pos[0], _normal(orient[0])))
        return out
    offsets = dicom.safe_float_list(ds.get("GridFrameOffsetVector"))
    if offsets and len(offsets) == n_frames:
        base = _position(ds, _normal(ds)) or 0.0
        return [base + o for o in offsets]
    return [None] * n_frames


def volumes(path: Path) -> list[Volume]:
    """Split ``path`` (a folder or one file) into series, each in spatial order.

    Slices without a usable position keep the order of (InstanceNumber, file name), and a
    series mixing both is ordered by position with the unpositioned ones last.
    """
    groups: dict[str, list[tuple[Slice, int]]] = {}
    headers: dict[str, object] = {}
    for f in dicom_files(path):
        ds = dicom.header(f)
        if ds is None:
            if path.is_file():
                dicom.read(f)  # raises the precise error
            continue  # an unreadable file in a folder: skip it, others may be fine
        if "Rows" not in ds:
            continue  # not an image (DICOMDIR, SR, ...)
        uid = str(ds.get("SeriesInstanceUID", "unknown"))
        headers.setdefault(uid, ds)
        inst = dicom.header_int(ds, "InstanceNumber")
        n_frames = dicom.num_frames(ds)
        if n_frames > 1:
            for i, pos in enumerate(_frame_positions(ds, n_frames)):
                groups.setdefault(uid, []).append((Slice(f, i, pos), inst))
        else:
            groups.setdefault(uid, []).append((Slice(f, None, _position(ds, _normal(ds))), inst))
    if not groups:
        raise InvalidInputError(f"{path} holds no readable DICOM images")
    out = []
    for uid, items in groups.items():
        items.sort(key=lambda it: (it[0].position is None,
                                   it[0].position if it[0].position is not None else 0.0,
                                   it[1], str(it[0].file), it[0].frame or 0))
        out.append(Volume(tuple(s for s, _ in items), headers[uid]))
    out.sort(key=lambda v: str(v.slices[0].file))
    return out


def sample_indices(n: int, k: int) -> list[int]:
    """Indices of the slices kept: all when ``n <= k``; else ``round(i / k * (n - 1))``
    for ``i = 1..k`` (MedGemma's CT notebook rule)."""
    if n <= k:
        return list(range(n))
    return [round(i / k * (n - 1)) for i in range(1, k + 1)]


def read_slices(volume: Volume, indices: list[int], max_pixels: int | None = None
                ) -> tuple[list[np.ndarray], list]:
    """Decode the chosen slices: ``[H, W]`` float64 after the modality LUT, with headers.

    The files to decode may claim at most ``max_pixels`` together (default
    :func:`medgemma_data.limits.max_pixels`); more is refused before any is decoded.
    """
    from .limits import check_pixels
    from .limits import max_pixels as default_limit

    limit = default_limit() if max_pixels is None else max_pixels
    files = list(dict.fromkeys(volume.slices[i].file for i in indices))
    claimed = sum(dicom.claimed_pixels(h) for h in map(dicom.header, files) if h is not None)
    check_pixels(volume.slices[0].file.parent, claimed,
                 f"the {len(files)} DICOM files to read from this series", limit)
    by_file: dict[Path, object] = {}
    images, headers = [], []
    for i in indices:
        s = volume.slices[i]
        if s.file not in by_file:
            ds = dicom.read(s.file)
            by_file[s.file] = (ds, dicom.frames(ds, s.file, limit))
        ds, arr = by_file[s.file]
        frame = arr[s.frame or 0]
        if frame.ndim != 2:
            raise InvalidInputError(f"{s.file}: a volume slice must be grayscale, got "
                                    f"shape {frame.shape}")
        images.append(dicom.modality_lut(frame, ds))
        headers.append(ds)
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise InvalidInputError(f"{volume.slices[0].file.parent}: slices of one series differ "
                                f"in size {sorted(shapes)}; point at a consistent series")
    return images, headers


def slice_spacing(volume: Volume, indices: list[int]) -> float | None:
    """Median distance (mm) between consecutive chosen slices, when positions are known."""
    pos = [volume.slices[i].position for i in indices]
    if len(pos) < 2 or any(p is None for p in pos):
        return None
    return float(np.median(np.abs(np.diff(np.asarray(pos, dtype=np.float64)))))
