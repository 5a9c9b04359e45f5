"""Inputs the fuzzer found outside the contract (fuzz/ at the repository root), minimised.

Each file in ``fuzz_regressions/`` once escaped as something other than the package's
documented error: a ``PluginFailedError`` ("a plugin bug, report it"), or a pyo3
``PanicException`` that no ``except Exception`` catches. Each must now give an
:class:`InvalidInputError` whose one-line message names the file.
"""

from __future__ import annotations

import types
from pathlib import Path

import pytest

import medgemma_data
from medgemma_data import InvalidInputError, hookimpl
from medgemma_data.testing import plugins_registered

HERE = Path(__file__).resolve().parent / "fuzz_regressions"

#: file -> (modalities it is loaded as, the cause it once escaped with)
CASES = {
    "rle_decoder_panic.dcm": (("mri", "radiograph"),
                              "pylibjpeg-rle panicked (index out of bounds): a BaseException"),
    "transfer_syntax_uid_not_a_transfer_syntax.dcm": (
        ("radiograph", "ct"), "pydicom: 'UID is not a transfer syntax' (ValueError)"),
    "unknown_value_representation.dcm": (
        ("radiograph", "ct"), "pydicom: 'Unknown Value Representation' (NotImplementedError)"),
    "rescale_slope_not_a_number.dcm": (
        ("ct", "mri", "radiograph"), "a text RescaleSlope kept as str: numpy UFuncTypeError"),
    "invalid_utf8.jsonl": (("qa",), "UnicodeDecodeError while reading the lines"),
    "fhir_unknown_resource_type.json": (("ehr",), "fhir.resources: KeyError on the type name"),
    "fhir_resource_type_not_a_string.json": (("ehr",), "fhir.resources: TypeError (str + dict)"),
}


def test_every_committed_input_has_a_case():
    assert sorted(p.name for p in HERE.iterdir() if p.is_file()) == sorted(CASES)


@pytest.mark.parametrize("name,modality", [(n, m) for n, (ms, _) in CASES.items() for m in ms])
def test_fuzz_finding_is_a_clear_input_error(name: str, modality: str, tmp_path: Path):
    path = tmp_path / name
    path.write_bytes((HERE / name).read_bytes())
    with pytest.raises(InvalidInputError) as info:
        medgemma_data.load(path, modality=modality)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    assert "plugin bug" not in message


def test_detection_survives_every_finding(tmp_path: Path):
    """Detectors read the same headers: they give a score (or none), never raise."""
    for name in CASES:
        path = tmp_path / name
        path.write_bytes((HERE / name).read_bytes())
        scores = medgemma_data.detection_scores(path)
        assert all(0 <= s <= 100 for _, s in scores)


# ---- the plugin isolation: a decoder's panic in any plugin is the file's problem -----------

PanicException = type("PanicException", (BaseException,), {"__module__": "pyo3_runtime"})


def _plugin_raising(exc: BaseException, *, in_detect: bool = False) -> types.ModuleType:
    from medgemma_data import ModalitySpec

    def boom(*_):
        raise exc

    module = types.ModuleType("panicky_plugin")

    @hookimpl
    def medgemma_register_modalities(register):
        register(ModalitySpec(name="panicky", description="test", claims=("*.pan",),
                              detect=boom if in_detect else (lambda p: 70), load=boom))

    module.medgemma_register_modalities = medgemma_register_modalities
    return module


def test_rust_panic_in_a_plugin_is_an_input_error_naming_the_file(tmp_path: Path):
    path = tmp_path / "scan.pan"
    path.write_bytes(b"x")
    with plugins_registered(_plugin_raising(PanicException("index out of bounds"))):
        with pytest.raises(InvalidInputError, match=r"scan\.pan: a decoder crashed.*index out"):
            medgemma_data.load(path, modality="panicky")


def test_rust_panic_in_a_detector_counts_as_zero(tmp_path: Path):
    path = tmp_path / "scan.pan"
    path.write_bytes(b"x")
    with plugins_registered(_plugin_raising(PanicException("boom"), in_detect=True)):
        assert dict(medgemma_data.detection_scores(path))["panicky"] == 0


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), SystemExit(3)])
def test_other_base_exceptions_are_not_swallowed(tmp_path: Path, exc: BaseException):
    path = tmp_path / "scan.pan"
    path.write_bytes(b"x")
    with plugins_registered(_plugin_raising(exc)):
        with pytest.raises(type(exc)):
            medgemma_data.load(path, modality="panicky")
    with plugins_registered(_plugin_raising(exc, in_detect=True)):
        with pytest.raises(type(exc)):
            medgemma_data.detection_scores(path)


def test_vqa_image_names_must_stay_inside_the_image_folder(tmp_path: Path):
    """Found reading the VQA loader while fuzzing: an uploaded JSON could name any image on
    the server's disk (an absolute path, or ../) and have it read into the sample."""
    import json

    from PIL import Image

    secret = tmp_path / "secret.png"
    Image.new("L", (4, 4)).save(secret)
    (tmp_path / "upload" / "images").mkdir(parents=True)
    for name in (str(secret), "../../secret.png"):
        path = tmp_path / "upload" / "vqa.json"
        path.write_text(json.dumps([{"question": "q", "answer": "a", "image_name": name}]))
        with pytest.raises(InvalidInputError, match="inside the image folder"):
            medgemma_data.load(path, modality="qa")
