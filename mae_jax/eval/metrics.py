"""Classification metrics with scikit-learn: per-class one-vs-rest ROC/AUC, micro and
macro AUC, accuracy and the confusion matrix."""

from __future__ import annotations

from typing import Sequence

import numpy as np
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
