"""Metric primitives: softmax, ROC curves, the vectorised weighted AUC and the stratified
bootstrap's example weights, on which every interval rests. The named metrics a stage
reports are `evaluators`'."""

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


def weighted_auc(scores: np.ndarray, positive: np.ndarray, weights: np.ndarray) -> np.ndarray:
  """ROC AUC of `scores` (n,) against `positive` (n,) under each row of example weights
  (R, n) (a bootstrap resample's counts): the Mann-Whitney statistic, ties counted one
  half, as scikit-learn's `roc_auc_score(sample_weight=...)`. Sorting happens once, so R
  resamples cost O(R n)."""
  _, group = np.unique(scores, return_inverse=True)
  onehot = sparse.csr_matrix((np.ones(len(scores)), (np.arange(len(scores)), group)))
  pos = np.asarray(onehot.T @ (weights * positive).T).T          # (R, groups)
  neg = np.asarray(onehot.T @ (weights * ~positive).T).T
  below = np.cumsum(neg, axis=1) - neg
  return (pos * (below + 0.5 * neg)).sum(1) / (pos.sum(1) * neg.sum(1))


def bootstrap_weights(labels: np.ndarray, num_classes: int, resamples: int,
                      seed: int) -> np.ndarray:
  """(resamples, n) example counts of a stratified bootstrap: each resample draws, within
  each class, as many examples as the class has (with replacement), so every resample
  holds every class."""
  labels = np.asarray(labels)
  rng = np.random.default_rng([seed, 0xb007])
  weights = np.zeros((resamples, len(labels)))
  for c in range(num_classes):
    members = np.flatnonzero(labels == c)
    if len(members):
      weights[:, members] = rng.multinomial(len(members), np.full(len(members), 1 / len(members)),
                                            size=resamples)
  return weights
