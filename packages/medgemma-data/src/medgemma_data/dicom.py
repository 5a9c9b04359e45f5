"""DICOM reading shared by the DICOM plugins: headers, pixels, decoder errors, LUTs.

Pixels are decoded by pydicom's decoder plugins (pylibjpeg-libjpeg, pylibjpeg-openjpeg,
pylibjpeg-rle), which medgemma-data declares; a missing decoder becomes a
:class:`~medgemma_data.errors.DecoderMissingError` naming the package to install.
Nothing here logs or returns patient identifiers.
"""

from __future__ import annotations

import warnings
from functools import lru_cache
from pathlib import Path

import numpy as np

from .errors import DecoderMissingError, InvalidInputError, is_rust_panic

#: Transfer-syntax family -> pip packages that decode it.
_DECODER_PACKAGES = {
    "JPEG-LS": "pylibjpeg pylibjpeg-libjpeg",
    "JPEG 2000": "pylibjpeg pylibjpeg-openjpeg",
    "JPEG": "pylibjpeg pylibjpeg-libjpeg",
    "RLE": "pylibjpeg pylibjpeg-rle",
}

WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"  # VL Whole Slide Microscopy Image Storage


def has_dicom_preamble(path: Path) -> bool:
    """True when ``path`` is a file with the ``DICM`` magic at byte 128."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _parse_all(ds) -> None:  # noqa: ANN001
    """Convert every element now: pydicom parses values lazily, on first access, so a corrupt
    element (an unknown VR, a value that is not its VR) would otherwise fail wherever a
    plugin first reads it. Also checks the transfer syntax UID names one."""
    for _ in ds.iterall():
        pass
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    if ts is not None and not ts.is_transfer_syntax:
        raise ValueError(f"TransferSyntaxUID {str(ts)[:64]!r} is not a transfer syntax")


@lru_cache(maxsize=256)
def _header(path: str, mtime_ns: int, size: int):  # noqa: ANN202 - a pydicom Dataset
    import pydicom

    with warnings.catch_warnings():  # pydicom's warnings on odd values: read() reports them
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        _parse_all(ds)
    return ds


def header(path: Path):  # noqa: ANN201 - a pydicom Dataset (read-only, shared: do not modify)
    """The header of a DICOM file (no pixel data), or ``None`` when it is not DICOM.

    Cached on (path, mtime, size) so several detectors share one read.
    """
    if not path.is_file() or not has_dicom_preamble(path):
        return None
    st = path.stat()
    try:
        return _header(str(path), st.st_mtime_ns, st.st_size)
    except Exception:
        return None


def read(path: Path):  # noqa: ANN201 - a pydicom Dataset
    """Read a whole DICOM file; a clear :class:`InvalidInputError` when it is not one."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = pydicom.dcmread(path)
            _parse_all(ds)
    except InvalidDicomError:
        raise InvalidInputError(f"{path} is not a DICOM file (no DICM preamble); "
                                "check the path or pass the right --modality") from None
    except Exception as exc:
        raise InvalidInputError(f"{path} is a truncated or corrupt DICOM file "
                                f"({type(exc).__name__}: {exc})") from None
    if any("End of file" in str(w.message) for w in caught) or len(ds) == 0:
        raise InvalidInputError(f"{path} is a truncated or corrupt DICOM file (it ends "
                                "inside an element); fetch the file again")
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        raise InvalidInputError(f"{path} is DICOM but holds no image (no PixelData); "
                                "point at an image object")
    return ds


def check_decoder(ds, path: Path) -> None:  # noqa: ANN001
    """Raise :class:`DecoderMissingError` if no installed plugin decodes ``ds``'s syntax."""
    from pydicom.pixels import get_decoder

    ts = ds.file_meta.get("TransferSyntaxUID")
    if ts is None or not ts.is_compressed:
        return
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        raise DecoderMissingError(f"{path}: transfer syntax {ts.name} ({ts}) has no decoder "
                                  "in pydicom; convert the file (e.g. with dcmtk's dcmdjpeg)") \
            from None
    if not decoder.is_available:
        family = next((k for k in _DECODER_PACKAGES if ts.name.startswith(k)), None)
        pkgs = _DECODER_PACKAGES.get(family or "", "python-gdcm")
        raise DecoderMissingError(f"{path}: no decoder installed for {ts.name}; "
                                  f"pip install {pkgs}")


def header_int(ds, keyword: str, default: int = 0) -> int:  # noqa: ANN001
    """An integer element of ``ds`` (``default`` when absent or empty); a clear
    :class:`InvalidInputError` when it is not a number."""
    value = ds.get(keyword)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise InvalidInputError(f"{getattr(ds, 'filename', None) or 'a DICOM file'}: "
                                f"{keyword} is {str(value)[:40]!r}, not a whole number; the "
                                "header is corrupt") from None


def num_frames(ds) -> int:  # noqa: ANN001
    """NumberOfFrames, at least 1."""
    return max(1, header_int(ds, "NumberOfFrames", 1))


def claimed_pixels(ds) -> int:  # noqa: ANN001
    """Rows x Columns x frames, as the header states them (nothing decoded)."""
    rows, cols = header_int(ds, "Rows"), header_int(ds, "Columns")
    return max(0, rows) * max(0, cols) * num_frames(ds)


def frames(ds, path: Path, max_pixels: int | None = None) -> np.ndarray:  # noqa: ANN001
    """Decoded pixels as ``[F, H, W]`` or ``[F, H, W, 3]`` (YBR converted to RGB).

    A header claiming more than ``max_pixels`` (Rows x Columns x frames; default
    :func:`medgemma_data.limits.max_pixels`) is refused before the decoder allocates.
    """
    from .limits import check_pixels
    from .limits import max_pixels as default_limit

    limit = default_limit() if max_pixels is None else max_pixels
    check_pixels(path, claimed_pixels(ds), f"Rows x Columns x frames ({header_int(ds, 'Rows')} "
                 f"x {header_int(ds, 'Columns')} x {num_frames(ds)})", limit)
    check_decoder(ds, path)
    try:
        arr = ds.pixel_array
    except BaseException as exc:  # a Rust decoder's panic is a BaseException
        if not (isinstance(exc, Exception) or is_rust_panic(exc)):
            raise
        detail = " ".join(str(exc).split())[:300]
        ts = ds.file_meta.get("TransferSyntaxUID")
        raise InvalidInputError(f"{path}: pixel data could not be decoded; it is truncated or "
                                f"corrupt, or an unsupported variant of "
                                f"{ts.name if ts else 'its transfer syntax'} ({detail})") \
            from None
    n_frames = num_frames(ds)
    spp = header_int(ds, "SamplesPerPixel", 1)
    if n_frames == 1:
        arr = arr[None]
    if spp not in (1, 3) or arr.ndim != (3 if spp == 1 else 4):
        raise InvalidInputError(f"{path}: unsupported pixel layout {arr.shape} "
                                f"(SamplesPerPixel {spp})")
    return arr


#: What pydicom's LUT functions raise on a header whose LUT or window values are malformed
#: (a descriptor that is not three numbers, a LUT shorter than it says, a text slope).
_LUT_ERRORS = (TypeError, ValueError, IndexError, KeyError, AttributeError, ArithmeticError)


def _where(ds) -> str:  # noqa: ANN001
    return str(getattr(ds, "filename", None) or "a DICOM file")


def _numbers(ds, *keywords: str) -> None:  # noqa: ANN001
    """Every value of the elements ``keywords`` that ``ds`` has must be a number."""
    for keyword in keywords:
        value = ds.get(keyword)
        if value is None or value == "":
            continue
        values = list(value) if ds[keyword].VM > 1 else [value]
        try:
            [float(v) for v in values]
        except (TypeError, ValueError):
            raise InvalidInputError(f"{_where(ds)}: {keyword} is {str(value)[:40]!r}, not a "
                                    "number; the header is corrupt") from None


def modality_lut(arr: np.ndarray, ds) -> np.ndarray:  # noqa: ANN001
    """Apply the Modality LUT or rescale slope/intercept (e.g. stored values -> HU); float64."""
    from pydicom.pixels import apply_modality_lut

    _numbers(ds, "RescaleSlope", "RescaleIntercept")
    try:
        return np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
    except _LUT_ERRORS as exc:
        raise InvalidInputError(f"{_where(ds)}: its Modality LUT is malformed "
                                f"({type(exc).__name__}); the header is corrupt") from None


def voi_window(arr: np.ndarray, ds) -> tuple[np.ndarray, list[float] | None]:  # noqa: ANN001
    """Apply the first VOI LUT or window of ``ds`` when present (pydicom's implementation).

    Returns the windowed values and ``[center, width]`` (or ``None`` when no window applied).
    """
    from pydicom.pixels import apply_voi_lut

    has_lut = "VOILUTSequence" in ds
    has_window = "WindowCenter" in ds and "WindowWidth" in ds
    if not (has_lut or has_window):
        return arr, None
    _numbers(ds, "WindowCenter", "WindowWidth")
    try:
        out = np.asarray(apply_voi_lut(arr, ds, index=0, prefer_lut=True), dtype=np.float64)
    except _LUT_ERRORS as exc:
        raise InvalidInputError(f"{_where(ds)}: its VOI LUT or window is malformed "
                                f"({type(exc).__name__}); the header is corrupt") from None
    if has_lut:
        return out, None
    c, w = ds.WindowCenter, ds.WindowWidth
    c = float(c[0] if ds["WindowCenter"].VM > 1 else c)
    w = float(w[0] if ds["WindowWidth"].VM > 1 else w)
    return out, [c, w]


def safe_float_list(value) -> list[float] | None:  # noqa: ANN001
    """A DICOM multi-valued number as a list of floats (``None`` when absent or malformed)."""
    if value is None:
        return None
    try:
        return [float(v) for v in value]
    except (TypeError, ValueError):
        try:
            return [float(value)]
        except (TypeError, ValueError):
            return None


def basic_metadata(ds) -> dict[str, object]:  # noqa: ANN001
    """The allow-listed, non-identifying facts of a DICOM header."""
    meta: dict[str, object] = {}
    for key, tag in (("modality", "Modality"), ("body_part", "BodyPartExamined"),
                     ("view", "ViewPosition"), ("laterality", "ImageLaterality"),
                     ("photometric", "PhotometricInterpretation")):
        value = ds.get(tag)
        if value not in (None, ""):
            meta[key] = str(value)
    for key, tag in (("rows", "Rows"), ("columns", "Columns"), ("bits_stored", "BitsStored")):
        if ds.get(tag) not in (None, ""):
            meta[key] = header_int(ds, tag)
    spacing = safe_float_list(ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing"))
    if spacing:
        meta["pixel_spacing"] = spacing
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if ts is not None:
        meta["transfer_syntax"] = ts.name
    return meta


def sniff(path: Path, limit: int = 8) -> list:
    """Headers of ``path`` (a file) or of up to ``limit`` DICOM files under a folder.

    Cheap enough for detectors: reads only headers, and only the first few files.
    """
    if path.is_file():
        ds = header(path)
        return [ds] if ds is not None else []
    found = []
    try:
        candidates = sorted(path.rglob("*"))
    except OSError:
        return []
    for p in candidates:
        if p.is_file():
            ds = header(p)
            if ds is not None and "Rows" in ds:
                found.append(ds)
                if len(found) >= limit:
                    break
    return found


def is_wsi(ds) -> bool:  # noqa: ANN001
    """Whether a header is a VL Whole Slide Microscopy image (read by the wsi plugin)."""
    return str(ds.get("SOPClassUID", "")) == WSI_SOP_CLASS
