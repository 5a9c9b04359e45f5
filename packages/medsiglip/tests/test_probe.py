"""Linear probe: AUC against scipy's Mann-Whitney U, the fit against scipy.optimize."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import minimize
from scipy.special import log_softmax
from scipy.stats import mannwhitneyu

from medsiglip import fit_linear_probe
from medsiglip.probe import roc_auc


def test_auc_hand_computed_and_mann_whitney():
    # Positives 0.9, 0.4; negatives 0.5, 0.1: pairs won 1 + 1 + 0 + 1 = 3 of 4.
    assert roc_auc(np.array([0.9, 0.4, 0.5, 0.1]), np.array([1, 1, 0, 0])) == 0.75
    assert roc_auc(np.array([0.5, 0.5]), np.array([1, 0])) == 0.5  # a tie counts one half
    rng = np.random.default_rng(0)
    s, y = rng.normal(size=60).round(1), rng.random(60) > 0.4
    u = mannwhitneyu(s[y], s[~y]).statistic
    assert roc_auc(s, y) == pytest.approx(u / (y.sum() * (~y).sum()))
    with pytest.raises(ValueError, match="both positive and negative"):
        roc_auc(np.ones(3), np.ones(3))


def test_fit_matches_scipy_optimum():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(80, 5))
    y = np.digitize(x @ rng.normal(size=5) + 0.5 * rng.normal(size=80), [-0.7, 0.7])
    l2 = 0.05
    probe = fit_linear_probe(x, list(y), l2=l2)

    def objective(theta):
        w, b = theta[:15].reshape(5, 3), theta[15:]
        ll = log_softmax(x @ w + b, axis=1)[np.arange(80), y]
        return -ll.mean() + 0.5 * l2 * np.sum(w * w)

    ref = minimize(objective, np.zeros(18), method="BFGS", options={"gtol": 1e-8})
    theta = np.concatenate([probe.weights.ravel(), probe.bias])
    assert objective(theta) == pytest.approx(ref.fun, abs=1e-5)
    np.testing.assert_allclose(probe.weights, ref.x[:15].reshape(5, 3), atol=2e-3)


def test_probe_metrics_on_separable_data():
    rng = np.random.default_rng(2)
    centers = {"normal": np.zeros(8), "effusion": np.full(8, 2.0)}
    labels = ["normal", "effusion"] * 30
    x = np.stack([centers[lab] + 0.3 * rng.normal(size=8) for lab in labels])
    probe = fit_linear_probe(x[:40], labels[:40])
    metrics = probe.evaluate(x[40:], labels[40:])
    assert metrics == {"accuracy": 1.0, "auc": 1.0}
    assert probe.predict(x[40:42]) == labels[40:42]
    with pytest.raises(ValueError, match="not seen in training"):
        probe.evaluate(x[:1], ["pneumothorax"])
    with pytest.raises(ValueError, match="two classes"):
        fit_linear_probe(x[:4], ["a"] * 4)
