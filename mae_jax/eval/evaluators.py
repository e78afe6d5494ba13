"""Evaluators: named numbers of (N, K) class probabilities against (N,) labels, chosen
by a config's `evals` (big_vision's habit), each with a bootstrap interval.

Every evaluator yields its numbers for the point estimate and, given the bootstrap's
example weights (one row per resample, drawn once for all evaluators by
`metrics.bootstrap_weights`), the same numbers under every resample at once; the
interval is their percentiles. A metric is one entry in `EVALUATORS`; its config
(`evals`, `select_by`) is checked by `problems`.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from sklearn import metrics as skm

from mae_jax.data import layout
from mae_jax.eval import metrics
from mae_jax.eval import plots
from mae_jax.eval import results

Array = np.ndarray


@dataclasses.dataclass(frozen=True)
class Evaluator:
  """One evaluator.

  `point(probs, labels, class_names)` -> {name: value}; `resampled(probs, labels,
  weights, class_names)` -> {name: (R,) values, or a per-class dict of them, or None where
  undefined}, or no `resampled` for numbers without an interval; `titles`: each scalar it
  yields -> its name in tables; `lower_is_better`: those of its numbers a smaller value of
  which is better (for `select_by`); `figure(probs, labels, folder, title)` draws it into
  `folder` and returns its path.
  """
  point: Callable[..., dict[str, Any]]
  titles: dict[str, str]
  resampled: Callable[..., dict[str, Any]] | None = None
  lower_is_better: tuple[str, ...] = ()
  figure: Callable[..., Path] | None = None


def _onehot(labels: Array, k: int) -> Array:
  return np.eye(k)[np.asarray(labels)]


def _auc_point(probs: Array, labels: Array, class_names: Sequence[str]) -> dict[str, Any]:
  """One-vs-rest AUC per class (None for a class absent from `labels`), their macro mean,
  and the micro AUC over every (example, class) pair."""
  onehot = _onehot(labels, len(class_names))
  auc = {}
  for i, name in enumerate(class_names):
    present = 0 < onehot[:, i].sum() < len(labels)
    auc[name] = float(skm.roc_auc_score(onehot[:, i], probs[:, i])) if present else None
  valid = [v for v in auc.values() if v is not None]
  both = 0 < onehot.sum() < onehot.size
  return {"auc": auc,
          "micro_auc": float(skm.roc_auc_score(onehot.ravel(), probs.ravel())) if both else None,
          "macro_auc": float(np.mean(valid)) if valid else None}


def _auc_resampled(probs: Array, labels: Array, weights: Array,
                   class_names: Sequence[str]) -> dict[str, Any]:
  k = len(class_names)
  present = [c for c in range(k) if np.any(labels == c)]
  both = len(present) > 1
  per_class = {name: metrics.weighted_auc(probs[:, c], labels == c, weights)
               if c in present and both else None for c, name in enumerate(class_names)}
  valid = [v for v in per_class.values() if v is not None]
  onehot = labels[:, None] == np.arange(k)
  micro = (metrics.weighted_auc(probs.ravel(), onehot.ravel(), np.repeat(weights, k, axis=1))
           if both else None)
  return {"macro_auc": np.mean(valid, axis=0) if valid else None, "micro_auc": micro,
          "auc": per_class}


def _accuracy_point(probs: Array, labels: Array, class_names: Sequence[str]) -> dict[str, Any]:
  del class_names
  return {"accuracy": float(skm.accuracy_score(labels, probs.argmax(axis=1)))}


def _accuracy_resampled(probs: Array, labels: Array, weights: Array,
                        class_names: Sequence[str]) -> dict[str, Any]:
  del class_names
  return {"accuracy": weights @ (probs.argmax(1) == labels) / len(labels)}


def _balanced_point(probs: Array, labels: Array, class_names: Sequence[str]) -> dict[str, Any]:
  """The mean over the classes present of each class's recall (scikit-learn's)."""
  del class_names
  with warnings.catch_warnings():   # a predicted class absent from the labels is counted fine
    warnings.filterwarnings("ignore", "y_pred contains classes not in y_true")
    value = skm.balanced_accuracy_score(labels, probs.argmax(axis=1))
  return {"balanced_accuracy": float(value)}


def _balanced_resampled(probs: Array, labels: Array, weights: Array,
                        class_names: Sequence[str]) -> dict[str, Any]:
  correct = probs.argmax(1) == labels
  recalls = [weights @ (correct & (labels == c)) / (weights @ (labels == c))
             for c in range(len(class_names)) if np.any(labels == c)]
  return {"balanced_accuracy": np.mean(recalls, axis=0)}


ECE_BINS = 15   # equal-width confidence bins (Guo et al. 2017)


def _calibration_bins(probs: Array, labels: Array) -> tuple[Array, Array, Array]:
  """(bin of each example's confidence, its confidence, whether it is right)."""
  confidence = probs.max(axis=1)
  bins = np.minimum((confidence * ECE_BINS).astype(int), ECE_BINS - 1)
  return np.eye(ECE_BINS)[bins], confidence, probs.argmax(axis=1) == labels


def _ece_resampled(probs: Array, labels: Array, weights: Array,
                   class_names: Sequence[str]) -> dict[str, Any]:
  """Expected calibration error under each row of example weights: the sum over bins of
  |weighted right answers - weighted confidence| over the examples counted."""
  del class_names
  in_bin, confidence, right = _calibration_bins(probs, labels)
  gap = weights @ (in_bin * right[:, None]) - weights @ (in_bin * confidence[:, None])
  return {"ece": np.abs(gap).sum(axis=1) / weights.sum(axis=1)}


def _ece_point(probs: Array, labels: Array, class_names: Sequence[str]) -> dict[str, Any]:
  """The expected calibration error: how far the top class's probability lies from how
  often it is right, averaged over equal-width confidence bins weighted by their counts."""
  return {"ece": float(_ece_resampled(probs, labels, np.ones((1, len(labels))),
                                      class_names)["ece"][0])}


def _reliability_figure(probs: Array, labels: Array, folder: Path, title: str) -> Path:
  """plots/reliability.png: accuracy against confidence per bin (the diagonal is perfect
  calibration), with each bin's share of the examples."""
  in_bin, confidence, right = _calibration_bins(probs, labels)
  counts = in_bin.sum(0)
  seen = counts > 0
  accuracy = np.where(seen, (in_bin * right[:, None]).sum(0) / np.maximum(counts, 1), np.nan)
  mean_conf = np.where(seen, (in_bin * confidence[:, None]).sum(0) / np.maximum(counts, 1),
                       np.nan)
  edges = np.linspace(0, 1, ECE_BINS + 1)
  ece = _ece_point(probs, labels, ())["ece"]
  fig, (ax, share) = plots.plt.subplots(2, 1, figsize=(5, 5.6), sharex=True,
                                        gridspec_kw={"height_ratios": (3, 1)})
  ax.bar(edges[:-1], np.nan_to_num(accuracy), width=1 / ECE_BINS, align="edge",
         edgecolor="k", label="accuracy in the bin")
  ax.plot(mean_conf, accuracy, "o", color="C1", label="bin at its mean confidence")
  ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
  ax.set(ylabel="accuracy", ylim=(0, 1), title=f"{title}\nECE {ece:.4f}")
  ax.legend(loc="upper left", fontsize=8)
  share.bar(edges[:-1], counts / len(labels), width=1 / ECE_BINS, align="edge", color="0.6")
  share.set(xlabel="confidence (top class probability)", ylabel="share", xlim=(0, 1))
  return plots.save(fig, folder / "reliability.png",
                    {"edges": edges, "accuracy": accuracy, "confidence": mean_conf,
                     "counts": counts, "ece": ece}, title)


def _confusion_point(probs: Array, labels: Array, class_names: Sequence[str]) -> dict[str, Any]:
  return {"confusion_matrix": skm.confusion_matrix(
      labels, probs.argmax(axis=1), labels=list(range(len(class_names)))).tolist()}


EVALUATORS: dict[str, Evaluator] = {
    "auc": Evaluator(_auc_point, {"micro_auc": "micro AUC", "macro_auc": "macro AUC"},
                     _auc_resampled),
    "accuracy": Evaluator(_accuracy_point, {"accuracy": "accuracy"}, _accuracy_resampled),
    "balanced_accuracy": Evaluator(_balanced_point, {"balanced_accuracy": "balanced accuracy"},
                                   _balanced_resampled),
    "ece": Evaluator(_ece_point, {"ece": "ECE"}, _ece_resampled, lower_is_better=("ece",),
                     figure=_reliability_figure),
    "confusion_matrix": Evaluator(_confusion_point, {}),
}


# What a config without `evals` (written before the key existed) was scored with.
DEFAULT_EVALS = ("auc", "accuracy", "confusion_matrix")


def scalars(evals: Sequence[str]) -> dict[str, str]:
  """Every scalar the evaluators `evals` yield -> its title (what `select_by` may name)."""
  return {name: title for e in evals if e in EVALUATORS
          for name, title in EVALUATORS[e].titles.items()}


def lower_is_better(name: str) -> bool:
  return any(name in e.lower_is_better for e in EVALUATORS.values())


def problems(evals: Any, select_by: Any) -> list[str]:
  """Problems of a config's `evals` and `select_by`, one line each."""
  found = [f"evals: unknown evaluator {e!r}; choose among {', '.join(EVALUATORS)}"
           for e in evals if e not in EVALUATORS]
  chosen = scalars(evals)
  if select_by not in chosen:
    found.append(f"select_by={select_by!r} must be a number the evals yield: "
                 f"{', '.join(chosen) or 'none (add auc or accuracy to evals)'}")
  return found


def is_better(select_by: str, value: float | None, best: float | None) -> bool:
  """Whether `value` of metric `select_by` beats `best` (None never does; anything beats None)."""
  if value is None:
    return False
  if best is None:
    return True
  return value < best if lower_is_better(select_by) else value > best


def _interval(values: Array, level: float) -> list[float]:
  tail = (1.0 - level) / 2 * 100
  return [float(x) for x in np.percentile(values, [tail, 100 - tail])]


def evaluate(probs: Array, labels: Array, evals: Sequence[str], *, seed: int | None = None,
             resamples: int = 1000, level: float = 0.95,
             class_names: Sequence[str] = layout.CLASS_NAMES) -> results.Scores:
  """The numbers of `evals` for (N, K) probabilities against (N,) integer labels, with
  percentile bootstrap intervals when `seed` is given (`metrics.bootstrap_weights`: each
  resample holds every class, as many examples of it as the split)."""
  probs = np.asarray(probs, np.float64)
  labels = np.asarray(labels)
  k = len(class_names)
  if probs.ndim != 2 or probs.shape[1] != k or len(labels) != len(probs):
    raise ValueError(f"expected probabilities (N, {k}) and N labels, got {probs.shape} "
                     f"and {labels.shape}")
  chosen = [EVALUATORS[e] for e in evals]
  values = {}
  for e in chosen:
    values.update(e.point(probs, labels, class_names))
  if seed is None:
    return results.Scores(values, int(len(labels)))
  weights = metrics.bootstrap_weights(labels, k, resamples, seed)
  intervals: dict[str, Any] = {}
  for e in chosen:
    for name, v in (e.resampled(probs, labels, weights, class_names) if e.resampled
                    else {}).items():
      if isinstance(v, dict):
        intervals[name] = {c: _interval(x, level) if x is not None else None for c, x in v.items()}
      else:
        intervals[name] = _interval(v, level) if v is not None else None
  intervals.update(resamples=resamples, level=level)
  return results.Scores(values, int(len(labels)), intervals)


def figures(probs: Array, labels: Array, evals: Sequence[str], folder: Path,
            title: str) -> dict[str, Path]:
  """The figure of every evaluator of `evals` that draws one, into `folder`."""
  return {e: EVALUATORS[e].figure(np.asarray(probs), np.asarray(labels), folder, title)
          for e in evals if EVALUATORS[e].figure is not None}
