"""Shared fixtures: the repo's real test files and pydicom's shipped ones (never downloaded)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from medgemma_data.manager import reset_registry

REPO = Path(__file__).resolve().parents[3]
# The repository's fixtures/ folder; $MEDGEMMA_FIXTURES points the tests at another copy.
FIXTURES = Path(os.environ.get("MEDGEMMA_FIXTURES", REPO / "fixtures"))


def pydicom_file(name: str) -> Path:
    """A file shipped inside the pydicom wheel (no network: download=False)."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)
    assert path is not None, f"pydicom does not ship {name}"
    return Path(path)


@pytest.fixture
def fixtures() -> Path:
    assert FIXTURES.is_dir(), (f"fixtures not found at {FIXTURES}: they ship in the repository's "
                               "fixtures/ folder (or set MEDGEMMA_FIXTURES to a copy)")
    return FIXTURES


@pytest.fixture(autouse=True)
def _fresh_registry(monkeypatch: pytest.MonkeyPatch):
    """Every test starts from the installed plugins and a clean plugin environment."""
    for var in ("MEDGEMMA_DATA_PLUGINS", "MEDGEMMA_DATA_DISABLE_PLUGINS", "MEDGEMMA_DATA_TRACE"):
        monkeypatch.delenv(var, raising=False)
    reset_registry()
    yield
    reset_registry()
