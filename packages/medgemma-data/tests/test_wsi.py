"""wsi: the real slides (good and broken) and a generated tiled pyramid with a tissue blob."""

from __future__ import annotations

import numpy as np
import openslide
import pytest
from _gen import write_slide
from PIL import Image

import medgemma_data as md
from medgemma_data.errors import InvalidInputError
from medgemma_data.plugins import wsi

TISSUE = (150, 60, 120)


@pytest.fixture(scope="module")
def slide_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("slide") / "blob.tiff"
    img = write_slide(path, size=(3600, 2700), blob=((1500, 1300), 800), mpp=1.0)
    return path, img


def test_generated_slide_patches_come_only_from_the_blob(slide_path):
    path, img = slide_path
    assert md.detect(path) == "wsi"
    [s] = md.load(path)
    assert s.metadata["level"] == 0 and s.metadata["mpp"] == pytest.approx(1.0)
    assert s.metadata["vendor"] == "generic-tiff"
    # ground truth tissue fraction of every 896-pixel grid cell
    truth = {}
    for y in range(0, 2700 - 895, 896):
        for x in range(0, 3600 - 895, 896):
            cell = img[y:y + 896, x:x + 896]
            truth[(x, y)] = float(np.all(cell == TISSUE, axis=-1).mean())
    kept = [loc.patch[:2] for loc in s.provenance.locations]
    assert kept == sorted(kept, key=lambda xy: (xy[1], xy[0]))  # row-major spatial order
    assert {xy for xy, f in truth.items() if f >= 0.35} <= set(kept)
    assert all(truth[xy] > 0.15 for xy in kept)
    for (x, y), image in zip(kept, s.images):  # pixel-exact (lossless tiles)
        np.testing.assert_array_equal(image, img[y:y + 896, x:x + 896])


def test_level_choice_by_magnification_and_mpp(slide_path):
    path, _ = slide_path
    [five] = md.load(path, options={"magnification": "5", "patch_size": "448"})
    assert five.metadata["level"] == 1 and five.metadata["mpp"] == pytest.approx(2.0)
    assert five.images[0].shape == (448, 448, 3)
    [by_mpp] = md.load(path, options={"mpp": "4", "patch_size": "200", "min_tissue": "0.5"})
    assert by_mpp.metadata["level"] == 2


def test_sampling_is_deterministic_and_spatial(slide_path):
    path, _ = slide_path
    [full] = md.load(path, options={"patch_size": "128", "max_patches": "1000"})
    [few] = md.load(path, options={"patch_size": "128", "max_patches": "7"})
    all_xy = [loc.patch[:2] for loc in full.provenance.locations]
    few_xy = [loc.patch[:2] for loc in few.provenance.locations]
    assert len(few_xy) == 7 and few.metadata["num_patches"] == len(all_xy) > 7
    idx = np.unique(np.rint(np.linspace(0, len(all_xy) - 1, 7)).astype(int))
    assert few_xy == [all_xy[i] for i in idx]


def test_never_reads_a_whole_level(slide_path, monkeypatch):
    path, _ = slide_path
    sizes = []
    real = openslide.OpenSlide.read_region

    def spy(self, location, level, size):
        sizes.append((size, self.level_dimensions[level]))
        return real(self, location, level, size)

    monkeypatch.setattr(openslide.OpenSlide, "read_region", spy)
    monkeypatch.setattr(wsi, "THUMB_TILE", 256)
    md.load(path)
    assert sizes and max(max(s) for s, _ in sizes) <= 896
    assert all(s[0] * s[1] < dims[0] * dims[1] / 2 for s, dims in sizes)


def test_small_svs_and_dicom_wsi(fixtures):
    for name in ("small.svs", "boxes_0.dcm", "boxes_1.dcm"):
        path = fixtures / "wsi" / name
        assert md.detect(path) == "wsi"
        # a 16 x 16 crop with a little tissue: the default threshold refuses it clearly
        with pytest.raises(InvalidInputError, match="no tissue"):
            md.load(path)
        [s] = md.load(path, options={"min_tissue": "0.05"})
        [patch] = s.images
        assert patch.shape == (896, 896, 3)
        slide = openslide.OpenSlide(str(path))
        ref = np.asarray(slide.read_region((0, 0), 0, (16, 16)).convert("RGB"))
        np.testing.assert_array_equal(patch[:16, :16], ref)
        # outside the 16 x 16 slide OpenSlide returns transparent pixels: composited on white
        assert (patch[16:] == 255).all() and (patch[:, 16:] == 255).all()


def test_boxes_tiff_pyramid(fixtures):
    path = fixtures / "wsi" / "boxes.tiff"
    [s] = md.load(path)
    slide = openslide.OpenSlide(str(path))
    ref = np.asarray(slide.read_region((0, 0), 0, (300, 250)).convert("RGB"))
    np.testing.assert_array_equal(s.images[0][:250, :300], ref)


def test_transparent_areas_composite_on_background():
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (10, 20, 30, 255)
    rgba[0, 1] = (200, 100, 0, 128)
    out = wsi._composite(Image.fromarray(rgba, "RGBA"), (240, 240, 240))
    assert tuple(out[0, 0]) == (10, 20, 30)
    assert tuple(out[1, 1]) == (240, 240, 240)
    expected = np.rint(np.array([200, 100, 0]) * 128 / 255 + 240 * 127 / 255)
    np.testing.assert_allclose(out[0, 1], expected, atol=1)


def test_broken_slides_give_clear_errors(fixtures, tmp_path):
    with pytest.raises(InvalidInputError, match="OpenSlide cannot open"):
        md.load(fixtures / "wsi" / "unopenable.tiff")
    with pytest.raises(InvalidInputError, match="OpenSlide cannot read"):
        md.load(fixtures / "wsi" / "unreadable.svs")
    not_slide = tmp_path / "x.svs"
    not_slide.write_bytes(b"garbage" * 100)
    with pytest.raises(InvalidInputError, match="OpenSlide cannot open"):
        md.load(not_slide, modality="wsi")
    blank = tmp_path / "blank.tiff"
    write_slide(blank, size=(1000, 1000), blob=((0, 0), 0), mpp=1.0)
    with pytest.raises(InvalidInputError, match="no tissue"):
        md.load(blank)
