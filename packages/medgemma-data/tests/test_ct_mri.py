"""ct and mri: windows by hand, spatial order, series split, sampling, compressed variants."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from _gen import write_dicom_slice, write_series
from conftest import pydicom_file

import medgemma_data as md
from medgemma_data.errors import InvalidInputError, OptionError


def _window(hu: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return np.rint((np.clip(hu, lo, hi) - lo) / (hi - lo) * 255).astype(np.uint8)


def test_ct_small_channels_equal_hand_computed_windows():
    path = pydicom_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert md.detect(path) == "ct"
    [s] = md.load(path)
    image = s.images[0]
    for channel, (lo, hi) in enumerate([(-1024, 1024), (-135, 215), (0, 80)]):
        np.testing.assert_array_equal(image[..., channel], _window(hu, lo, hi))
    assert s.texts == ["SLICE 1"]
    [custom] = md.load(path, options={"windows": "-160:240,-1000:200,20:60"})
    np.testing.assert_array_equal(custom.images[0][..., 1], _window(hu, -1000, 200))
    [report] = md.load(path, options={"windows": "report"})
    np.testing.assert_array_equal(report.images[0][..., 0], _window(hu, -1225, 1025))


@pytest.mark.parametrize("bad", ["1:2", "a:b,c:d,e:f", "10:0,0:1,0:1", "lung"])
def test_bad_windows_option(bad):
    with pytest.raises(OptionError, match="windows"):
        md.load(pydicom_file("CT_small.dcm"), options={"windows": bad})


def test_ct5n_series_in_position_order_not_instance_number():
    folder = pydicom_file("dicomdirtests/98892001/CT5N/2062").parent
    files = sorted(folder.iterdir())
    headers = [pydicom.dcmread(f) for f in files]
    # InstanceNumber rises while z falls: position order is the reverse of instance order.
    by_z = sorted(zip(headers, files), key=lambda hf: float(hf[0].ImagePositionPatient[2]))
    assert [int(h.InstanceNumber) for h, _ in by_z] == [10, 9, 8, 7, 6]
    assert md.detect(folder) == "ct"
    [s] = md.load(folder)
    assert [loc.file for loc in s.provenance.locations] == [str(f) for _, f in by_z]
    for image, (h, _) in zip(s.images, by_z):
        hu = h.pixel_array * float(h.RescaleSlope) + float(h.RescaleIntercept)
        np.testing.assert_array_equal(image[..., 1], _window(hu, -135, 215))
    assert s.texts == [f"SLICE {k}" for k in range(1, 6)]
    assert s.metadata["spacing"] == pytest.approx(2.5)


def test_hundred_shuffled_slices_come_out_as_85_in_position_order(tmp_path):
    positions = write_series(tmp_path / "series", 100, seed=3)
    [s] = md.load(tmp_path / "series")
    assert len(s.images) == 85 and s.metadata["num_slices"] == 100
    expected = [round(i / 85 * 99) for i in range(1, 86)]  # the notebook's rule
    assert [loc.slice_index for loc in s.provenance.locations] == expected
    # slice i stores i*10, i.e. HU i*10 - 1024; the red window is -1024..1024
    reds = [int(im[0, 0, 0]) for im in s.images]
    assert reds == [int(np.rint(i * 10 / 2048 * 255)) for i in expected]
    for k, loc in enumerate(s.provenance.locations):
        ds = pydicom.dcmread(loc.file)
        assert float(ds.ImagePositionPatient[2]) == positions[expected[k]]
    assert s.parts[1] == md.TextPart("SLICE 1") and s.parts[-1] == md.TextPart("SLICE 85")


def test_oblique_normal_orders_along_the_normal(tmp_path):
    # Coronal slices: rows along +x, columns along -z, so the normal (row x column) is +y;
    # z is 0 everywhere, so ordering by z would leave the shuffled instance order.
    write_series(tmp_path / "cor", 6, seed=1, normal_axis=1)
    [s] = md.load(tmp_path / "cor")
    ys = [float(pydicom.dcmread(loc.file).ImagePositionPatient[1])
          for loc in s.provenance.locations]
    assert ys == sorted(ys) and len(set(ys)) == 6


def test_two_series_in_one_folder_are_split(tmp_path):
    write_series(tmp_path / "mixed", 4, series_uid="1.2.3.1", seed=1)
    write_series(tmp_path / "mixed" / "b", 7, series_uid="1.2.3.2", seed=2)
    samples = md.load(tmp_path / "mixed")
    assert sorted(len(s.images) for s in samples) == [4, 7]
    for s in samples:
        uids = {str(pydicom.dcmread(loc.file).SeriesInstanceUID)
                for loc in s.provenance.locations}
        assert len(uids) == 1


def test_identifiers_never_reach_samples(tmp_path):
    write_series(tmp_path / "s", 3)
    [s] = md.load(tmp_path / "s")
    blob = repr(s.metadata) + "".join(s.texts)
    for secret in ("Doe", "Jane", "SECRET-ID-42", "19700101", "ACC123456", "1.2.826.0.1"):
        assert secret not in blob


def test_mri_min_max_over_the_whole_volume(tmp_path):
    folder = tmp_path / "mr"
    folder.mkdir()
    rng = np.random.default_rng(0)
    vols = []
    for i in range(5):
        px = rng.integers(0, 300 + 200 * i, size=(6, 6)).astype(np.int16)
        vols.append(px.astype(np.float64) * 2.0 - 10.0)
        write_dicom_slice(folder / f"{i}.dcm", px, modality="MR", position=(0, 0, -3.0 * i),
                          instance=i + 1, slope=2.0, intercept=-10.0)
    assert md.detect(folder) == "mri"
    [s] = md.load(folder)
    lo = min(v.min() for v in vols)
    hi = max(v.max() for v in vols)
    for image, vol in zip(s.images, reversed(vols)):  # z = -3i: position order is reversed
        np.testing.assert_array_equal(image[..., 0], _window(vol, lo, hi))


@pytest.mark.parametrize("variant", ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm",
                                     "MR_small_jpeg_ls_lossless.dcm", "MR_small_bigendian.dcm",
                                     "MR_small_implicit.dcm"])
def test_lossless_mr_variants_equal_the_uncompressed(variant):
    [ref] = md.load(pydicom_file("MR_small.dcm"))
    [got] = md.load(pydicom_file(variant))
    assert got.modality == "mri"
    np.testing.assert_array_equal(got.images[0], ref.images[0])


def test_folder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidInputError, match="is empty"):
        md.load(tmp_path / "empty", modality="ct")
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.txt").write_text("x")
    with pytest.raises(InvalidInputError, match="no DICOM files"):
        md.load(junk, modality="ct")
    with pytest.raises(md.DetectionError):
        md.load(junk)
