"""loglik scoring against lm-evaluation-harness (transformers backend) on the same prompts:
the same option chosen item by item, the same log-likelihoods up to float32 rounding."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from conftest import QA_SETS, TASK_OF
from evalref import lm_eval_loglik, mcq_rows

from medgemma_train.evals import EvalItem, LoglikMode, Prompt, get_task, read_items


def _ours(model, task, items, batch_size=4):
    return LoglikMode(model, batch_size=batch_size).score(items, task)


def _check(records, theirs, atol):
    assert len(theirs) == len(records)
    for r in records:
        ours = [o["loglik"] for o in r["options"]]
        ref = theirs[r["id"]]
        np.testing.assert_allclose(ours, ref, atol=atol, rtol=0, err_msg=r["id"])
        # item by item the same choice (argmax, the first on ties, as lm-eval's np.argmax)
        assert r["parsed"] == r["options"][int(np.argmax(ref))]["letter"], r["id"]


@pytest.fixture(scope="module")
def tiny_scored(tiny_text, tiny_text_model, tmp_path_factory, qa_dir):
    """``{case: (our records, lm-eval's log-likelihoods)}`` for the tiny-model cases below,
    lm-eval scoring the rows of every case in one run (its start-up dominates these small
    cases); the ids are prefixed by the case, and split back."""
    import transformers

    folder, reference = tiny_text
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    medqa, medmcqa = get_task("medqa"), get_task("medmcqa")
    texts = dataclasses.replace(medmcqa, prompt=Prompt(loglik=medmcqa.prompt.loglik,
                                                       continuation=" {text}",
                                                       generate=medmcqa.prompt.generate))
    spaced = dataclasses.replace(medqa, prompt=Prompt(
        loglik="Question: {question}\n{options}\nAnswer: ", continuation="{letter}",
        generate="x"))
    vowel = EvalItem("q1", "Which is a vowel?", "A", {"A": "e", "B": "k"})
    cases = {
        "letters": _ours(tiny_text_model, medqa, read_items(
            medqa, qa_dir / "medqa_sampled_50.jsonl")[0].items[:12], batch_size=3),
        "texts": _ours(tiny_text_model, texts, read_items(
            texts, qa_dir / "medmcqa_sampled_50.jsonl")[0].items[:8], batch_size=3),
        "space": _ours(tiny_text_model, spaced, [vowel])}
    rows = [{**row, "id": f"{name}/{row['id']}"}
            for name, records in cases.items() for row in mcq_rows(records)]
    theirs = lm_eval_loglik(reference, tok, rows, tmp_path_factory.mktemp("tiny"))
    assert len(theirs) == len(rows)
    return {name: (records, {k.split("/", 1)[1]: v for k, v in theirs.items()
                             if k.startswith(name + "/")})
            for name, records in cases.items()}


def test_tiny_model_letters_and_option_texts(tiny_scored):
    """A tiny random model, two continuation styles: one-token letters (one row shared by the
    options; 12 MedQA items) and the options' own texts (a row each, several tokens; 8 MedMCQA
    items, whose short questions keep lm-eval's full-vocabulary logits small)."""
    records, theirs = tiny_scored["letters"]
    assert len(records) == 12
    _check(records, theirs, atol=2e-4)
    records, theirs = tiny_scored["texts"]
    assert len(records) == 8
    assert max(len(o["continuation_ids"]) for r in records for o in r["options"]) > 4
    _check(records, theirs, atol=2e-4)


def test_trailing_space_moves_into_the_continuation(tiny_scored):
    """lm-eval's rule: a context ending in spaces gives them to the continuation."""
    [record], theirs = tiny_scored["space"]
    assert record["prompt"].endswith("Answer: ")
    _check([record], theirs, atol=2e-4)


def test_real_270m_medqa_first_items(ours_270m, reference_270m, tmp_path, qa_dir):
    """The real Gemma 3 270M, the first 5 MedQA fixture items (the slow test runs all 250)."""
    model, tok = reference_270m
    task = get_task("medqa")
    items = read_items(task, qa_dir / "medqa_sampled_50.jsonl")[0].items[:5]
    records = _ours(ours_270m, task, items)
    theirs = lm_eval_loglik(model, tok, mcq_rows(records), tmp_path / "m5")
    _check(records, theirs, atol=2e-3)


@pytest.mark.slow
@pytest.mark.parametrize("name", QA_SETS)
def test_real_270m_every_fixture_item(name, ours_270m, reference_270m, tmp_path, qa_dir):
    model, tok = reference_270m
    task = get_task(TASK_OF[name])
    items = read_items(task, qa_dir / f"{name}_sampled_50.jsonl")[0].items
    assert len(items) == 50
    records = _ours(ours_270m, task, items, batch_size=8)
    theirs = lm_eval_loglik(model, tok, mcq_rows(records), tmp_path / name)
    _check(records, theirs, atol=2e-3)
