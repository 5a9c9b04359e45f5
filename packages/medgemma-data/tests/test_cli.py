"""The medgemma-data command: plugins, convert, inspect, and user mistakes."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys

import numpy as np
import pytest
from _gen import write_series
from conftest import pydicom_file
from PIL import Image

import medgemma_data as md
from medgemma_data.cli import main


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def _put(path, data: bytes):
    path.write_bytes(data)
    return path


def test_plugins_json(capsys):
    code, out, _ = run(capsys, "plugins", "--json")
    assert code == 0
    data = json.loads(out)
    names = {p["name"]: p for p in data["plugins"]}
    assert names["wsi"]["distribution"] == "medgemma-data" and names["wsi"]["version"]
    assert names["ct"]["options"]["max_slices"]["default"] == "85"
    assert data["problems"] == []
    code, out, _ = run(capsys, "plugins")
    installed = importlib.metadata.version("medgemma-data")  # what the listing reads
    assert f"radiograph  (medgemma-data {installed})" in out and "claims:" in out


def test_convert_series_writes_pngs_and_sample_json(capsys, tmp_path):
    write_series(tmp_path / "s", 4)
    out = tmp_path / "out"
    code, stdout, _ = run(capsys, "convert", tmp_path / "s", "--out", out, "--json")
    assert code == 0 and json.loads(stdout)["images"] == 4
    sample = json.loads((out / "sample.json").read_text())
    assert sample["modality"] == "ct"
    assert sample["parts"][:2] == [{"image": "images/0001.png"}, {"text": "SLICE 1"}]
    [ref] = md.load(tmp_path / "s")
    for k, image in enumerate(ref.images, start=1):
        np.testing.assert_array_equal(np.asarray(Image.open(out / f"images/{k:04d}.png")), image)
    assert sample["metadata"]["num_slices"] == 4
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_convert_several_samples_one_folder_each(capsys, tmp_path, fixtures):
    out = tmp_path / "qa"
    code, _, _ = run(capsys, "convert", fixtures / "qa" / "pubmedqa_sampled_50.jsonl",
                     "--out", out)
    assert code == 0
    folders = sorted(p.name for p in out.iterdir())
    assert folders == [f"{i:04d}" for i in range(1, 51)]
    first = json.loads((out / "0001" / "sample.json").read_text())
    assert first["label"] in {"A", "B", "C"} and first["parts"][0]["text"].startswith("Question:")


def test_convert_with_options_and_modality(capsys, tmp_path):
    out = tmp_path / "o"
    code, _, err = run(capsys, "convert", pydicom_file("rtdose.dcm"), "--out", out,
                       "--modality", "radiograph", "--option", "max_frames=3")
    assert code == 0, err
    assert len(list((out / "images").iterdir())) == 3


@pytest.mark.parametrize("make, args, message", [
    (lambda d: d / "missing.dcm", [], "no such file"),
    (lambda d: (d / "empty").mkdir() or d / "empty", [], "is empty"),
    (lambda d: _put(d / "x.json", b'{"a": 1}'), [], "no plugin recognises"),
    (lambda d: _put(d / "x.json", b'{"a": 1}'), ["--modality", "ehr"], "not a FHIR Bundle"),
    (lambda d: _put(d / "c.dcm", b"\0" * 128 + b"DICM" + b"\x02\x00"),
     ["--modality", "radiograph"], "truncated or corrupt"),
    (lambda d: pydicom_file("CT_small.dcm"), ["--modality", "nope"], "unknown modality 'nope'"),
    (lambda d: pydicom_file("CT_small.dcm"), ["--option", "windows"], "NAME=VALUE"),
    (lambda d: pydicom_file("CT_small.dcm"), ["--option", "zoom=2"], "no option 'zoom'"),
])
def test_user_mistakes_one_line_nothing_written(capsys, tmp_path, make, args, message):
    src = make(tmp_path)
    out = tmp_path / "out"
    before = sorted(p.name for p in tmp_path.iterdir())
    code, stdout, err = run(capsys, "convert", src, "--out", out, *args)
    assert code == 2
    assert message in err and err.count("\n") == 1 and err.startswith("medgemma-data: error:")
    assert "Traceback" not in err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_existing_out_folder_is_refused(capsys, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    code, _, err = run(capsys, "convert", pydicom_file("CT_small.dcm"), "--out", out)
    assert code == 2 and "not an empty folder" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_failure_while_writing_leaves_nothing(capsys, tmp_path, monkeypatch):
    from PIL import Image as PILImage

    calls = []

    def failing_save(self, fp, *a, **k):
        calls.append(fp)
        if len(calls) == 3:
            raise OSError(28, "No space left on device", str(fp))
        return real_save(self, fp, *a, **k)

    real_save = PILImage.Image.save
    monkeypatch.setattr(PILImage.Image, "save", failing_save)
    write_series(tmp_path / "s", 5)
    out = tmp_path / "out"
    code, _, err = run(capsys, "convert", tmp_path / "s", "--out", out)
    assert code == 2 and "No space left on device" in err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_inspect(capsys, fixtures):
    code, out, _ = run(capsys, "inspect", fixtures / "cxr" / "monochrome1_sample.dcm", "--json")
    assert code == 0
    report = json.loads(out)
    assert report["modality"] == "radiograph" and report["images"] == 1
    assert report["image_sizes"] == ["1024x1024"] and report["detection"]["radiograph"] == 90
    assert report["plugin"]["distribution"] == "medgemma-data"
    code, out, _ = run(capsys, "inspect", fixtures / "wsi" / "unopenable.tiff")
    assert code == 2


def test_console_script_has_no_traceback(tmp_path):
    bad = tmp_path / "bad.svs"
    bad.write_bytes(b"nope")
    proc = subprocess.run([sys.executable, "-m", "medgemma_data.cli", "convert", str(bad),
                           "--out", str(tmp_path / "o"), "--modality", "wsi"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 2
    assert proc.stderr.startswith("medgemma-data: error: OpenSlide cannot open")
    assert "Traceback" not in proc.stderr
    help_text = subprocess.run([sys.executable, "-m", "medgemma_data.cli", "--help"],
                               capture_output=True, text=True, check=True).stdout
    for word in ("plugins", "convert", "inspect", "MEDGEMMA_DATA_PLUGINS"):
        assert word in help_text


def test_help_is_plain_text(capsys):
    """``medgemma-data --help`` and each subcommand's help read as plain text: no reStructuredText
    or Markdown markup (double or single backticks, :func: roles) from docstrings."""
    import argparse
    import re

    import pytest

    from medgemma_data.cli import _parser, main

    markup = re.compile(r"`|:(func|class|meth|mod|attr|obj|exc|ref|doc):")
    subparsers = [a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction)]
    commands = [[]] + [[name] for a in subparsers for name in a.choices]
    assert len(commands) == 4
    for command in commands:
        with pytest.raises(SystemExit) as done:
            main([*command, "--help"])
        assert done.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith("usage: medgemma-data"), command
        assert not markup.search(out), (command, markup.search(out))
