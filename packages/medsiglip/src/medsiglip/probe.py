"""Data-efficient linear probes on frozen embeddings.

A multinomial logistic regression (softmax over ``C`` classes, L2 penalty on the weights)
fitted to ``[N, D]`` embeddings by L-BFGS (optax), evaluated by accuracy and ROC AUC
(binary, or the macro mean of one-vs-rest AUCs for more classes; ties count one half).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x [N]``, ties sharing the mean of their ranks."""
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x)]  # each run of equal values is [start, end)
    mean_rank = (starts + ends + 1) / 2.0
    ranks = np.empty(len(x), np.float64)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of ``scores [N]`` for boolean labels ``positive [N]``
    (the Mann-Whitney U statistic over ``n_pos * n_neg``)."""
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUC needs both positive and negative examples")
    ranks = _average_ranks(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@dataclass(frozen=True)
class LinearProbe:
    """``probs = softmax(x @ weights + bias)``; ``weights [D, C]``, ``classes`` the labels."""

    weights: np.ndarray
    bias: np.ndarray
    classes: tuple[str | int, ...]

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """Embeddings ``[N, D]`` -> class probabilities ``[N, C]``."""
        logits = np.asarray(x, np.float64) @ self.weights + self.bias
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(axis=1, keepdims=True)

    def predict(self, x: np.ndarray) -> list[str | int]:
        return [self.classes[i] for i in self.predict_proba(x).argmax(axis=1)]

    def evaluate(self, x: np.ndarray, labels: Sequence[str | int]) -> dict[str, float]:
        """``{"accuracy", "auc"}`` on embeddings ``[N, D]`` with their true labels."""
        probs = self.predict_proba(x)
        idx = _indices(labels, self.classes)
        acc = float(np.mean(probs.argmax(axis=1) == idx))
        if len(self.classes) == 2:
            auc = roc_auc(probs[:, 1], idx == 1)
        else:
            present = [c for c in range(len(self.classes)) if 0 < np.sum(idx == c) < len(idx)]
            auc = float(np.mean([roc_auc(probs[:, c], idx == c) for c in present]))
        return {"accuracy": acc, "auc": auc}


def _indices(labels: Sequence[str | int], classes: Sequence[str | int]) -> np.ndarray:
    lookup = {c: i for i, c in enumerate(classes)}
    unknown = [y for y in labels if y not in lookup]
    if unknown:
        raise ValueError(f"label {unknown[0]!r} was not seen in training")
    return np.asarray([lookup[y] for y in labels])


def fit_linear_probe(x: np.ndarray, labels: Sequence[str | int], *, l2: float = 1e-3,
                     max_steps: int = 500, tol: float = 1e-6) -> LinearProbe:
    """Fit a softmax-regression head to embeddings ``x [N, D]`` and their ``labels``.

    Minimizes ``mean cross-entropy + l2 * ||W||^2 / 2`` with L-BFGS until the gradient norm
    falls below ``tol`` or ``max_steps`` pass.
    """
    x = np.asarray(x, np.float32)
    if x.ndim != 2 or len(x) != len(labels):
        raise ValueError(f"need embeddings [N, D] and N labels, got {list(x.shape)} and "
                         f"{len(labels)} labels")
    classes = tuple(sorted(set(labels), key=str))
    if len(classes) < 2:
        raise ValueError("a probe needs at least two classes in the training labels")
    y = jnp.asarray(_indices(labels, classes))
    xs = jnp.asarray(x)
    params = (jnp.zeros((x.shape[1], len(classes))), jnp.zeros((len(classes),)))

    def loss_fn(p: tuple[jax.Array, jax.Array]) -> jax.Array:
        w, b = p
        ce = optax.softmax_cross_entropy_with_integer_labels(xs @ w + b, y).mean()
        return ce + 0.5 * l2 * jnp.sum(w * w)

    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(loss_fn)

    def step(carry):  # noqa: ANN001, ANN202
        p, state, i = carry
        value, grad = value_and_grad(p, state=state)
        updates, state = opt.update(grad, state, p, value=value, grad=grad, value_fn=loss_fn)
        return optax.apply_updates(p, updates), state, i + 1

    def running(carry) -> jax.Array:  # noqa: ANN001
        _, state, i = carry
        grad = optax.tree.get(state, "grad")
        return (i == 0) | ((i < max_steps) & (optax.tree.norm(grad) >= tol))

    carry = jax.jit(lambda c: jax.lax.while_loop(running, step, c))(
        (params, opt.init(params), jnp.zeros((), jnp.int32))
    )
    w, b = carry[0]
    return LinearProbe(np.asarray(w, np.float64), np.asarray(b, np.float64), classes)
