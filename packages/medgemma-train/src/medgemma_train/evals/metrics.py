"""Metrics over scored records (``items.jsonl`` rows: ``gold``, ``parsed``, ``correct``,
``scores``...). Values are fractions in 0..1, except BLEU (sacrebleu's 0..100 score).

* ``accuracy``: the mean of ``correct`` (MCQ: the chosen letter is gold; VQA: normalized
  exact match; multilabel: the predicted label set equals gold).
* ``macro_f1`` / ``weighted_f1``: scikit-learn's ``f1_score`` (``zero_division=0``). For
  single-answer tasks the classes are the gold answers seen (an unparsed answer is wrong for
  its gold class); for multilabel tasks (:func:`multilabel_f1`) each of the task's labels is
  a binary class.
* ``token_f1``: SQuAD's F1 of the answer's tokens against gold after :func:`normalize_answer`
  (lower case; punctuation removed; the articles a / an / the removed; whitespace collapsed);
  when either side has no tokens the F1 is 1 if both are empty, else 0.
* ``exact_match``: ``normalize_answer(parsed) == normalize_answer(gold)``.
* ``rouge_l``: ``rouge-score``'s ROUGE-L F-measure (Porter stemming) per report, averaged.
* ``bleu``: sacrebleu's corpus BLEU (default 13a tokenization) of the reports.
* ``radgraph_f1``: the ``radgraph`` package's F1RadGraph (``reward_level="partial"``) per
  report, averaged; needs ``pip install 'medgemma-train[radgraph]'`` and its model.
* ``auc`` (:func:`macro_auc`): the mean over labels of scikit-learn's ROC AUC of each label's
  score (MedSigLIP zero-shot); labels whose gold is all positive or all negative are left out.

The bootstrap recomputes the F1s and the AUC on all its resamples at once (class counts by
``bincount``; AUC as the Mann-Whitney statistic of average ranks), equal to scikit-learn's
value on each resample (``tests/test_metrics.py``): 1,000 resamples of 200 items take 0.03
CPU s for macro F1, against 5.3 s calling scikit-learn per resample.
"""

from __future__ import annotations

import functools
import re
import string
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .spec import Metric

Records = Sequence[Mapping[str, Any]]


# ---- text normalisation (SQuAD) -----------------------------------------------------------
def normalize_answer(text: str) -> str:
    """SQuAD v1.1's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = str(text).lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def token_f1(prediction: str, gold: str) -> float:
    """SQuAD token F1 of one answer."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred or not ref:
        return float(pred == ref)
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    p, r = same / len(pred), same / len(ref)
    return 2 * p * r / (p + r)


# ---- per-item metrics ---------------------------------------------------------------------
def _correct(records: Records) -> np.ndarray:
    return np.array([float(bool(r.get("correct"))) for r in records])


def _token_f1(records: Records) -> np.ndarray:
    return np.array([token_f1(str(r.get("parsed") or ""), str(r["gold"])) for r in records])


def _exact(records: Records) -> np.ndarray:
    return np.array([float(normalize_answer(str(r.get("parsed") or "")) ==
                           normalize_answer(str(r["gold"]))) for r in records])


@functools.lru_cache(maxsize=1)
def _rouge():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def _rouge_l(records: Records) -> np.ndarray:
    scorer = _rouge()
    return np.array([scorer.score(str(r["gold"]), str(r.get("parsed") or ""))["rougeL"].fmeasure
                     for r in records])


RADGRAPH_HELP = ("RadGraph F1 needs the radgraph package and its model: pip install "
                 "'medgemma-train[radgraph]' (radgraph downloads its model on first use, so "
                 "run once with network access)")


def _radgraph_missing() -> str | None:
    try:
        import radgraph  # noqa: F401
    except Exception:
        return RADGRAPH_HELP
    return None


def _radgraph(records: Records) -> np.ndarray:
    from radgraph import F1RadGraph

    scorer = F1RadGraph(reward_level="partial")
    _, rewards, _, _ = scorer(refs=[str(r["gold"]) for r in records],
                              hyps=[str(r.get("parsed") or "") for r in records])
    return np.asarray(rewards, float)


# ---- corpus metrics -----------------------------------------------------------------------
def _f1(records: Records, average: str) -> float:
    from sklearn.metrics import f1_score

    y_true = [str(r["gold"]) for r in records]
    y_pred = [str(r.get("parsed")) if r.get("parsed") is not None else "" for r in records]
    return float(f1_score(y_true, y_pred, labels=sorted(set(y_true)), average=average,
                          zero_division=0))


def _f1_from_counts(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray, support: np.ndarray,
                    counted: np.ndarray, average: str) -> np.ndarray:
    """Per-resample F1 from ``[B, C]`` counts over the ``counted`` classes, as scikit-learn's
    ``f1_score(..., zero_division=0)``: 0 where a class has no true, no predicted item."""
    den = 2 * tp + fp + fn
    f1 = np.where(den > 0, 2 * tp / np.maximum(den, 1), 0.0)
    if average == "macro":
        return (f1 * counted).sum(1) / np.maximum(counted.sum(1), 1)
    if average == "weighted":
        w = support * counted
        total = w.sum(1)
        return np.where(total > 0, (f1 * w).sum(1) / np.maximum(total, 1), 0.0)
    raise ValueError(f"average must be 'macro' or 'weighted', not {average!r}")


def _f1_resampled(records: Records, idx: np.ndarray, average: str) -> np.ndarray:
    """:func:`_f1` of every resample ``records[idx[b]]`` at once (counts by ``bincount``):
    the classes of a resample are the gold answers in it, as in :func:`_f1`."""
    gold = [str(r["gold"]) for r in records]
    pred = [str(r.get("parsed")) if r.get("parsed") is not None else "" for r in records]
    ids = {lab: i for i, lab in enumerate(sorted(set(gold) | set(pred)))}
    k, b = len(ids), idx.shape[0]
    t = np.array([ids[g] for g in gold])[idx]  # [B, N]
    p = np.array([ids[x] for x in pred])[idx]
    row = np.arange(b)[:, None] * k

    def count(keys: np.ndarray) -> np.ndarray:
        return np.bincount(keys.ravel(), minlength=b * k).reshape(b, k)

    support, predicted = count(row + t), count(row + p)
    tp = count((row + t)[t == p])
    return _f1_from_counts(tp, predicted - tp, support - tp, support, support > 0, average)


def _label_matrix(sets: Sequence[Sequence[str]], labels: Sequence[str]) -> np.ndarray:
    index = {lab: i for i, lab in enumerate(labels)}
    out = np.zeros((len(sets), len(labels)), np.int8)
    for n, found in enumerate(sets):
        for lab in found or ():
            if lab in index:
                out[n, index[lab]] = 1
    return out


def multilabel_f1(labels: Sequence[str], average: str = "macro") -> Metric:
    """F1 over ``labels``, each a binary class (scikit-learn, ``zero_division=0``)."""
    labels = tuple(labels)

    def compute(records: Records) -> float:
        from sklearn.metrics import f1_score

        y_true = _label_matrix([r["gold"] for r in records], labels)
        y_pred = _label_matrix([r.get("parsed") or () for r in records], labels)
        return float(f1_score(y_true, y_pred, average=average, zero_division=0))

    def resampled(records: Records, idx: np.ndarray) -> np.ndarray:
        y_true = _label_matrix([r["gold"] for r in records], labels).astype(np.int32)
        y_pred = _label_matrix([r.get("parsed") or () for r in records], labels).astype(np.int32)
        support = y_true[idx].sum(1)  # [B, L]
        tp = (y_true & y_pred)[idx].sum(1)
        fp = y_pred[idx].sum(1) - tp
        return _f1_from_counts(tp, fp, support - tp, support, np.ones_like(support, bool),
                               average)

    return Metric(f"{average}_f1", f"scikit-learn {average} F1 over the labels "
                  f"({', '.join(labels)})", compute=compute, resampled=resampled)


def _bleu(records: Records) -> float:
    import sacrebleu

    hyps = [str(r.get("parsed") or "") for r in records]
    return float(sacrebleu.corpus_bleu(hyps, [[str(r["gold"]) for r in records]]).score)


def auc_per_label(records: Records, labels: Sequence[str]) -> dict[str, float | None]:
    """Each label's ROC AUC of the records' ``scores`` (None where gold has one class only)."""
    from sklearn.metrics import roc_auc_score

    out: dict[str, float | None] = {}
    for lab in labels:
        y = np.array([lab in r["gold"] for r in records], bool)
        out[lab] = (None if y.all() or not y.any() else
                    float(roc_auc_score(y, [float(r["scores"][lab]) for r in records])))
    return out


def macro_auc(labels: Sequence[str]) -> Metric:
    """The mean over ``labels`` of each label's ROC AUC (labels with one gold class left out)."""
    labels = tuple(labels)

    def compute(records: Records) -> float:
        aucs = [v for v in auc_per_label(records, labels).values() if v is not None]
        return float(np.mean(aucs)) if aucs else float("nan")

    def resampled(records: Records, idx: np.ndarray) -> np.ndarray:
        from scipy.stats import rankdata

        aucs = []
        for lab in labels:  # ROC AUC = Mann-Whitney U / (positives x negatives), ties averaged
            y = np.array([lab in r["gold"] for r in records], bool)[idx]
            ranks = rankdata(np.array([float(r["scores"][lab]) for r in records])[idx], axis=1)
            pos = y.sum(1)
            neg = y.shape[1] - pos
            u = (ranks * y).sum(1) - pos * (pos + 1) / 2
            aucs.append(np.where((pos > 0) & (neg > 0), u / np.maximum(pos * neg, 1), np.nan))
        stack = np.stack(aucs)  # [L, B]
        seen = ~np.isnan(stack)
        return np.where(seen.any(0), np.nansum(stack, 0) / np.maximum(seen.sum(0), 1), np.nan)

    return Metric("auc", "mean ROC AUC over the labels (MedSigLIP zero-shot scores)",
                  compute=compute, resampled=resampled)


ACCURACY = Metric("accuracy", "fraction correct", per_item=_correct)
MACRO_F1 = Metric("macro_f1", "scikit-learn F1, unweighted mean over classes",
                  compute=lambda rs: _f1(rs, "macro"),
                  resampled=lambda rs, idx: _f1_resampled(rs, idx, "macro"))
WEIGHTED_F1 = Metric("weighted_f1", "scikit-learn F1, mean over classes weighted by support",
                     compute=lambda rs: _f1(rs, "weighted"),
                     resampled=lambda rs, idx: _f1_resampled(rs, idx, "weighted"))
TOKEN_F1 = Metric("token_f1", "SQuAD token F1 after normalisation", per_item=_token_f1)
EXACT_MATCH = Metric("exact_match", "normalized answer equals gold", per_item=_exact)
ROUGE_L = Metric("rouge_l", "ROUGE-L F-measure (rouge-score, stemmed)", per_item=_rouge_l)
BLEU = Metric("bleu", "sacrebleu corpus BLEU (0..100)", compute=_bleu)
RADGRAPH_F1 = Metric("radgraph_f1", "F1RadGraph, partial reward (radgraph package)",
                     per_item=_radgraph, available=_radgraph_missing)

BUILTIN_METRICS = {m.name: m for m in (ACCURACY, MACRO_F1, WEIGHTED_F1, TOKEN_F1, EXACT_MATCH,
                                       ROUGE_L, BLEU, RADGRAPH_F1)}
