"""Metrics and statistics against values computed by hand."""

from __future__ import annotations

import pytest

from medgemma_train.evals import metrics as m
from medgemma_train.evals.stats import bootstrap_ci, paired_bootstrap


def test_normalize_answer_squad():
    assert m.normalize_answer("The  Left Lung.") == "left lung"
    assert m.normalize_answer("An X-ray, a CT!") == "xray ct"


@pytest.mark.parametrize(("pred", "gold", "want"), [
    ("the big red dog", "a red dog", 0.8),        # P 2/3, R 1
    ("Left lung.", "left lung", 1.0),
    ("dog dog cat", "dog cat cat", 2 / 3),        # overlap counts min(count): 1 dog + 1 cat
    ("liver", "spleen", 0.0),
    ("", "", 1.0),                                 # both empty: equal
    ("the", "", 1.0),                              # an article alone normalizes to nothing
    ("", "kidney", 0.0),
])
def test_token_f1(pred, gold, want):
    assert m.token_f1(pred, gold) == pytest.approx(want)


def _recs(golds, preds):
    return [{"gold": g, "parsed": p, "correct": g == p} for g, p in zip(golds, preds)]


def test_macro_and_weighted_f1_by_hand():
    # A: P 1, R 1/2, F1 2/3; B: P 2/3, R 1, F1 4/5; C: F1 0; an unparsed answer is wrong
    recs = _recs(["A", "A", "B", "B", "C"], ["A", "B", "B", "B", None])
    assert m.MACRO_F1(recs) == pytest.approx((2 / 3 + 0.8 + 0) / 3)
    assert m.WEIGHTED_F1(recs) == pytest.approx((2 * 2 / 3 + 2 * 0.8 + 0) / 5)
    assert m.ACCURACY(recs) == pytest.approx(3 / 5)


def test_multilabel_f1_by_hand():
    # X: TP 1, FN 1 -> 2/3; Y: 1; Z: one false positive, no positives -> 0
    recs = _recs([["X"], ["X", "Y"], []], [["X"], ["Y"], ["Z"]])
    assert m.multilabel_f1(("X", "Y", "Z"))(recs) == pytest.approx((2 / 3 + 1 + 0) / 3)
    # weighted by support (X 2, Y 1, Z 0)
    assert m.multilabel_f1(("X", "Y", "Z"), "weighted")(recs) == pytest.approx(
        (2 * 2 / 3 + 1) / 3)


def test_rouge_l_and_bleu():
    import sacrebleu

    # LCS "the cat on the mat" = 5 tokens: P 5/5, R 5/6, F 10/11
    rec = [{"gold": "the cat sat on the mat", "parsed": "the cat on the mat"}]
    assert m.ROUGE_L(rec) == pytest.approx(10 / 11)
    same = [{"gold": "no acute cardiopulmonary process", "parsed":
             "no acute cardiopulmonary process"}]
    assert m.BLEU(same) == pytest.approx(100.0)
    short = [{"gold": "the heart size is normal and the lungs are clear",
              "parsed": "the heart size is normal"}]
    want = sacrebleu.corpus_bleu(["the heart size is normal"],
                                 [["the heart size is normal and the lungs are clear"]]).score
    assert m.BLEU(short) == pytest.approx(want)
    assert want < 50  # the brevity penalty: hypothesis and reference were not swapped


def test_macro_auc_by_hand():
    # X: positives 0.9, 0.4; negatives 0.2, 0.6 -> 3 of 4 pairs ordered; Y has no positive
    recs = [{"gold": g, "scores": {"X": x, "Y": 0.5}}
            for g, x in ((["X"], 0.9), ([], 0.2), ([], 0.6), (["X"], 0.4))]
    assert m.macro_auc(("X", "Y"))(recs) == pytest.approx(0.75)
    assert m.auc_per_label(recs, ("X", "Y")) == {"X": pytest.approx(0.75), "Y": None}


def test_radgraph_absent_says_how_to_install():
    note = m.RADGRAPH_F1.available()
    try:
        import radgraph  # noqa: F401
    except Exception:
        assert note is not None and "pip install 'medgemma-train[radgraph]'" in note
    else:
        assert note is None


def test_bootstrap_ci_by_hand():
    # 10 of 20 correct: a resample's accuracy is Binomial(20, 1/2) / 20; P(X <= 5) = 2.07% and
    # P(X <= 6) = 5.77% put the 2.5th percentile at 6/20, the 97.5th at 14/20 by symmetry
    recs = [{"correct": i % 2 == 0} for i in range(20)]
    assert bootstrap_ci(m.ACCURACY, recs, n_boot=20000, seed=1) == (0.3, 0.7)
    # two items, one right: resamples give 0, 1/2, 1 with 1/4, 1/2, 1/4 -> [0, 1]
    assert bootstrap_ci(m.ACCURACY, [{"correct": True}, {"correct": False}],
                        n_boot=2000, seed=0) == (0.0, 1.0)
    assert bootstrap_ci(m.ACCURACY, [{"correct": True}] * 5) == (1.0, 1.0)


def test_bootstrap_is_seeded_and_recomputes_corpus_metrics():
    recs = _recs(list("ABCDABCDAB"), list("ABCAABDDAC"))
    a = bootstrap_ci(m.MACRO_F1, recs, n_boot=300, seed=7)
    assert a == bootstrap_ci(m.MACRO_F1, recs, n_boot=300, seed=7)
    assert a != bootstrap_ci(m.MACRO_F1, recs, n_boot=300, seed=8)
    assert a[0] < m.MACRO_F1(recs) < a[1]


def test_paired_bootstrap_by_hand():
    base = [{"correct": c} for c in (False, False, True)]
    better = [{"correct": c} for c in (True, True, False)]
    # per-item differences 1, 1, -1: the mean of 3 resampled differences is <= 0 when at least
    # two draws are -1, P = 3 (1/3)^2 (2/3) + (1/3)^3 = 7/27, so p = 2 * 7/27
    out = paired_bootstrap(m.ACCURACY, base, better, n_boot=20000, seed=0)
    assert out["delta"] == pytest.approx(1 / 3)
    assert out["p_value"] == pytest.approx(14 / 27, abs=0.02)
    same = paired_bootstrap(m.ACCURACY, base, base, n_boot=500)
    assert same["p_value"] == 1.0 and same["delta"] == 0.0
    always = paired_bootstrap(m.ACCURACY, [{"correct": False}] * 8, [{"correct": True}] * 8)
    assert always["p_value"] == 0.0 and always["ci95"] == [1.0, 1.0]
    with pytest.raises(ValueError, match="same items"):
        paired_bootstrap(m.ACCURACY, base, base[:2])


def test_compare_of_hand_written_run_folders(tmp_path):
    """``compare`` on two run folders in the harness's format, written by hand (the slow
    test_eval_cli test makes them with real eval runs): accuracy on the common items, the paired
    delta, the Markdown table and the chart."""
    import json

    from PIL import Image

    from medgemma_train.evals import compare

    base = [True, False, True, False, False, True]  # 3 / 6
    other = [True, True, True, False, True, True]   # 5 / 6
    for name, marks in (("base", base), ("other", other)):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "run.json").write_text(json.dumps(
            {"task": "medqa", "mode": "loglik", "checkpoint": f"ck-{name}"}))
        rows = [{"id": str(i), "correct": c, "parsed": "A", "gold": "A" if c else "B"}
                for i, c in enumerate(marks)]
        rows.append({"id": "99", "skipped": "too long"})  # never part of the comparison
        (folder / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = compare([tmp_path / "base", tmp_path / "other"], out=tmp_path / "report",
                     n_boot=300)
    assert result["items"] == 6
    acc = [r["metrics"]["accuracy"]["value"] for r in result["runs"]]
    assert acc == [pytest.approx(0.5), pytest.approx(5 / 6)]
    assert result["runs"][1]["metrics"]["accuracy"]["vs_base"]["delta"] == pytest.approx(1 / 3)
    table = (tmp_path / "report" / "comparison.md").read_text()
    assert "| base |" in table and "| other |" in table and "p (paired bootstrap)" in table
    png = Image.open(tmp_path / "report" / "comparison.png")
    assert png.format == "PNG" and png.size[0] > 200


@pytest.mark.parametrize("average", ["macro", "weighted"])
def test_resampled_f1_equals_scikit_learn_on_every_resample(average):
    """The bootstrap's all-resamples-at-once F1 against scikit-learn's f1_score on each
    resample: single-answer classes (some answers unparsed or outside the gold set) and
    multilabel sets (some labels never true or never predicted)."""
    import numpy as np
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(0)
    gold = rng.choice(list("ABCD"), 40, p=[0.5, 0.3, 0.15, 0.05])
    pred = [g if rng.random() < 0.6 else rng.choice(["A", "B", "E", None]) for g in gold]
    records = [{"gold": g, "parsed": p} for g, p in zip(gold, pred)]
    idx = rng.integers(0, len(records), size=(50, len(records)))
    metric = m.MACRO_F1 if average == "macro" else m.WEIGHTED_F1
    got = metric.resampled(records, idx)
    for b, row in enumerate(idx):
        y_true = [str(records[i]["gold"]) for i in row]
        y_pred = ["" if records[i]["parsed"] is None else str(records[i]["parsed"]) for i in row]
        want = f1_score(y_true, y_pred, labels=sorted(set(y_true)), average=average,
                        zero_division=0)
        assert got[b] == pytest.approx(want, abs=1e-12), b
    labels = ["effusion", "edema", "nodule", "mass"]
    sets = [[lab for lab in labels[:3] if rng.random() < 0.3] for _ in range(30)]
    guesses = [[lab for lab in labels if rng.random() < 0.25] for _ in range(30)]
    records = [{"gold": s, "parsed": g} for s, g in zip(sets, guesses)]
    idx = rng.integers(0, len(records), size=(50, len(records)))
    metric = m.multilabel_f1(labels, average)
    got = metric.resampled(records, idx)
    for b, row in enumerate(idx):
        y_true = np.array([[lab in records[i]["gold"] for lab in labels] for i in row], int)
        y_pred = np.array([[lab in records[i]["parsed"] for lab in labels] for i in row], int)
        want = f1_score(y_true, y_pred, average=average, zero_division=0)
        assert got[b] == pytest.approx(want, abs=1e-12), b
    # and the interval comes out the same through either path
    slow = m.Metric("slow", "", compute=metric.compute)
    assert bootstrap_ci(metric, records, n_boot=200) == bootstrap_ci(slow, records, n_boot=200)


def test_resampled_auc_equals_scikit_learn_on_every_resample():
    """Macro AUC on every resample at once against scikit-learn's roc_auc_score per label and
    resample (tied scores included; labels with one gold class in a resample left out)."""
    import numpy as np
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(1)
    labels = ["effusion", "edema", "rare"]
    records = []
    for i in range(25):
        gold = [lab for lab, p in zip(labels, (0.4, 0.5, 0.06)) if rng.random() < p]
        scores = {lab: float(np.round(rng.random() + 0.5 * (lab in gold), 1)) for lab in labels}
        records.append({"id": str(i), "gold": gold, "scores": scores})
    idx = rng.integers(0, len(records), size=(60, len(records)))
    got = m.macro_auc(labels).resampled(records, idx)
    for b, row in enumerate(idx):
        aucs = []
        for lab in labels:
            y = [lab in records[i]["gold"] for i in row]
            if 0 < sum(y) < len(y):
                aucs.append(roc_auc_score(y, [records[i]["scores"][lab] for i in row]))
        assert got[b] == pytest.approx(np.mean(aucs), abs=1e-12), b
