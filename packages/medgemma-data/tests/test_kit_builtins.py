"""The plugin-author test kit, run against every built-in modality (dogfooding)."""

from __future__ import annotations

import json
import shutil

import numpy as np
from _gen import (
    fhir_bundle,
    fundus_image,
    skin_image,
    write_dicom_slice,
    write_json,
    write_photo,
    write_series,
    write_slide,
)
from conftest import FIXTURES

from medgemma_data.testing import ModalityPluginTests


class TestRadiographKit(ModalityPluginTests):
    modality = "radiograph"
    distribution = "medgemma-data"

    def make_example(self, folder):
        folder.mkdir(parents=True, exist_ok=True)
        return shutil.copy(FIXTURES / "cxr" / "monochrome1_sample.dcm", folder / "cr.dcm")


class TestCTKit(ModalityPluginTests):
    modality = "ct"
    distribution = "medgemma-data"
    options = {"max_slices": "3"}

    def make_example(self, folder):
        write_series(folder / "series", 6)
        return folder / "series"


class TestMRIKit(ModalityPluginTests):
    modality = "mri"

    def make_example(self, folder):
        folder.mkdir(parents=True, exist_ok=True)
        px = np.arange(64, dtype=np.int16).reshape(8, 8)
        return write_dicom_slice(folder / "mr.dcm", px, modality="MR", intercept=0.0)


class TestWSIKit(ModalityPluginTests):
    modality = "wsi"
    options = {"patch_size": "256"}

    def make_example(self, folder):
        folder.mkdir(parents=True, exist_ok=True)
        write_slide(folder / "s.tiff", size=(1000, 800), blob=((500, 400), 300), mpp=1.0,
                    levels=2)
        return folder / "s.tiff"


class TestDermKit(ModalityPluginTests):
    modality = "derm"

    def make_example(self, folder):
        folder.mkdir(parents=True, exist_ok=True)
        return write_photo(folder / "skin.png", skin_image())


class TestFundusKit(ModalityPluginTests):
    modality = "fundus"

    def make_example(self, folder):
        folder.mkdir(parents=True, exist_ok=True)
        return write_photo(folder / "eye.jpg", fundus_image())


class TestEHRKit(ModalityPluginTests):
    modality = "ehr"

    def make_example(self, folder):
        folder.mkdir(parents=True, exist_ok=True)
        return write_json(folder / "bundle.json", fhir_bundle())


class TestQAKit(ModalityPluginTests):
    modality = "qa"

    def make_example(self, folder):
        folder.mkdir(parents=True, exist_ok=True)
        lines = [{"question": f"Q{i}? " + "why " * (3 * i + 1), "options": {"A": "yes", "B": "no"}, "answer_idx": "A"}
                 for i in range(4)]
        path = folder / "medqa_mini.jsonl"
        path.write_text("".join(json.dumps(x) + "\n" for x in lines))
        return path
