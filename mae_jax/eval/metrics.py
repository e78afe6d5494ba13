"""Classification metrics with scikit-learn: per-class one-vs-rest ROC/AUC, micro and
macro AUC, accuracy and the confusion matrix."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import sparse
from sklearn import metrics as skm

from mae_jax.data import layout


def softmax(logits: np.ndarray) -> np.ndarray:
  z = logits - logits.max(axis=-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis=-1, keepdims=True)


def classification_metrics(probs: np.ndarray, labels: np.ndarray,
                           class_names: Sequence[str] = layout.CLASS_NAMES) -> dict:
  """Metrics of (N, K) class probabilities against (N,) integer labels.

  Returns:
    {"auc": {class: one-vs-rest AUC}, "micro_auc", "macro_auc", "accuracy",
     "confusion_matrix" (rows: true class, columns: predicted), "num_examples"}.
    A class absent from `labels` has AUC None and is left out of the macro mean.
  """
  probs = np.asarray(probs, np.float64)
  labels = np.asarray(labels)
  k = len(class_names)
  if probs.ndim != 2 or probs.shape[1] != k or len(labels) != len(probs):
    raise ValueError(f"expected probabilities (N, {k}) and N labels, got {probs.shape} "
                     f"and {labels.shape}")
  onehot = np.eye(k)[labels]
  auc = {}
  for i, name in enumerate(class_names):
    present = 0 < onehot[:, i].sum() < len(labels)
    auc[name] = float(skm.roc_auc_score(onehot[:, i], probs[:, i])) if present else None
  valid = [v for v in auc.values() if v is not None]
  both = 0 < onehot.sum() < onehot.size
  return {
      "auc": auc,
      "micro_auc": float(skm.roc_auc_score(onehot.ravel(), probs.ravel())) if both else None,
      "macro_auc": float(np.mean(valid)) if valid else None,
      "accuracy": float(skm.accuracy_score(labels, probs.argmax(axis=1))),
      "confusion_matrix": skm.confusion_matrix(labels, probs.argmax(axis=1),
                                               labels=list(range(k))).tolist(),
      "num_examples": int(len(labels)),
  }


def roc_curves(probs: np.ndarray, labels: np.ndarray,
               class_names: Sequence[str] = layout.CLASS_NAMES) -> dict[str, tuple]:
  """(fpr, tpr, auc) per class present in `labels`, plus 'micro' over all classes."""
  k = len(class_names)
  onehot = np.eye(k)[np.asarray(labels)]
  curves = {}
  for i, name in enumerate(class_names):
    if 0 < onehot[:, i].sum() < len(labels):
      fpr, tpr, _ = skm.roc_curve(onehot[:, i], probs[:, i])
      curves[name] = (fpr, tpr, skm.auc(fpr, tpr))
  fpr, tpr, _ = skm.roc_curve(onehot.ravel(), np.asarray(probs).ravel())
  curves["micro"] = (fpr, tpr, skm.auc(fpr, tpr))
  return curves


def _weighted_auc(scores: np.ndarray, positive: np.ndarray, weights: np.ndarray) -> np.ndarray:
  """ROC AUC of `scores` (n,) against `positive` (n,) under each row of example weights
  (R, n) (a bootstrap resample's counts): the Mann-Whitney statistic, ties counted one
  half, as scikit-learn's. Sorting happens once, so R resamples cost O(R n)."""
  _, group = np.unique(scores, return_inverse=True)
  onehot = sparse.csr_matrix((np.ones(len(scores)), (np.arange(len(scores)), group)))
  pos = np.asarray(onehot.T @ (weights * positive).T).T          # (R, groups)
  neg = np.asarray(onehot.T @ (weights * ~positive).T).T
  below = np.cumsum(neg, axis=1) - neg
  return (pos * (below + 0.5 * neg)).sum(1) / (pos.sum(1) * neg.sum(1))


def bootstrap_intervals(probs: np.ndarray, labels: np.ndarray, *, resamples: int = 1000,
                        level: float = 0.95, seed: int = 0,
                        class_names: Sequence[str] = layout.CLASS_NAMES) -> dict:
  """Percentile bootstrap intervals of the AUCs and accuracy.

  Each resample draws, within each class, as many examples as the class has (with
  replacement), so every resample holds every class. Returns {"macro_auc": [lo, hi],
  "micro_auc": [...], "accuracy": [...], "auc": {class: [lo, hi]}, "resamples",
  "level"}; a metric undefined on the data (a class absent) is None.
  """
  probs = np.asarray(probs, np.float64)
  labels = np.asarray(labels)
  n, k = probs.shape
  rng = np.random.default_rng([seed, 0xb007])
  weights = np.zeros((resamples, n))
  for c in range(k):
    members = np.flatnonzero(labels == c)
    if len(members):
      weights[:, members] = rng.multinomial(len(members), np.full(len(members), 1 / len(members)),
                                            size=resamples)
  tail = (1.0 - level) / 2 * 100
  interval = lambda v: [float(x) for x in np.percentile(v, [tail, 100 - tail])]  # pylint: disable=unnecessary-lambda-assignment
  present = [c for c in range(k) if np.any(labels == c)]
  both = len(present) > 1
  per_class = {name: _weighted_auc(probs[:, c], labels == c, weights)
               if c in present and both else None for c, name in enumerate(class_names)}
  valid = [v for v in per_class.values() if v is not None]
  onehot = labels[:, None] == np.arange(k)
  micro = (_weighted_auc(probs.ravel(), onehot.ravel(), np.repeat(weights, k, axis=1))
           if both else None)
  accuracy = weights @ (probs.argmax(1) == labels) / n
  return {
      "macro_auc": interval(np.mean(valid, axis=0)) if valid else None,
      "micro_auc": interval(micro) if micro is not None else None,
      "accuracy": interval(accuracy),
      "auc": {name: interval(v) if v is not None else None for name, v in per_class.items()},
      "resamples": resamples, "level": level,
  }


def with_intervals(probs: np.ndarray, labels: np.ndarray, seed: int = 0,
                   resamples: int = 1000) -> dict:
  """`classification_metrics` plus their bootstrap 95% intervals under "intervals"."""
  return {**classification_metrics(probs, labels),
          "intervals": bootstrap_intervals(probs, labels, seed=seed, resamples=resamples)}
