"""Token ids against transformers' SiglipTokenizer on the same spiece.model."""

from __future__ import annotations

import numpy as np
import pytest
import transformers

from medsiglip import SiglipTokenizer
from medsiglip.tokenizer import canonicalize

TEXTS = [
    "A Chest X-Ray, showing PNEUMONIA!!",
    "  multiple   spaces\tand\nnewlines ",
    "Résumé café naïve über straße ✓ 日本語",
    "ＦＵＬＬWIDTH letters and ½ fractions",
    "",
    "...!!!???",
    "the patient has a left pleural effusion " * 12,  # over-long
    "hello \u2581 world",
    "</s> eos written in the text",
    "<unk> x",
    "x </s>",
    "a<unk>b  </s>  c",
    "(left) [right] {both}; e.g. 5.5 mm -- #3 @home ~50% 'quoted' \"double\"",
]


@pytest.mark.parametrize("max_length", [64, 16])
def test_ids_match_transformers(spiece_model, max_length):
    ref = transformers.SiglipTokenizer(str(spiece_model))
    mine = SiglipTokenizer(spiece_model, max_length=max_length)
    want = ref(TEXTS, padding="max_length", truncation=True, max_length=max_length)["input_ids"]
    got = mine.encode(TEXTS)
    assert got.shape == (len(TEXTS), max_length) and got.dtype == np.int32
    for text, w, g in zip(TEXTS, want, got.tolist()):
        assert g == w, text


def test_padding_and_truncation_rules(spiece_model):
    tok = SiglipTokenizer(spiece_model, max_length=8)
    ids = tok.encode("pneumonia " * 50)[0]
    assert ids[-1] == tok.eos_id and len(ids) == 8  # truncated, </s> kept last
    empty = tok.encode("")[0]
    assert (empty == tok.eos_id).all()  # pad is </s>
    assert tok.encode(["a", "b"]).shape == (2, 8)


def test_canonicalize():
    assert canonicalize("  Hello,   WORLD!\n") == "hello world"
    assert canonicalize("a-b_c", lower=False) == "abc"


def test_bad_model_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="spiece.model"):
        SiglipTokenizer(tmp_path / "absent.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        SiglipTokenizer(bad)
