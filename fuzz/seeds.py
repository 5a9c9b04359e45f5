"""Seed inputs: the repository's fixtures, files shipped inside pydicom, and small generated ones.

Generated seeds are made in memory, deterministically (the same bytes every run), and small:
the mutator and atheris do more executions per second on small inputs.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("MEDGEMMA_FIXTURES", ROOT / "fixtures"))

#: Small pydicom test files, one per transfer syntax / layout the plugins meet.
PYDICOM_FILES = (
    "CT_small.dcm", "MR_small.dcm", "MR_small_RLE.dcm", "MR_small_bigendian.dcm",
    "MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm", "JPEG2000.dcm",
    "JPEGLSNearLossless_08.dcm", "JPGExtended.dcm", "SC_rgb_rle.dcm", "SC_rgb_rle_16bit_2frame.dcm",
    "SC_rgb_jpeg_dcmtk.dcm", "SC_rgb_small_odd_jpeg.dcm", "SC_rgb_small_odd.dcm",
    "rtdose_1frame.dcm", "rtdose_rle_1frame.dcm", "rtdose.dcm", "image_dfl.dcm", "693_J2KI.dcm",
    "SC_rgb_dcmtk_+eb+cy+s2.dcm",
)


def fixture(*parts: str) -> bytes:
    path = FIXTURES.joinpath(*parts)
    if not path.is_file():
        raise FileNotFoundError(f"fuzz seed {path} is missing: the fixtures ship in the "
                                "repository's fixtures/ folder (or set MEDGEMMA_FIXTURES)")
    return path.read_bytes()


def pydicom_files(names: tuple[str, ...] = PYDICOM_FILES) -> list[bytes]:
    from pydicom.data import get_testdata_file

    out = []
    for name in names:
        path = get_testdata_file(name, download=False)
        if path is not None:  # not every pydicom version ships every file
            out.append(Path(path).read_bytes())
    return out


def dicom(pixels: np.ndarray, *, modality: str = "CT", position: float | None = 0.0,
          series: str = "1.2.826.0.1.3680043.8.498.1", instance: int = 1,
          photometric: str | None = None, frames: int = 1, rle: bool = False,
          window: tuple[float, float] | None = None) -> bytes:
    """One small DICOM file (explicit VR little endian, or RLE lossless) as bytes.

    ``pixels``: ``[H, W]`` int16/uint16 (grayscale) or ``[H, W, 3]`` uint8 (RGB); ``frames``
    copies of it make a multi-frame object.
    """
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import (
        CTImageStorage,
        ExplicitVRLittleEndian,
        MRImageStorage,
        RLELossless,
        SecondaryCaptureImageStorage,
    )

    sop = {"CT": CTImageStorage, "MR": MRImageStorage}.get(modality, SecondaryCaptureImageStorage)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop
    meta.MediaStorageSOPInstanceUID = f"1.2.826.0.1.3680043.8.498.{instance}.{frames}"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("seed.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = sop, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.SeriesInstanceUID, ds.InstanceNumber = modality, series, instance
    if position is not None:
        ds.ImagePositionPatient = [0.0, 0.0, float(position)]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing, ds.SliceThickness = [0.7, 0.7], 2.5
    rgb = pixels.ndim == 3
    ds.SamplesPerPixel = 3 if rgb else 1
    ds.PhotometricInterpretation = photometric or ("RGB" if rgb else "MONOCHROME2")
    if rgb:
        ds.PlanarConfiguration = 0
    ds.Rows, ds.Columns = pixels.shape[:2]
    bits = pixels.dtype.itemsize * 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, bits, bits - 1
    ds.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0
    if not rgb:
        ds.RescaleSlope, ds.RescaleIntercept = 1.0, -1024.0 if modality == "CT" else 0.0
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    arr = np.stack([pixels] * frames) if frames > 1 else pixels
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PixelData = np.ascontiguousarray(arr).tobytes()
    if rle:
        ds.compress(RLELossless, arr)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def ramp(shape: tuple[int, int], dtype: str = "int16", scale: int = 40) -> np.ndarray:
    h, w = shape
    return (np.add.outer(np.arange(h), np.arange(w)) * scale).astype(dtype)


def generated_dicoms() -> list[bytes]:
    """Small DICOMs: a CT slice, an MR slice, a CR with a window, MONOCHROME1, RGB,
    multi-frame and RLE ones."""
    rgb = np.zeros((12, 10, 3), np.uint8)
    rgb[..., 0], rgb[3:8, 2:6, 1] = 200, 90
    return [
        dicom(ramp((16, 16))),
        dicom(ramp((12, 16), "uint16"), modality="MR"),
        dicom(ramp((16, 12), "uint16", 200), modality="CR", position=None, window=(1500, 3000)),
        dicom(ramp((8, 8), "uint16"), modality="DX", position=None, photometric="MONOCHROME1"),
        dicom(rgb, modality="OT", position=None),
        dicom(ramp((8, 8)), frames=3),
        dicom(ramp((16, 16)), rle=True),
        dicom(rgb, modality="XA", position=None, frames=2, rle=True),
    ]


def series_slices(modality: str = "CT", n: int = 2) -> list[bytes]:
    """``n`` slices of one series at 2.5 mm steps (the folder the fuzzed slice joins)."""
    return [dicom(np.full((16, 16), 10 * i, np.int16 if modality == "CT" else np.uint16),
                  modality=modality, position=2.5 * i, instance=i + 1) for i in range(n)]


def image(mode: str, size: tuple[int, int] = (24, 16), fmt: str = "PNG",
          orientation: int | None = None) -> bytes:
    """A small Pillow image of ``mode`` saved as ``fmt`` (with an EXIF orientation)."""
    from PIL import Image

    w, h = size
    x = np.add.outer(np.arange(h), np.arange(w))
    if mode in ("I;16", "I"):
        im = Image.fromarray((x * 300).astype(np.uint16))
    elif mode == "L":
        im = Image.fromarray((x * 5 % 256).astype(np.uint8))
    else:
        rgb = np.stack([x * 7 % 256, x * 3 % 256, 255 - x * 5 % 256], -1).astype(np.uint8)
        im = Image.fromarray(rgb)
        if mode != "RGB":
            im = im.convert(mode)
    kwargs: dict[str, object] = {}
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kwargs["exif"] = exif.tobytes() if fmt == "JPEG" else exif
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def images() -> list[tuple[str, bytes]]:
    """``(suffix, bytes)``: PNGs of every mode the readers meet, JPEGs (EXIF), BMP, WebP."""
    return [
        (".png", image("RGB", orientation=6)), (".png", image("L")), (".png", image("I;16")),
        (".png", image("RGBA")), (".png", image("P")), (".png", image("LA")),
        (".jpg", image("RGB", fmt="JPEG", orientation=3)), (".jpg", image("L", fmt="JPEG")),
        (".bmp", image("RGB", fmt="BMP")), (".webp", image("RGB", fmt="WEBP")),
    ]


def fhir_bundle() -> bytes:
    """A small FHIR R4 bundle with one resource of each kind the ehr plugin condenses."""
    ref = {"reference": "Patient/p1"}
    entries = [
        {"resourceType": "Patient", "id": "p1", "gender": "female"},
        {"resourceType": "Observation", "id": "o1", "status": "final",
         "code": {"coding": [{"system": "http://loinc.org", "code": "4548-4",
                              "display": "Hemoglobin A1c"}]},
         "subject": ref, "effectiveDateTime": "2021-06-01",
         "valueQuantity": {"value": 7.2, "unit": "%"}},
        {"resourceType": "Observation", "id": "o2", "status": "final", "code": {"text": "BP"},
         "subject": ref, "component": [{"code": {"text": "sys"},
                                        "valueQuantity": {"value": 120, "unit": "mmHg"}}]},
        {"resourceType": "Condition", "id": "c1", "subject": ref,
         "code": {"text": "Type 2 diabetes mellitus"}, "onsetDateTime": "2015-03-02"},
        {"resourceType": "MedicationRequest", "id": "m1", "status": "active",
         "intent": "order", "subject": ref, "authoredOn": "2015-03-10",
         "medicationCodeableConcept": {"text": "Metformin 500 mg tablet"},
         "dosageInstruction": [{"text": "one tablet twice daily"}]},
        {"resourceType": "Procedure", "id": "pr1", "status": "completed", "subject": ref,
         "code": {"text": "Retinal photography"}, "performedDateTime": "2019-11-20"},
        {"resourceType": "AllergyIntolerance", "id": "a1", "patient": ref,
         "code": {"text": "Penicillin"}, "recordedDate": "2010-01-05",
         "reaction": [{"manifestation": [{"text": "Hives"}]}]},
    ]
    return json.dumps({"resourceType": "Bundle", "type": "collection",
                       "entry": [{"fullUrl": f"urn:uuid:{e['id']}", "resource": e}
                                 for e in entries]}).encode()


def qa_lines(name: str, n: int = 3) -> bytes:
    """The first ``n`` questions of a fixture QA set (short: fast to parse)."""
    return b"".join(fixture("qa", name).splitlines(keepends=True)[:n])


def vqa_json() -> bytes:
    items = [{"question": "Is there a fracture?", "answer": "no", "image_name": "a.png",
              "answer_type": "CLOSED", "q_lang": "en"},
             {"question": "Which organ?", "answer": "lung", "img_name": "b.png"}]
    return json.dumps(items).encode()


def zip_of(files: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def tag(index: int, data: bytes) -> bytes:
    """An input whose first byte picks one of a target's file suffixes."""
    return bytes([index]) + data


def untag(data: bytes, suffixes: tuple[str, ...]) -> tuple[str, bytes]:
    if not data:
        return suffixes[0], b""
    return suffixes[data[0] % len(suffixes)], data[1:]
