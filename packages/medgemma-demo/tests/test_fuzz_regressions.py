"""Zips the fuzzer (fuzz/ at the repository root) found escaping ``unpack_zip`` as raw
zipfile/zlib errors, minimised. Each must now be one :class:`UploadError` line, and nothing
may be written outside the unpack folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from medgemma_demo.uploads import MB, UploadError, load_uploads, unpack_zip

HERE = Path(__file__).resolve().parent / "fuzz_regressions"

#: file -> what escaped before
CASES = {
    "zip_offset_before_start.zip": "OSError: [Errno 22] Invalid argument (a seek before byte 0)",
    "zip_bad_deflate_stream.zip": "zlib.error: invalid literal/lengths set",
    "zip_malformed_extra_field.zip": "IndexError in zipfile's extra-field parser",
    "zip_unsupported_version.zip": "NotImplementedError: zip file version 12.7",
}


def test_every_committed_input_has_a_case():
    assert sorted(p.name for p in HERE.iterdir() if p.is_file()) == sorted(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_damaged_zip_is_one_upload_error(name: str, tmp_path: Path):
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(UploadError) as info:
        unpack_zip(HERE / name, dest, max_bytes=MB)
    assert "\n" not in str(info.value) and "zip" in str(info.value)
    assert [p for p in tmp_path.iterdir()] == [dest]  # nothing written beside the folder
    with pytest.raises(UploadError):
        load_uploads([HERE / name], max_bytes=MB)
