"""A test kit for modality plugin authors (requires pytest).

Subclass :class:`ModalityPluginTests` in your plugin's tests and say how to make an example
input; the base class checks what every plugin must do: register through the entry point,
detect its example, load well-formed samples, reject unknown options, fail clearly on bad
input, convert through the CLI. Example::

    from medgemma_data.testing import ModalityPluginTests

    class TestUltrasound(ModalityPluginTests):
        modality = "ultrasound"
        distribution = "medgemma-ultrasound"

        def make_example(self, folder):
            path = folder / "loop.dcm"
            write_cine(path)          # your own writer
            return path

For a plugin module that is not installed yet, :func:`plugins_registered` registers it for
the duration of a ``with`` block.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from . import api, cli
from .errors import MedgemmaDataError, OptionError, PluginFailedError
from .manager import build_registry, set_registry
from .sample import ALLOWED_METADATA_KEYS, ImagePart, Sample, TextPart


@contextlib.contextmanager
def plugins_registered(*modules: ModuleType, distribution: str = "test-plugin",
                       version: str = "0.0.0") -> Iterator[None]:
    """Register extra plugin modules (besides the installed ones) inside a ``with`` block."""
    extra = [(m.__name__, m, distribution, version) for m in modules]
    previous = set_registry(build_registry(extra=extra))
    try:
        yield
    finally:
        set_registry(previous)


class ModalityPluginTests:
    """Base class of a plugin's tests. Set :attr:`modality`, override :meth:`make_example`."""

    #: The modality name the plugin registers.
    modality: str = ""
    #: The distribution that provides it (checked against the entry point); ``None`` skips.
    distribution: str | None = None
    #: Options passed to every load of the example.
    options: dict[str, str] = {}

    def make_example(self, folder: Path) -> Path:
        """Write a valid input under ``folder`` and return its path."""
        raise NotImplementedError("override make_example(folder) -> Path")

    def make_bad_examples(self, folder: Path) -> list[Path]:
        """Inputs the plugin must refuse with a clear error (default: garbage and a truncation)."""
        garbage = folder / "garbage.bin"
        garbage.write_bytes(b"\x00\x01not a medical file\xff" * 64)
        good = self.make_example(folder / "good")
        if good.is_file():
            truncated = folder / f"truncated{good.suffix}"
            data = good.read_bytes()
            truncated.write_bytes(data[: max(1, len(data) // 3)])
            return [garbage, truncated]
        return [garbage]

    # -- fixtures -------------------------------------------------------------------------

    @pytest.fixture
    def example(self, tmp_path: Path) -> Path:
        folder = tmp_path / "example"
        folder.mkdir()
        return self.make_example(folder)

    @pytest.fixture
    def samples(self, example: Path) -> list[Sample]:
        return api.load(example, modality=self.modality, options=self.options)

    # -- the contract ---------------------------------------------------------------------

    def test_registered(self) -> None:
        assert self.modality, "set the class attribute `modality`"
        names = {i.name: i for i in api.list_plugins()}
        broken = [p for p in api.plugin_problems() if self.modality in p.message]
        assert not broken, f"plugin problems: {broken}"
        assert self.modality in names, f"{self.modality!r} not registered; installed?"
        info = names[self.modality]
        if self.distribution is not None:
            assert info.distribution == self.distribution
        assert info.description.strip() and info.claims
        assert info.version

    def test_detects_example(self, example: Path) -> None:
        assert api.detect(example) == self.modality

    def test_samples_are_well_formed(self, samples: list[Sample]) -> None:
        assert samples
        for s in samples:
            assert s.modality == self.modality
            assert s.parts and all(isinstance(p, TextPart | ImagePart) for p in s.parts)
            for image in s.images:
                assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
            assert set(s.metadata) <= ALLOWED_METADATA_KEYS
            assert s.provenance.source
            json.dumps(dict(s.metadata))

    def test_loading_is_deterministic(self, example: Path, samples: list[Sample]) -> None:
        again = api.load(example, modality=self.modality, options=self.options)
        assert len(again) == len(samples)
        for a, b in zip(again, samples):
            assert a.parts == b.parts and a.metadata == b.metadata and a.label == b.label

    def test_unknown_option_is_rejected(self, example: Path) -> None:
        with pytest.raises(OptionError, match="no option"):
            api.load(example, modality=self.modality,
                     options={**self.options, "no_such_option_xyz": "1"})

    def test_bad_inputs_fail_clearly(self, tmp_path: Path) -> None:
        folder = tmp_path / "bad"
        folder.mkdir()
        for bad in self.make_bad_examples(folder):
            with pytest.raises(MedgemmaDataError) as info:
                api.load(bad, modality=self.modality, options=self.options)
            assert not isinstance(info.value, PluginFailedError), (
                f"{bad.name}: the plugin crashed instead of raising a clear error: {info.value}")
            assert "\n" not in str(info.value).strip()

    def test_does_not_claim_unrelated_files(self, tmp_path: Path) -> None:
        text = tmp_path / "notes.txt"
        text.write_text("not a medical file\n")
        scores = dict(api.detection_scores(text))
        assert scores.get(self.modality, 0) == 0

    def test_cli_convert(self, example: Path, samples: list[Sample], tmp_path: Path,
                         capsys: pytest.CaptureFixture[str]) -> None:
        out = tmp_path / "out"
        args = ["convert", str(example), "--out", str(out), "--modality", self.modality]
        for k, v in self.options.items():
            args += ["--option", f"{k}={v}"]
        assert cli.main(args) == 0, capsys.readouterr().err
        folders = [out] if len(samples) == 1 else [out / f"{i:04d}" for i in
                                                   range(1, len(samples) + 1)]
        for folder, sample in zip(folders, samples):
            written = json.loads((folder / "sample.json").read_text())
            assert written["modality"] == self.modality
            assert len(written["parts"]) == len(sample.parts)
            for part, want in zip(written["parts"], sample.parts):
                if isinstance(want, TextPart):
                    assert part == {"text": want.text}
                else:
                    from PIL import Image

                    got = np.asarray(Image.open(folder / part["image"]).convert("RGB"))
                    np.testing.assert_array_equal(got, want.image)
