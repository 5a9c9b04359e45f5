"""Sample.to_messages / to_messages against hand-written message lists."""

from __future__ import annotations

import numpy as np
import pytest
from _gen import write_series

import medgemma_data as md
from medgemma_data import ImagePart, Location, Provenance, Sample, TextPart


def _image(value: int) -> np.ndarray:
    return np.full((2, 3, 3), value, np.uint8)


def _same(got, want) -> bool:
    """Equal message lists, image arrays compared by value (dtype and shape included)."""
    if isinstance(want, np.ndarray):
        return (isinstance(got, np.ndarray) and got.dtype == want.dtype
                and np.array_equal(got, want))
    if isinstance(want, dict):
        return isinstance(got, dict) and got.keys() == want.keys() and all(
            _same(got[k], want[k]) for k in want)
    if isinstance(want, list):
        return isinstance(got, list) and len(got) == len(want) and all(
            _same(g, w) for g, w in zip(got, want))
    return type(got) is type(want) and got == want


def _ct() -> Sample:
    parts = (ImagePart(_image(1)), TextPart("SLICE 1"), ImagePart(_image(2)), TextPart("SLICE 2"))
    locs = (Location("a.dcm", slice_index=0), Location("b.dcm", slice_index=1))
    return Sample(parts, "ct", Provenance("series/", locs))


def test_ct_slices_each_followed_by_their_label():
    got = _ct().to_messages(question=" Any bleed? ", system="You are a radiologist.")
    want = [
        {"role": "system", "content": "You are a radiologist."},
        {"role": "user", "content": [
            {"type": "text", "text": "Any bleed?"},
            {"type": "image", "image": _image(1)},
            {"type": "text", "text": "SLICE 1"},
            {"type": "image", "image": _image(2)},
            {"type": "text", "text": "SLICE 2"},
        ]},
    ]
    assert _same(got, want)


def test_answer_adds_an_assistant_turn_and_blank_system_is_left_out():
    vqa = Sample((TextPart("Is there a fracture?"), ImagePart(_image(7))), "qa",
                 Provenance("vqa.json:0", (Location("img.png"),)), label="no")
    got = vqa.to_messages(answer=vqa.label, system="  ")
    want = [
        {"role": "user", "content": [
            {"type": "text", "text": "Is there a fracture?"},
            {"type": "image", "image": _image(7)},
        ]},
        {"role": "assistant", "content": "no"},
    ]
    assert _same(got, want)


def test_text_only_samples_give_one_string():
    record = Sample((TextPart("Patient record (FHIR)."), TextPart("   ")), "ehr",
                    Provenance("b.json"))
    mcq = Sample((TextPart("Which drug? A) x B) y"),), "qa", Provenance("m.jsonl:1"), label="B")
    got = md.to_messages([record, mcq], question="Summarise.")
    assert got == [{"role": "user",
                    "content": "Summarise.\n\nPatient record (FHIR).\n\nWhich drug? A) x B) y"}]
    assert mcq.to_messages(answer="B") == [{"role": "user", "content": "Which drug? A) x B) y"},
                                           {"role": "assistant", "content": "B"}]


def test_several_samples_keep_their_order():
    photo = Sample((ImagePart(_image(9)),), "derm", Provenance("p.jpg", (Location("p.jpg"),)))
    got = md.to_messages([photo, _ct()], question="Compare.")
    want = [{"role": "user", "content": [
        {"type": "text", "text": "Compare."},
        {"type": "image", "image": _image(9)},
        {"type": "image", "image": _image(1)},
        {"type": "text", "text": "SLICE 1"},
        {"type": "image", "image": _image(2)},
        {"type": "text", "text": "SLICE 2"},
    ]}]
    assert _same(got, want)


def test_without_images_the_slice_labels_go_too():
    report = Sample((ImagePart(_image(3)), TextPart("FRAME 1"), TextPart("Cine loop, 2 frames"),
                     ImagePart(_image(4)), TextPart("frame 2 (t = 0.04 s)")), "us",
                    Provenance("u.dcm", (Location("u.dcm", frame=0), Location("u.dcm", frame=1))))
    got = report.to_messages(question="Describe.", images=False)
    assert got == [{"role": "user", "content": "Describe.\n\nCine loop, 2 frames"}]
    assert _ct().to_messages(images=False) == [{"role": "user", "content": ""}]


def test_a_loaded_ct_series(tmp_path):
    write_series(tmp_path / "s", 3)
    [ct] = md.load(tmp_path / "s")
    got = ct.to_messages(question="Findings?")
    content = got[0]["content"]
    assert [i["type"] for i in content] == ["text"] + ["image", "text"] * 3
    assert [i["text"] for i in content if i["type"] == "text"] == [
        "Findings?", "SLICE 1", "SLICE 2", "SLICE 3"]
    for item, image in zip(content[1::2], ct.images):
        assert item["image"] is image  # the sample's own read-only arrays, not copies


def test_not_a_sample():
    with pytest.raises(TypeError, match="medgemma_data.load"):
        md.to_messages(["chest.png"], question="?")
