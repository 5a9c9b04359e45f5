"""Bootstrap confidence intervals and the paired-bootstrap test (seeded, numpy only).

* :func:`bootstrap_ci`: resample the items with replacement ``n_boot`` times
  (``numpy.random.default_rng(seed)``), recompute the metric on each resample, and take the
  2.5th and 97.5th percentiles (numpy's linear interpolation) as the 95% interval.
* :func:`paired_bootstrap`: the same resamples applied to two runs on the same items; the
  two-sided p-value of "B differs from A" is ``min(1, 2 * min(P(d <= 0), P(d >= 0)))`` where
  ``d`` is B's metric minus A's on a resample (a paired percentile test; 0 when every resample
  favours one side; with ``n_boot`` resamples the smallest non-zero value is ``2 / n_boot``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from .spec import Metric

Records = Sequence[Mapping[str, Any]]


def _indices(n: int, n_boot: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def _resampled(metric: Metric, records: Records, idx: np.ndarray) -> np.ndarray:
    if metric.per_item is not None:
        scores = np.asarray(metric.per_item(records), float)
        return scores[idx].mean(axis=1)
    if metric.resampled is not None:
        return np.asarray(metric.resampled(records, idx), float)
    assert metric.compute is not None
    return np.array([metric.compute([records[i] for i in row]) for row in idx])


def bootstrap_ci(metric: Metric | Callable[[Records], float], records: Records, *,
                 n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """The percentile bootstrap interval of ``metric`` over ``records``."""
    if not isinstance(metric, Metric):
        metric = Metric("custom", "", compute=metric)
    if not records:
        return float("nan"), float("nan")
    values = _resampled(metric, records, _indices(len(records), n_boot, seed))
    values = values[~np.isnan(values)]
    if not len(values):
        return float("nan"), float("nan")
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(values, [tail, 100 - tail])
    return float(lo), float(hi)


def paired_bootstrap(metric: Metric, a: Records, b: Records, *, n_boot: int = 1000,
                     seed: int = 0, level: float = 0.95) -> dict[str, float]:
    """B against A on the same items in the same order: ``delta`` (B - A), its interval
    (``ci95``) and the two-sided ``p_value`` (module docstring)."""
    if len(a) != len(b):
        raise ValueError(f"paired runs need the same items ({len(a)} vs {len(b)})")
    if not a:
        return {"delta": float("nan"), "ci95": [float("nan")] * 2, "p_value": float("nan")}
    idx = _indices(len(a), n_boot, seed)
    d = _resampled(metric, b, idx) - _resampled(metric, a, idx)
    d = d[~np.isnan(d)]
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(d, [tail, 100 - tail])
    p = min(1.0, 2 * min(float(np.mean(d <= 0)), float(np.mean(d >= 0))))
    return {"delta": float(metric(b) - metric(a)), "ci95": [float(lo), float(hi)],
            "p_value": p}
