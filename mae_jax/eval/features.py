"""Choosing a frozen encoder's features on validation: which block, which pooling.

Each candidate (a block's tokens, CLS or mean-pooled) is scored by a logistic
regression fitted on the training features and evaluated on validation (macro
AUC); the test split is never involved. The same standardised, deterministic
classifier as the radial-profile baseline.
"""

from __future__ import annotations

import numpy as np

from mae_jax.eval import baseline
from mae_jax.eval import evaluators


def score_candidates(train: dict[str, np.ndarray], train_labels: np.ndarray,
                     validation: dict[str, np.ndarray],
                     validation_labels: np.ndarray) -> dict[str, float]:
  """Validation macro AUC of a logistic regression on each candidate feature."""
  scores = {}
  for name in sorted(train):
    model = baseline.fit(train[name], train_labels)
    probs = baseline.predict_proba(model, validation[name])
    scores[name] = evaluators.evaluate(probs, validation_labels, ("auc",))["macro_auc"]
  return scores


def choose(scores: dict[str, float]) -> str:
  """The candidate with the best validation score (ties: the first by name)."""
  return max(sorted(scores), key=lambda n: (scores[n] if scores[n] is not None else -1.0))
