"""Rows longer than data.seq_len: counted and reported at start-up (and in --dry-run); a row
whose whole answer is past the cut is a bad row (an error unless --skip-bad drops it)."""

from __future__ import annotations

import pytest
from train_fixtures import small_tokenizer, tiny_text_checkpoint, write_jsonl

from medgemma_train.engine.config import load_config
from medgemma_train.engine.data import DataError, Example
from medgemma_train.engine.pipeline import Encoder
from medgemma_train.engine.stages import get_stage
from medgemma_train.engine.trainer import train

WORDS = " ".join(["alpha beta gamma delta"] * 12)  # about 50 tokens
ROWS = [
    {"messages": [{"role": "user", "content": "What comes after 1?"},
                  {"role": "assistant", "content": "2"}]},                      # fits
    {"messages": [{"role": "user", "content": "Say it."},
                  {"role": "assistant", "content": WORDS}]},                    # cut in its answer
    {"messages": [{"role": "user", "content": WORDS},
                  {"role": "assistant", "content": "yes"}]},                    # answer cut off
    {"messages": [{"role": "user", "content": "What comes after 5?"},
                  {"role": "assistant", "content": "6"}]},                      # fits
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lengths")
    return root, tiny_text_checkpoint(root / "ck"), write_jsonl(root / "train.jsonl", ROWS)


def _cfg(root, ck, data, **data_kw):
    return load_config(base={"model": {"checkpoint": str(ck)},
                             "data": {"train": [str(data)], "batch_size": 2, "seq_len": 32,
                                      **data_kw},
                             "run": {"out": str(root / "run"), "max_steps": 2,
                                     "progress": False}})


def test_long_rows_are_reported_and_answerless_ones_are_bad(setup):
    root, ck, data = setup
    tok = small_tokenizer()
    # by hand: the short rows fit in 32 tokens, the two with 48 words do not
    assert len(tok.encode("What comes after 1?")) < 12 and len(tok.encode(WORDS)) > 40
    with pytest.raises(DataError) as info:
        train(_cfg(root, ck, data), get_stage("sft"), dry_run=True)
    msg = str(info.value)
    assert "\n" not in msg and f"{data}:3" in msg and "raise data.seq_len" in msg
    assert "--skip-bad" in msg and f"{data}:2" not in msg

    said = []
    plan = train(_cfg(root, ck, data, skip_bad=True), get_stage("sft"), dry_run=True,
                 say=said.append)
    warnings = [s for s in said if s.startswith("warning:")]
    assert len(warnings) == 1, said
    w = warnings[0]
    assert "2 of 4 row(s)" in w and f"first {data}:2" in w and "raise data.seq_len" in w
    assert "1 of them are bad rows" in w
    assert plan["cut_rows"] == 2 and plan["answer_cut_rows"] == 1
    assert plan["cut_first"] == f"{data}:2" and plan["bad_rows"] == 1
    assert plan["mixture"][0]["rows"] == 3  # the answerless row is dropped
    assert plan["longest_row_tokens"] > 32

    # a long enough seq_len: nothing cut, nothing said
    said.clear()
    plan = train(_cfg(root, ck, data, seq_len=128), get_stage("sft"), dry_run=True,
                 say=said.append)
    assert plan["cut_rows"] == 0 and plan["bad_rows"] == 0 and not said


def test_encoding_checks_the_cut_too():
    """The same rule where rows are encoded (manifest rows, whose images load only then)."""
    from medgemma_core import Processor
    from medgemma_core.processor import ProcessorConfig

    tok = small_tokenizer()
    tok = tok.with_added_tokens({tok.vocab_size: "<image_soft_token>"},
                                special_ids=(tok.vocab_size,))
    enc = Encoder(Processor(tok, ProcessorConfig()), seq_len=32, slots=0, image_text=False)
    ok, cut_answer, no_answer = (Example(f"f:{i}", messages=tuple(r["messages"]))
                                 for i, r in enumerate(ROWS[:3]))
    assert enc.process(ok) and enc.process(cut_answer)
    with pytest.raises(DataError, match="f:2: .*no answer left; raise data.seq_len"):
        enc.process(no_answer)
    skip = Encoder(enc.processor, seq_len=32, slots=0, image_text=False, skip_bad=True)
    batch = skip([ok, no_answer], 1)
    assert (batch["labels"][0, 1] == -100).all() and [b.where for b in skip.bad] == ["f:2"]
    assert (batch["labels"][0, 0] != -100).any()
