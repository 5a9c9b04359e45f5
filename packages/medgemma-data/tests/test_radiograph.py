"""radiograph: real CR fixtures, pydicom's files, hand-computed display mappings."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from conftest import pydicom_file
from PIL import Image

import medgemma_data as md
from medgemma_data.errors import DecoderMissingError, InvalidInputError


def _stretch(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return np.rint((x - x.min()) / (x.max() - x.min()) * 255).astype(np.uint8)


def test_monochrome1_is_the_inverse_of_monochrome2(fixtures):
    m2 = fixtures / "cxr" / "siim_pneumothorax_sample.dcm"
    m1 = fixtures / "cxr" / "monochrome1_sample.dcm"
    assert md.detect(m2) == md.detect(m1) == "radiograph"
    raw1, raw2 = pydicom.dcmread(m1).pixel_array, pydicom.dcmread(m2).pixel_array
    np.testing.assert_array_equal(raw1, raw2)  # same stored pixels, only the tag differs
    [a], [b] = md.load(m2), md.load(m1)
    img2, img1 = a.images[0], b.images[0]
    assert img2.shape == (1024, 1024, 3) and img2.dtype == np.uint8
    np.testing.assert_array_equal(img2[..., 0], _stretch(raw2))
    np.testing.assert_array_equal(img1.astype(int), 255 - img2.astype(int))
    assert np.array_equal(img1[..., 0], img1[..., 2])
    assert b.metadata["photometric"] == "MONOCHROME1"
    assert b.metadata["transfer_syntax"] == "JPEG Baseline (Process 1)"


def test_no_identifiers_in_metadata(fixtures):
    [s] = md.load(fixtures / "cxr" / "siim_pneumothorax_sample.dcm")
    text = repr(s.metadata).lower()
    ds = pydicom.dcmread(fixtures / "cxr" / "siim_pneumothorax_sample.dcm")
    for tag in ("PatientName", "PatientID", "StudyInstanceUID", "AccessionNumber"):
        value = str(ds.get(tag, "")).strip().lower()
        if value:
            assert value not in text
    assert s.metadata["view"] == "PA" and s.metadata["body_part"] == "CHEST"


def test_png_radiograph(fixtures):
    path = fixtures / "cxr" / "nih_cxr14_00000001_000.png"
    assert md.detect(path) == "radiograph"
    [s] = md.load(path)
    raw = np.asarray(Image.open(path))
    np.testing.assert_array_equal(s.images[0][..., 1], _stretch(raw))


@pytest.mark.parametrize("name", ["CR1/6154", "CR2/6247", "CR3/6278"])
def test_monochrome1_cr_with_voi_window_by_hand(name):
    """PS3.3 C.11.2.1.2.1 linear window computed here, then stretch and inversion."""
    path = pydicom_file(f"dicomdirtests/77654033/{name}")
    ds = pydicom.dcmread(path)
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    c, w = float(ds.WindowCenter), float(ds.WindowWidth)
    y_min = 0 * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    y_max = (2 ** ds.BitsStored - 1) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    win = np.where(hu <= c - 0.5 - (w - 1) / 2, y_min,
                   np.where(hu > c - 0.5 + (w - 1) / 2, y_max,
                            ((hu - (c - 0.5)) / (w - 1) + 0.5) * (y_max - y_min) + y_min))
    expected = 255 - _stretch(win)
    [s] = md.load(path)
    assert s.metadata["voi_window"] == [c, w]
    np.testing.assert_array_equal(s.images[0][..., 0], expected)
    [no_voi] = md.load(path, options={"voi": "false"})
    np.testing.assert_array_equal(no_voi.images[0][..., 0], 255 - _stretch(hu))


def test_rtdose_multiframe():
    path = pydicom_file("rtdose.dcm")
    raw = pydicom.dcmread(path).pixel_array.astype(np.float64)  # [15, 10, 10]
    assert md.detect(path) == "radiograph"  # the generic fallback for other 2-D DICOM
    [s] = md.load(path)
    assert len(s.images) == 15 and s.texts == [f"FRAME {k}" for k in range(1, 16)]
    expected = _stretch(raw)  # one mapping shared by the whole stack
    for k, image in enumerate(s.images):
        np.testing.assert_array_equal(image[..., 0], expected[k])
    assert [loc.frame for loc in s.provenance.locations] == list(range(15))
    [few] = md.load(path, options={"max_frames": "5"})
    assert [loc.frame for loc in few.provenance.locations] == [
        round(i / 5 * 14) for i in range(1, 6)]


def test_colour_ultrasound_frames_are_rgb():
    path = pydicom_file("examples_ybr_color.dcm")
    [s] = md.load(path, modality="radiograph")
    ref = pydicom.dcmread(path).pixel_array  # pydicom converts YBR to RGB
    assert len(s.images) == 30
    np.testing.assert_array_equal(s.images[7], ref[7])


@pytest.mark.parametrize("name", [
    "JPGExtended.dcm", "JPEGLSNearLossless_08.dcm",
    "JPEGLSNearLossless_16.dcm", "JPEG2000.dcm", "693_J2KI.dcm", "SC_rgb_jpeg_dcmtk.dcm",
    "SC_rgb_rle.dcm", "SC_rgb_small_odd_jpeg.dcm", "examples_jpeg2k.dcm", "rtdose_rle.dcm",
])
def test_compressed_transfer_syntaxes_decode(name):
    """Each compressed syntax decodes through the declared decoder plugins, pixel-equal to
    what pydicom itself returns."""
    path = pydicom_file(name)
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID.is_compressed
    [s] = md.load(path, modality="radiograph")
    assert s.images and all(im.dtype == np.uint8 for im in s.images)
    ref = ds.pixel_array
    if ds.SamplesPerPixel == 3 and ref.dtype == np.uint8:
        np.testing.assert_array_equal(s.images[0], ref if ref.ndim == 3 else ref[0])


def test_undecodable_pixel_data_is_a_clear_error():
    # pydicom's JPEG-lossy.dcm has a scan header libjpeg rejects (GDCM tolerates it).
    with pytest.raises(InvalidInputError, match="could not be decoded"):
        md.load(pydicom_file("JPEG-lossy.dcm"), modality="radiograph")


def test_missing_decoder_names_the_package(fixtures, monkeypatch):
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEGBaseline8Bit

    decoder = get_decoder(JPEGBaseline8Bit)
    monkeypatch.setattr(decoder, "_available", {})
    with pytest.raises(DecoderMissingError, match="pip install pylibjpeg pylibjpeg-libjpeg"):
        md.load(fixtures / "cxr" / "siim_pneumothorax_sample.dcm")


def test_truncated_and_foreign_files(tmp_path, fixtures):
    with pytest.raises(InvalidInputError, match="truncated or corrupt"):
        md.load(pydicom_file("MR_truncated.dcm"), modality="radiograph")
    with pytest.raises(InvalidInputError, match="truncated or corrupt"):
        md.load(pydicom_file("MR_truncated.dcm"))  # detected as mri
    src = (fixtures / "cxr" / "siim_pneumothorax_sample.dcm").read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(src[: len(src) // 2])
    with pytest.raises(InvalidInputError, match="truncated or corrupt"):
        md.load(cut)
    header_only = tmp_path / "head.dcm"
    header_only.write_bytes(src[:300])
    with pytest.raises(md.MedgemmaDataError):
        md.load(header_only, modality="radiograph")
    text = tmp_path / "note.dcm"
    text.write_text("hello")
    with pytest.raises(InvalidInputError, match="neither DICOM nor"):
        md.load(text, modality="radiograph")
    with pytest.raises(md.DetectionError, match="no plugin recognises"):
        md.load(text)
