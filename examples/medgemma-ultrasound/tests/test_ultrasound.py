"""The example plugin, tested with medgemma-data's plugin-author kit plus its own checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from medgemma_ultrasound.reader import frame_indices
from pydicom.data import get_testdata_file

import medgemma_data as md
from medgemma_data.testing import ModalityPluginTests


def write_cine(path: Path, frames: np.ndarray, frame_time_ms: float = 40.0) -> Path:
    """A multi-frame US DICOM of grayscale ``frames [F, H, W]`` (uint8, uncompressed)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, UltrasoundMultiFrameImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UltrasoundMultiFrameImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, generate_uid()
    ds.Modality = "US"
    ds.PatientName = "Roe^Richard"
    ds.NumberOfFrames = frames.shape[0]
    ds.FrameTime = frame_time_ms
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = frames.shape[1:]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.ascontiguousarray(frames, np.uint8).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def ramp_frames(n: int = 20) -> np.ndarray:
    """Frame i is filled with the value 10 * i (so each frame is identifiable)."""
    return np.stack([np.full((12, 16), 10 * i, np.uint8) for i in range(n)])


class TestUltrasoundPlugin(ModalityPluginTests):
    modality = "ultrasound"
    distribution = "medgemma-ultrasound"

    def make_example(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        return write_cine(folder / "loop.dcm", ramp_frames())


def test_frames_are_sampled_evenly_with_times(tmp_path):
    path = write_cine(tmp_path / "loop.dcm", ramp_frames(20), frame_time_ms=40.0)
    [s] = md.load(path, options={"frames": "4"})
    idx = [0, 6, 13, 19]  # round(i * 19 / 3)
    assert frame_indices(20, 4) == idx
    assert s.texts == [f"FRAME {j + 1} (t = {i * 0.04:.2f} s)" for j, i in enumerate(idx)]
    # grayscale loop stretched once over the whole loop: value 10 i -> 10 i * 255 / 190
    for image, i in zip(s.images, idx):
        assert image.shape == (12, 16, 3)
        assert int(image[0, 0, 0]) == round(10 * i * 255 / 190)
    assert s.metadata["frame_rate"] == 25.0
    assert "Roe" not in repr(s.metadata)


def test_pydicom_colour_cine_beats_the_radiograph_fallback():
    path = Path(get_testdata_file("examples_ybr_color.dcm", download=False))
    scores = dict(md.detection_scores(path))
    assert scores["ultrasound"] == 95 and scores["radiograph"] == 10
    assert md.detect(path) == "ultrasound"
    [s] = md.load(path)
    ref = pydicom.dcmread(path).pixel_array  # [30, 240, 320, 3] RGB
    assert len(s.images) == 8
    for image, loc in zip(s.images, s.provenance.locations):
        np.testing.assert_array_equal(image, ref[loc.frame])


def test_single_frame_is_refused(tmp_path):
    path = write_cine(tmp_path / "one.dcm", ramp_frames(1))
    assert dict(md.detection_scores(path))["ultrasound"] == 0
    with pytest.raises(md.InvalidInputError, match="one frame"):
        md.load(path, modality="ultrasound")
