"""Evaluators and their intervals: point numbers equal scikit-learn's, the vectorised
weighted AUC equals `roc_auc_score(sample_weight=...)` on bootstrap resamples with ties,
and the config's `evals` / `select_by` are checked."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn import metrics as skm

from mae_jax.eval import evaluators
from mae_jax.eval import metrics as metrics_lib

ALL = tuple(evaluators.EVALUATORS)


def _probs(n: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 3, n)
  return metrics_lib.softmax(rng.normal(size=(n, 3)) + 2 * np.eye(3)[labels]), labels


def test_point_numbers_equal_scikit_learn():
  probs, labels = _probs()
  m = evaluators.evaluate(probs, labels, ALL)
  onehot = np.eye(3)[labels]
  for i, name in enumerate(("no_sub", "cdm", "axion")):
    assert m["auc"][name] == pytest.approx(skm.roc_auc_score(onehot[:, i], probs[:, i]))
  assert m["micro_auc"] == pytest.approx(skm.roc_auc_score(onehot, probs, average="micro"))
  assert m["macro_auc"] == pytest.approx(skm.roc_auc_score(onehot, probs, average="macro"))
  assert m["accuracy"] == pytest.approx(np.mean(probs.argmax(1) == labels))
  assert m["confusion_matrix"] == skm.confusion_matrix(labels, probs.argmax(1)).tolist()
  assert m.num_examples == 200 and m.intervals is None


def test_weighted_auc_equals_scikit_learn_with_sample_weights_on_resamples_with_ties():
  rng = np.random.default_rng(7)
  n = 150
  scores = rng.integers(0, 12, n) / 11.0            # few distinct values: many ties
  positive = rng.random(n) < 0.4
  weights = rng.multinomial(n, np.full(n, 1 / n), size=25).astype(float)
  weights[0] = 1.0                                  # and the unweighted AUC
  got = metrics_lib.weighted_auc(scores, positive, weights)
  want = [skm.roc_auc_score(positive, scores, sample_weight=w) for w in weights]
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def test_bootstrap_weights_hold_every_class_at_its_size():
  labels = np.array([0] * 5 + [1] * 3 + [2] * 7)
  w = metrics_lib.bootstrap_weights(labels, 3, resamples=40, seed=1)
  for c, size in ((0, 5), (1, 3), (2, 7)):
    np.testing.assert_array_equal(w[:, labels == c].sum(1), size)
  np.testing.assert_array_equal(w, metrics_lib.bootstrap_weights(labels, 3, 40, seed=1))
  assert not np.array_equal(w, metrics_lib.bootstrap_weights(labels, 3, 40, seed=2))


def test_intervals_surround_the_point_numbers_and_follow_the_seed():
  probs, labels = _probs(300, seed=3)
  m = evaluators.evaluate(probs, labels, ALL, seed=0, resamples=300)
  for name in evaluators.scalars(ALL):
    lo, hi = m.interval(name)
    assert lo <= m[name] <= hi, name
  for cls, (lo, hi) in m.interval("auc").items():
    assert lo <= m["auc"][cls] <= hi
  assert m.intervals["resamples"] == 300 and m.intervals["level"] == 0.95
  assert "confusion_matrix" not in m.intervals
  again = evaluators.evaluate(probs, labels, ALL, seed=0, resamples=300)
  assert again.intervals == m.intervals


def test_a_class_absent_from_the_labels_has_no_auc():
  probs, labels = _probs()
  keep = labels != 2
  m = evaluators.evaluate(probs[keep], labels[keep], ALL, seed=0, resamples=50)
  assert m["auc"]["axion"] is None and m.interval("auc")["axion"] is None
  assert m["macro_auc"] == pytest.approx(np.mean([m["auc"]["no_sub"], m["auc"]["cdm"]]))


def test_config_problems_and_the_direction_of_select_by():
  assert evaluators.problems(("auc", "accuracy"), "macro_auc") == []
  found = evaluators.problems(("auc", "f1"), "accuracy")
  assert found[0].startswith("evals: unknown evaluator 'f1'; choose among auc")
  assert found[1].startswith("select_by='accuracy' must be a number the evals yield: "
                             "micro_auc, macro_auc")
  assert evaluators.is_better("macro_auc", 0.8, 0.7) and not evaluators.is_better(
      "macro_auc", 0.7, 0.8)
  assert evaluators.is_better("macro_auc", 0.1, None) and not evaluators.is_better(
      "macro_auc", None, 0.1)


def test_balanced_accuracy_equals_scikit_learn_and_weighs_each_class_alike():
  probs, labels = _probs(240, seed=5)
  m = evaluators.evaluate(probs, labels, ("balanced_accuracy",), seed=0, resamples=200)
  assert m["balanced_accuracy"] == pytest.approx(
      skm.balanced_accuracy_score(labels, probs.argmax(1)))
  lo, hi = m.interval("balanced_accuracy")
  assert lo <= m["balanced_accuracy"] <= hi
  # Resampled by hand: the weighted recalls of one resample.
  weights = metrics_lib.bootstrap_weights(labels, 3, 3, seed=4)
  got = evaluators.EVALUATORS["balanced_accuracy"].resampled(
      probs, labels, weights, ("a", "b", "c"))["balanced_accuracy"]
  pred = probs.argmax(1)
  for w, value in zip(weights, got):
    rows = np.repeat(np.arange(len(labels)), w.astype(int))
    assert value == pytest.approx(skm.balanced_accuracy_score(labels[rows], pred[rows]))
  # A predictor that always says the majority class: accuracy high, balanced accuracy 1/3.
  skewed = np.array([0] * 80 + [1] * 10 + [2] * 10)
  always = np.tile([1.0, 0.0, 0.0], (100, 1))
  m = evaluators.evaluate(always, skewed, ("accuracy", "balanced_accuracy"))
  assert m["accuracy"] == 0.8 and m["balanced_accuracy"] == pytest.approx(1 / 3)


def _ece_by_hand(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
  conf, pred = probs.max(1), probs.argmax(1)
  total = 0.0
  for b in range(bins):
    lo, hi = b / bins, (b + 1) / bins
    members = (conf >= lo) & ((conf < hi) if b < bins - 1 else (conf <= hi))
    if members.any():
      total += members.mean() * abs((pred[members] == labels[members]).mean()
                                    - conf[members].mean())
  return total


def test_ece_equals_the_binned_definition_and_lower_is_better(tmp_path):
  probs, labels = _probs(300, seed=8)
  m = evaluators.evaluate(probs, labels, ("ece",), seed=0, resamples=200)
  assert m["ece"] == pytest.approx(_ece_by_hand(probs, labels), abs=1e-12)
  lo, hi = m.interval("ece")
  assert lo <= m["ece"] <= hi
  # Confident and always right: calibrated only where the confidence is 1.
  perfect = np.eye(3)[labels]
  assert evaluators.evaluate(perfect, labels, ("ece",))["ece"] == pytest.approx(0.0)
  # Always 0.9 sure, right half the time: ECE 0.4.
  half = np.tile([0.9, 0.05, 0.05], (100, 1))
  half_labels = np.array([0, 1] * 50)
  assert evaluators.evaluate(half, half_labels, ("ece",))["ece"] == pytest.approx(0.4)
  assert evaluators.lower_is_better("ece") and evaluators.is_better("ece", 0.02, 0.05)
  assert evaluators.problems(("auc", "ece"), "ece") == []
  png = evaluators.figures(probs, labels, ("auc", "ece"), tmp_path, "test")["ece"]
  assert png == tmp_path / "reliability.png" and png.read_bytes()[:4] == b"\x89PNG"
  drawn = json.loads(png.with_suffix(".json").read_text())["data"]
  assert sum(drawn["counts"]) == 300 and drawn["ece"] == pytest.approx(m["ece"], abs=1e-4)
