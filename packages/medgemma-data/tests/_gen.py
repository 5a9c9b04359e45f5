"""Generators of test inputs (DICOM series, tiled pyramidal TIFF slides, photos, FHIR)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def write_dicom_slice(path: Path, pixels: np.ndarray, *, modality: str = "CT",
                      series_uid: str = "1.2.826.0.1.3680043.8.498.1",
                      position: tuple[float, float, float] | None = (0.0, 0.0, 0.0),
                      orientation: tuple[float, ...] = (1, 0, 0, 0, 1, 0),
                      instance: int = 1, slope: float = 1.0, intercept: float = -1024.0,
                      photometric: str = "MONOCHROME2",
                      window: tuple[float, float] | None = None) -> Path:
    """Write one uncompressed signed 16-bit slice ``pixels [H, W]`` (stored values)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage if modality == "CT" else MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "SECRET-ID-42"
    ds.PatientBirthDate = "19700101"
    ds.AccessionNumber = "ACC123456"
    ds.Modality = modality
    ds.SeriesInstanceUID = series_uid
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.99"
    ds.InstanceNumber = instance
    if position is not None:
        ds.ImagePositionPatient = [float(v) for v in position]
        ds.ImageOrientationPatient = [float(v) for v in orientation]
    ds.PixelSpacing = [0.7, 0.7]
    ds.SliceThickness = 1.0
    ds.RescaleSlope = slope
    ds.RescaleIntercept = intercept
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 1
    ds.PixelData = np.ascontiguousarray(pixels.astype("<i2")).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def write_series(folder: Path, n: int, *, seed: int = 0, shape=(8, 8), modality="CT",
                 series_uid: str = "1.2.826.0.1.3680043.8.498.1",
                 normal_axis: int = 2) -> list[float]:
    """``n`` slices at positions 0, 2.5, ... along an axis, under shuffled file names and
    shuffled InstanceNumbers; slice ``i`` (in space) holds the stored value ``i * 10``.
    Returns the positions in spatial order."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    names = rng.permutation(n)
    instances = rng.permutation(n) + 1
    orientation = {2: (1, 0, 0, 0, 1, 0), 1: (1, 0, 0, 0, 0, -1), 0: (0, 1, 0, 0, 0, -1)}
    positions = []
    for i in range(n):
        pos = [0.0, 0.0, 0.0]
        pos[normal_axis] = 2.5 * i
        positions.append(2.5 * i)
        pixels = np.full(shape, i * 10, np.int16)
        write_dicom_slice(folder / f"img{names[i]:05d}.dcm", pixels, modality=modality,
                          series_uid=series_uid, position=tuple(pos),
                          orientation=orientation[normal_axis], instance=int(instances[i]))
    return positions


def write_slide(path: Path, *, size=(3000, 2400), blob=((1000, 800), 500),
                tile=256, levels=3, mpp=0.5, background=255) -> np.ndarray:
    """A tiled pyramidal RGB TIFF (tifffile): white glass with one dark pink disc.

    ``blob``: ((cx, cy), radius) in level-0 pixels. Returns the level-0 image.
    """
    import tifffile

    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    (cx, cy), r = blob
    inside = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    img = np.full((h, w, 3), background, np.uint8)
    img[inside] = (150, 60, 120)
    res = (1e4 / mpp, 1e4 / mpp)  # pixels per centimetre
    with tifffile.TiffWriter(path, bigtiff=False) as tif:
        opts = dict(tile=(tile, tile), photometric="rgb", compression="zlib")
        tif.write(img, subifds=0, resolution=res, resolutionunit="CENTIMETER", **opts)
        level = img
        for _ in range(1, levels):
            level = level[::2, ::2]
            tif.write(np.ascontiguousarray(level), subfiletype=1, resolution=res,
                      resolutionunit="CENTIMETER", **opts)
    return img


def write_photo(path: Path, rgb: np.ndarray, orientation: int | None = None) -> Path:
    from PIL import Image

    im = Image.fromarray(rgb)
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    im.save(path, exif=exif.tobytes()) if path.suffix.lower() in (".jpg", ".jpeg") else \
        im.save(path, exif=exif)
    return path


def fundus_image(size: int = 200) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    disc = (xx - size / 2) ** 2 + (yy - size / 2) ** 2 <= (0.45 * size) ** 2
    img = np.zeros((size, size, 3), np.uint8)
    img[disc] = (200, 90, 40)
    return img


def skin_image(w: int = 240, h: int = 160) -> np.ndarray:
    img = np.zeros((h, w, 3), np.uint8)
    img[...] = (210, 160, 140)
    img[h // 3: h // 2, w // 3: w // 2] = (110, 60, 50)
    img[:5] = (255, 0, 0)  # a red top row: shows whether orientation was applied
    return img


def fhir_bundle() -> dict:
    """A small R4 transaction bundle with one fact of each kind (out of time order)."""
    patient = {"resourceType": "Patient", "id": "p1", "gender": "female",
               "name": [{"family": "Smithington", "given": ["Alexandra"]}],
               "birthDate": "1961-04-12",
               "identifier": [{"system": "urn:mrn", "value": "MRN-998877"}]}
    ref = {"reference": "Patient/p1"}
    entries = [
        patient,
        {"resourceType": "Observation", "id": "o1", "status": "final",
         "code": {"coding": [{"system": "http://loinc.org", "code": "4548-4",
                              "display": "Hemoglobin A1c"}]},
         "subject": ref, "effectiveDateTime": "2021-06-01",
         "valueQuantity": {"value": 7.2, "unit": "%"}},
        {"resourceType": "Condition", "id": "c1", "subject": ref,
         "code": {"text": "Type 2 diabetes mellitus"}, "onsetDateTime": "2015-03-02",
         "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/"
                                        "condition-clinical", "code": "active"}]}},
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
    return {"resourceType": "Bundle", "type": "collection",
            "entry": [{"fullUrl": f"urn:uuid:{e['id']}", "resource": e} for e in entries]}


def write_json(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data))
    return path
