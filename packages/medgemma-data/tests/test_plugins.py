"""The plugin host: entry points, robustness, allow/deny lists, tracing, conflicts."""

from __future__ import annotations

import importlib.metadata
import textwrap
import types

import pytest
from conftest import pydicom_file

import medgemma_data as md
from medgemma_data import hookimpl
from medgemma_data.manager import BUILTINS, ENTRY_POINT_GROUP, reset_registry
from medgemma_data.testing import plugins_registered

BUILTIN_NAMES = {"radiograph", "ct", "mri", "wsi", "derm", "fundus", "ehr", "qa"}


def make_dist(root, dist: str, version: str, module: str, source: str, ep_name: str):
    """A real installed distribution on sys.path: a module and a dist-info with an entry point."""
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\n{ep_name} = {module}\n")


PLUGIN_SRC = """
    from medgemma_data import ModalitySpec, Sample, Provenance, TextPart, hookimpl

    def _load(path, options):
        return [Sample((TextPart(path.read_text()),), "{name}", Provenance(str(path)))]

    @hookimpl
    def medgemma_register_modalities(register):
        register(ModalitySpec(name="{name}", description="test", claims=("*.note",),
                              detect=lambda p: 70 if p.suffix == ".note" else 0, load=_load))
"""


def test_builtins_are_plugins_of_medgemma_data():
    infos = {i.name: i for i in md.list_plugins()}
    assert BUILTIN_NAMES <= set(infos)
    assert set(BUILTINS) == BUILTIN_NAMES
    for name in BUILTIN_NAMES:
        assert infos[name].distribution == "medgemma-data"
        assert infos[name].version == importlib.metadata.version("medgemma-data")
        assert infos[name].claims and infos[name].description
    assert md.plugin_problems() == []


def test_entry_point_plugin_is_loaded_with_its_distribution(tmp_path, monkeypatch):
    make_dist(tmp_path, "medgemma-notes", "2.3.1", "mg_notes_plugin",
              PLUGIN_SRC.replace("{name}", "notes"), "notes")
    monkeypatch.syspath_prepend(str(tmp_path))
    reset_registry()
    info = {i.name: i for i in md.list_plugins()}["notes"]
    assert (info.distribution, info.version, info.plugin) == ("medgemma-notes", "2.3.1", "notes")
    note = tmp_path / "a.note"
    note.write_text("hello")
    assert md.detect(note) == "notes"
    assert md.load(note)[0].texts == ["hello"]


def test_two_distributions_claiming_one_name_are_both_named(tmp_path, monkeypatch):
    make_dist(tmp_path, "medgemma-ct-plus", "1.0", "mg_ctplus", PLUGIN_SRC.replace(
        "{name}", "ct"), "ctplus")
    monkeypatch.syspath_prepend(str(tmp_path))
    reset_registry()
    with pytest.raises(md.PluginConflictError) as info:
        md.load(pydicom_file("CT_small.dcm"), modality="ct")
    msg = str(info.value)
    assert f"medgemma-data {importlib.metadata.version('medgemma-data')}" in msg
    assert "medgemma-ct-plus 1.0" in msg
    assert "MEDGEMMA_DATA_DISABLE_PLUGINS" in msg
    assert "ct" not in {i.name for i in md.list_plugins()}
    assert any("medgemma-ct-plus" in p.distribution for p in md.plugin_problems())
    # the other modalities keep working, and disabling one side resolves the conflict
    assert md.detect(pydicom_file("MR_small.dcm")) == "mri"
    monkeypatch.setenv("MEDGEMMA_DATA_DISABLE_PLUGINS", "ctplus")
    reset_registry()
    assert md.load(pydicom_file("CT_small.dcm"))[0].modality == "ct"


def test_broken_plugins_are_reported_not_fatal(tmp_path, monkeypatch):
    make_dist(tmp_path, "broken-import", "0.1", "mg_broken_import",
              "import no_such_module_anywhere\n", "broken_import")
    make_dist(tmp_path, "broken-register", "0.1", "mg_broken_register", """
        from medgemma_data import hookimpl

        @hookimpl
        def medgemma_register_modalities(register):
            raise RuntimeError("boom")
    """, "broken_register")
    make_dist(tmp_path, "typo-hook", "0.1", "mg_typo", """
        from medgemma_data import hookimpl

        @hookimpl
        def medgemma_register_modality(register):
            pass
    """, "typo")
    make_dist(tmp_path, "not-a-spec", "0.1", "mg_notspec", """
        from medgemma_data import hookimpl

        @hookimpl
        def medgemma_register_modalities(register):
            register({"name": "dict"})
    """, "notspec")
    monkeypatch.syspath_prepend(str(tmp_path))
    reset_registry()
    problems = {p.plugin: p for p in md.plugin_problems()}
    assert "No module named 'no_such_module_anywhere'" in problems["broken_import"].message
    assert problems["broken_import"].distribution == "broken-import"
    assert "boom" in problems["broken_register"].message
    assert "medgemma_register_modality" in problems["typo"].message
    assert "ModalitySpec" in problems["notspec"].message
    assert BUILTIN_NAMES <= {i.name for i in md.list_plugins()}


def test_allow_and_deny_lists(monkeypatch):
    monkeypatch.setenv("MEDGEMMA_DATA_PLUGINS", "ct, qa")
    reset_registry()
    assert {i.name for i in md.list_plugins()} == {"ct", "qa"}
    with pytest.raises(md.UnknownModalityError, match="available: ct, qa"):
        md.load(pydicom_file("MR_small.dcm"), modality="mri")
    monkeypatch.setenv("MEDGEMMA_DATA_PLUGINS", "")
    reset_registry()
    assert md.list_plugins() == []
    monkeypatch.delenv("MEDGEMMA_DATA_PLUGINS")
    monkeypatch.setenv("MEDGEMMA_DATA_DISABLE_PLUGINS", "wsi,derm")
    reset_registry()
    names = {i.name for i in md.list_plugins()}
    assert BUILTIN_NAMES - {"wsi", "derm"} <= names and not {"wsi", "derm"} & names


def test_tracing_prints_hook_calls_and_scores(monkeypatch, capsys):
    monkeypatch.setenv("MEDGEMMA_DATA_TRACE", "1")
    reset_registry()
    md.load(pydicom_file("CT_small.dcm"))
    err = capsys.readouterr().err
    assert "call medgemma_register_modalities(register=<register>) -> [ct]" in err
    assert "detect ct: 90" in err and "detect wsi: 0" in err
    assert "call medgemma_samples_loaded(modality='ct'" in err
    monkeypatch.setenv("MEDGEMMA_DATA_TRACE", "0")
    reset_registry()
    md.load(pydicom_file("CT_small.dcm"))
    assert capsys.readouterr().err == ""


def test_samples_loaded_hook_can_audit_and_reject():
    seen = []
    auditor = types.ModuleType("auditor")

    @hookimpl
    def medgemma_samples_loaded(modality, path, samples):
        seen.append((modality, path.name, len(samples)))
        if modality == "mri":
            raise md.InvalidInputError("site policy: no MR exports")

    auditor.medgemma_samples_loaded = medgemma_samples_loaded
    with plugins_registered(auditor):
        md.load(pydicom_file("CT_small.dcm"))
        with pytest.raises(md.InvalidInputError, match="site policy"):
            md.load(pydicom_file("MR_small.dcm"))
    assert seen == [("ct", "CT_small.dcm", 1), ("mri", "MR_small.dcm", 1)]

    buggy = types.ModuleType("buggy")
    buggy.medgemma_samples_loaded = hookimpl(lambda modality, path, samples: [][1])
    with plugins_registered(buggy):
        with pytest.raises(md.PluginFailedError, match="buggy.*IndexError"):
            md.load(pydicom_file("CT_small.dcm"))


def test_a_crashing_loader_is_wrapped_with_its_distribution(tmp_path):
    crashy = types.ModuleType("crashy")

    def _load(path, options):
        return 1 / 0

    @hookimpl
    def medgemma_register_modalities(register):
        register(md.ModalitySpec("crashy", "x", ("*",), lambda p: 0, _load))

    crashy.medgemma_register_modalities = medgemma_register_modalities
    f = tmp_path / "f.txt"
    f.write_text("x")
    with plugins_registered(crashy, distribution="crashy-dist", version="9.9"):
        with pytest.raises(md.PluginFailedError, match=r"crashy-dist 9.9.*ZeroDivisionError"):
            md.load(f, modality="crashy")


def test_detection_ties_and_misses(tmp_path):
    twin = types.ModuleType("twin")

    @hookimpl
    def medgemma_register_modalities(register):
        register(md.ModalitySpec("twin", "x", ("*.dcm",), lambda p: 90, lambda p, o: []))

    twin.medgemma_register_modalities = medgemma_register_modalities
    with plugins_registered(twin):
        with pytest.raises(md.DetectionError, match="claimed equally by ct, twin"):
            md.detect(pydicom_file("CT_small.dcm"))
        with pytest.raises(md.InvalidInputError, match="found nothing"):
            md.load(pydicom_file("CT_small.dcm"), modality="twin")
    with pytest.raises(md.InvalidInputError, match="no such file"):
        md.detect(tmp_path / "nope.dcm")


def test_sample_rejects_identifying_metadata_and_bad_images():
    import numpy as np

    prov = md.Provenance("x")
    with pytest.raises(ValueError, match="PatientName"):
        md.Sample((md.TextPart("a"),), "m", prov, {"PatientName": "Doe^Jane"})
    with pytest.raises(TypeError, match="uint8"):
        md.ImagePart(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        md.ImagePart(np.zeros((4, 4), np.uint8))
    part = md.ImagePart(np.zeros((4, 4, 3), np.uint8))
    assert not part.image.flags.writeable
    with pytest.raises(ValueError, match="locations"):
        md.Sample((part,), "m", md.Provenance("x", (md.Location("a"), md.Location("b"))))
