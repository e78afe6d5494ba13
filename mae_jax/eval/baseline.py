"""A non-deep baseline for every evaluation: logistic regression on radial profiles.

In the DeepLense Model II recipe the main lens is identical in every image and
substructure adds 3-4% of its mass, which changes the ring's radial profile. A
classifier can then score well by measuring the total mass, not substructure.
This baseline makes that visible: each image is reduced to its azimuthally
averaged radial profile about the image centre (one value per 1-pixel ring),
and a scikit-learn logistic regression on the standardised profile is fitted
on the model's labelled training images and scored on the same validation and
test splits with the model's own evaluators (`evaluators.evaluate`). A model's margin
over it is what it learned beyond the radial profile.

It reads the same min-max normalised images as the model (`batching.normalize`,
no augmentation), is deterministic (lbfgs on fixed data) and takes seconds: a
profile is one matrix product per batch.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import numpy as np
from sklearn import linear_model
from sklearn import pipeline as sk_pipeline
from sklearn import preprocessing

from mae_jax.data import layout
from mae_jax.eval import evaluators
from mae_jax.eval import metrics
from mae_jax.eval import results
from mae_jax.train import batching

DESCRIPTION = ("scikit-learn logistic regression (lbfgs, C=1, standardised features) on the "
               "azimuthally averaged radial profile about the image centre (1-pixel rings)")
# Inverse L2 strength of the logistic regression (scikit-learn's default).
C = 1.0
MAX_ITER = 2000


@functools.lru_cache(maxsize=8)
def _ring_matrix(height: int, width: int) -> np.ndarray:
  """(H*W, R) averaging matrix: column r holds 1/n_r on the n_r pixels of ring r.

  Ring r holds the pixels whose distance from the image centre ((H-1)/2, (W-1)/2)
  lies in [r, r+1) pixels; R = rings up to the corners, so every pixel counts once.
  """
  yy, xx = np.indices((height, width), dtype=np.float64)
  radius = np.hypot(yy - (height - 1) / 2, xx - (width - 1) / 2)
  ring = np.floor(radius).astype(np.int64).ravel()
  matrix = np.zeros((height * width, int(ring.max()) + 1))
  matrix[np.arange(height * width), ring] = 1.0
  matrix /= matrix.sum(axis=0, keepdims=True)
  matrix.setflags(write=False)
  return matrix


def radial_profile(images: np.ndarray) -> np.ndarray:
  """Azimuthally averaged radial profiles of (N, H, W) or (N, H, W, 1) images.

  Returns:
    (N, R) float64: the mean pixel value of each 1-pixel ring about the image
    centre, R = floor(half-diagonal) + 1 (45 for 64x64).

  Raises:
    ValueError: not a batch of single-channel images.
  """
  images = np.asarray(images, dtype=np.float64)
  if images.ndim == 4 and images.shape[-1] == 1:
    images = images[..., 0]
  if images.ndim != 3:
    raise ValueError(f"expected (N, H, W) or (N, H, W, 1) images, got shape {images.shape}")
  n, h, w = images.shape
  return images.reshape(n, h * w) @ _ring_matrix(h, w)


def fit(features: np.ndarray, labels: np.ndarray) -> sk_pipeline.Pipeline:
  """The baseline classifier (standardise, then logistic regression) fitted on `features`."""
  model = sk_pipeline.make_pipeline(
      preprocessing.StandardScaler(),
      linear_model.LogisticRegression(C=C, max_iter=MAX_ITER))
  return model.fit(np.asarray(features, np.float64), np.asarray(labels))


def predict_proba(model: sk_pipeline.Pipeline, features: np.ndarray,
                  num_classes: int = len(layout.CLASS_NAMES)) -> np.ndarray:
  """(N, num_classes) class probabilities; a class absent from training gets 0."""
  probs = np.zeros((len(features), num_classes))
  probs[:, model.classes_] = model.predict_proba(np.asarray(features, np.float64))
  return probs


def profiles_of(images: np.ndarray, batch: int = 4096) -> np.ndarray:
  """Radial profiles of raw (N, H, W) images, min-max normalised first as the model's are."""
  out = [radial_profile(np.asarray(batching.normalize(images[i:i + batch])))
         for i in range(0, len(images), batch)]
  return np.concatenate(out) if out else np.zeros((0, 1))


@dataclasses.dataclass(frozen=True)
class Fitted:
  """The baseline fitted on labelled images and scored on named splits."""
  scores: dict[str, results.Scores]       # split -> the evaluators' numbers
  curves: dict[str, dict[str, tuple]]     # split -> metrics.roc_curves (plots.roc's baseline=)
  probs: dict[str, np.ndarray]            # split -> (N, K) probabilities
  features: int                           # profile length
  train_examples: int

  def record(self, split: str = "test", chosen_on: str = "validation") -> results.Baseline:
    """The results record of `split`, with the validation macro AUC beside it."""
    return results.Baseline(self.scores[split], DESCRIPTION, self.features, self.train_examples,
                            self.scores[chosen_on].get("macro_auc") if chosen_on in self.scores
                            else None)


def evaluate_baseline(train: tuple[np.ndarray, np.ndarray],
                      scored: dict[str, tuple[np.ndarray, np.ndarray]],
                      evals: Sequence[str] = evaluators.DEFAULT_EVALS,
                      class_names: Sequence[str] = layout.CLASS_NAMES,
                      intervals_seed: int | None = None) -> Fitted:
  """Fits on `train` (profiles, labels) and scores each of `scored` like the model: the
  evaluators `evals`, with bootstrap intervals when `intervals_seed` is given.

  Raises:
    ValueError: fewer than two classes in `train`.
  """
  train_x, train_y = train
  if len(np.unique(train_y)) < 2:
    raise ValueError(f"the baseline needs at least two classes in training, got "
                     f"{sorted(set(np.asarray(train_y).tolist()))}")
  model = fit(train_x, train_y)
  probs = {name: predict_proba(model, x, len(class_names)) for name, (x, _) in scored.items()}
  return Fitted(
      scores={name: evaluators.evaluate(probs[name], y, evals, seed=intervals_seed,
                                        class_names=class_names)
              for name, (_, y) in scored.items()},
      curves={name: metrics.roc_curves(probs[name], y, class_names)
              for name, (_, y) in scored.items()},
      probs=probs, features=int(train_x.shape[1]), train_examples=int(len(train_y)))
