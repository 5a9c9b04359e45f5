"""The sft stage's validation metrics beyond the loss: answer-token accuracy (every eval) and
the exact match of greedy answers (sft.exact_match), checked against transformers running the
exported model, and best-K by the accuracy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from train_fixtures import chat_rows, metrics, small_tokenizer, tiny_text_checkpoint, write_jsonl

from medgemma_core.chat import format_chat
from medgemma_train.engine.checkpoint import Checkpoints
from medgemma_train.engine.config import load_config
from medgemma_train.engine.stages import get_stage
from medgemma_train.engine.trainer import train


def _hf_base(root):
    from medgemma_core.checkpoints.export import load_any, save_hf

    orbax = tiny_text_checkpoint(root / "orbax", layers=1)  # one layer: a shorter compile
    return save_hf(load_any(orbax), root / "base-hf", source=orbax)


def _reference(hf_folder, rows, max_new):
    """transformers on the exported model: the answer tokens' argmax accuracy (labels by
    hand: every token after "<start_of_turn>model\\n") and the greedy answers."""
    tok = small_tokenizer()
    lm = transformers.AutoModelForCausalLM.from_pretrained(hf_folder).eval()
    right = total = 0
    answers = []
    stops = sorted(tok.stop_ids)
    for row in rows:
        ids = tok.encode(format_chat(row["messages"], add_generation_prompt=False))
        prompt = tok.encode(format_chat(row["messages"][:1], add_generation_prompt=True))
        with torch.no_grad():
            pred = lm(torch.tensor([ids])).logits[0, :-1].argmax(-1).numpy()
            out = lm.generate(torch.tensor([prompt]), max_new_tokens=max_new, do_sample=False,
                              eos_token_id=stops, pad_token_id=tok.pad_id)[0, len(prompt):] \
                if max_new else []
        targets = np.asarray(ids[1:])
        right += int((pred[len(prompt) - 1:] == targets[len(prompt) - 1:]).sum())
        total += len(ids) - len(prompt)
        gen = [int(t) for t in out]
        gen = gen[:next((i for i, t in enumerate(gen) if t in stops), len(gen))]
        answers.append(tok.decode(gen))
    return right, total, answers


def _cfg(base, data, val, run, *, sft=None, **run_kw):
    return load_config(base={
        "model": {"checkpoint": str(base)},
        "data": {"train": [str(data)], "eval": [str(val)], "batch_size": 4, "seq_len": 24,
                 "mask_prompt": True},
        "lora": {"rank": 4, "dropout": 0.0},
        "optimizer": {"lr": 3e-2, "warmup_ratio": 0.0, "decay": "constant"},
        **({"sft": sft} if sft else {}),
        "run": {"out": str(run), "save_every": 0, "progress": False, "export": ["hf"],
                **run_kw}}, settings=get_stage("sft").settings)


def test_token_accuracy_matches_transformers_and_picks_the_best(tmp_path):
    """Train on one answer ("Paris"), validate on rows answered "Paris" and "Rome". The final
    validation's eval_token_accuracy (answer tokens, data.mask_prompt) equals transformers' on
    the exported model. Best-K by the accuracy with run.best_mode=min (its low point is an
    early step, so keep-last alone would delete it: the selection is visibly by this metric)
    keeps the step metrics.jsonl names."""
    base = _hf_base(tmp_path)
    data = write_jsonl(tmp_path / "fit.jsonl", chat_rows(8, answers=["Paris"]))
    val_rows = chat_rows(4, seed=9, answers=["Paris", "Rome"])
    val = write_jsonl(tmp_path / "val.jsonl", val_rows)
    run = tmp_path / "run"
    result = train(_cfg(base, data, val, run, max_steps=8, eval_every=2, keep_last=1,
                        keep_best=1, best_metric="eval_token_accuracy", best_mode="min"),
                   get_stage("sft"))
    evals = {r["step"]: r for r in metrics(run, "eval")}
    assert sorted(evals) == [2, 4, 6, 8] and "eval_exact_match" not in evals[8]  # off
    right, total, _ = _reference(run / "export" / "hf", val_rows, 0)
    assert evals[8]["eval_token_accuracy"] == pytest.approx(right / total, abs=1e-9)
    assert 0.0 < right / total < 1.0
    assert result["final_eval"]["eval_token_accuracy"] == evals[8]["eval_token_accuracy"]
    acc = {s: r["eval_token_accuracy"] for s, r in evals.items()}
    kept = Checkpoints(run / "checkpoints", read_only=True).steps()
    low = min(acc.values())
    assert acc[8] > low, acc
    assert len(kept) == 2 and kept[-1] == 8 and acc[kept[0]] == low, (kept, acc)
    assert result["best_step"] == kept[0]


@pytest.mark.slow
def test_exact_match_matches_transformers_greedy(tmp_path):
    """sft.exact_match: the greedy answers of the first N eval rows, compared with the rows'
    answers; equal to transformers' greedy generate on the exported model, and a model that
    learnt to answer "Paris" is right on the half of the rows whose answer is Paris."""
    base = _hf_base(tmp_path)
    data = write_jsonl(tmp_path / "fit.jsonl", chat_rows(8, answers=["Paris"]))
    val_rows = chat_rows(4, seed=9, answers=["Paris", "Rome"])
    val = write_jsonl(tmp_path / "val.jsonl", val_rows)
    run = tmp_path / "run"
    result = train(_cfg(base, data, val, run, max_steps=30, keep_best=0,
                        sft={"exact_match": 4, "max_new_tokens": 6, "generate_batch": 4}),
                   get_stage("sft"))
    final = metrics(run, "eval")[-1]
    _, _, answers = _reference(run / "export" / "hf", val_rows, 6)
    hits = sum(" ".join(a.split()).casefold() == r["messages"][1]["content"].casefold()
               for a, r in zip(answers, val_rows, strict=True))
    assert final["eval_exact_match"] == pytest.approx(hits / 4)
    assert final["eval_exact_match_rows"] == 4
    assert hits == 2, answers
    assert result["final_eval"]["eval_exact_match"] == final["eval_exact_match"]
