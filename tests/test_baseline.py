"""The radial-profile logistic-regression baseline, alone and inside a classify run."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn import linear_model
from sklearn import metrics as skm
from sklearn import preprocessing

from mae_jax.data import arrays
from mae_jax.data import layout
from mae_jax.data import source
from mae_jax.eval import baseline
from mae_jax.runtime import workdir as workdir_lib
from mae_jax.stages import classify
from mae_jax.train import batching


def _distance(size: int) -> np.ndarray:
  yy, xx = np.indices((size, size))
  c = (size - 1) / 2
  return np.hypot(yy - c, xx - c)


def _ring_images(n: int, size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Noisy rings whose radius depends a little on the class (labels 0, 1, 2)."""
  rng = np.random.default_rng(seed)
  labels = np.arange(n) % 3
  radius = 8.0 + 0.6 * labels + rng.normal(0, 0.6, n)
  r = _distance(size)
  images = np.exp(-0.5 * ((r[None] - radius[:, None, None]) / 1.5)**2)
  images += rng.normal(0, 0.2, images.shape)
  return images, labels


def test_radial_profile_averages_one_pixel_rings():
  size = 64
  r = _distance(size)
  profile = baseline.radial_profile(r[None])
  assert profile.shape == (1, 45)  # rings 0..44 reach the corners (half-diagonal 44.5)
  rings = np.arange(45)
  assert np.all(profile[0] >= rings) and np.all(profile[0] < rings + 1)
  # The mean of each ring, pixel by pixel.
  ring_of = np.floor(r).astype(int)
  image = np.random.default_rng(0).random((size, size))
  expected = [image[ring_of == k].mean() for k in rings]
  np.testing.assert_allclose(baseline.radial_profile(image[None, ..., None])[0], expected,
                             rtol=1e-12)


def test_radial_profile_is_invariant_under_the_square_symmetries():
  images, _ = _ring_images(4)
  profile = baseline.radial_profile(images)
  assert np.argmax(profile[0]) == 8  # the ring's radius
  for transformed in (np.rot90(images, 1, axes=(1, 2)), images[:, ::-1], images[:, :, ::-1]):
    np.testing.assert_allclose(baseline.radial_profile(transformed), profile, rtol=1e-12)
  np.testing.assert_allclose(baseline.radial_profile(np.full((1, 8, 8), 0.3)), 0.3)
  with pytest.raises(ValueError, match="images"):
    baseline.radial_profile(np.zeros((8, 8)))


def test_metrics_equal_a_direct_scikit_learn_computation():
  train_images, train_labels = _ring_images(300, seed=1)
  val_images, val_labels = _ring_images(90, seed=2)
  train_x, val_x = baseline.radial_profile(train_images), baseline.radial_profile(val_images)
  fitted = baseline.evaluate_baseline((train_x, train_labels), {"val": (val_x, val_labels)})
  m = fitted.scores["val"]

  scaler = preprocessing.StandardScaler().fit(train_x)
  direct = linear_model.LogisticRegression(C=1.0, max_iter=2000).fit(
      scaler.transform(train_x), train_labels)
  probs = direct.predict_proba(scaler.transform(val_x))
  onehot = np.eye(3)[val_labels]
  np.testing.assert_allclose(fitted.probs["val"], probs, rtol=1e-9, atol=1e-12)
  for i, name in enumerate(layout.CLASS_NAMES):
    assert m["auc"][name] == pytest.approx(skm.roc_auc_score(onehot[:, i], probs[:, i]))
  assert m["macro_auc"] == pytest.approx(skm.roc_auc_score(onehot, probs, average="macro"))
  assert m["micro_auc"] == pytest.approx(skm.roc_auc_score(onehot, probs, average="micro"))
  assert m["accuracy"] == pytest.approx(skm.accuracy_score(val_labels, probs.argmax(1)))
  assert m["confusion_matrix"] == skm.confusion_matrix(val_labels, probs.argmax(1)).tolist()
  assert m.num_examples == 90 and fitted.train_examples == 300 and fitted.features == 22
  # The ring radius separates these classes: far above chance, yet not perfect.
  assert 0.7 < m["macro_auc"] < 0.999
  fpr, tpr, _ = skm.roc_curve(onehot[:, 0], probs[:, 0])
  np.testing.assert_allclose(fitted.curves["val"]["no_sub"][0], fpr)
  np.testing.assert_allclose(fitted.curves["val"]["no_sub"][1], tpr)
  assert set(fitted.curves["val"]) == {*layout.CLASS_NAMES, "micro"}
  # Deterministic: the same data give the same numbers.
  again = baseline.evaluate_baseline((train_x, train_labels), {"val": (val_x, val_labels)})
  assert again.scores["val"] == m
  record = fitted.record("val", chosen_on="val")
  assert record.validation_macro_auc == m["macro_auc"] and record.train_examples == 300


def test_a_class_missing_from_training_gets_zero_probability():
  images, labels = _ring_images(60)
  x = baseline.radial_profile(images)
  keep = labels != 2
  probs = baseline.evaluate_baseline((x[keep], labels[keep]), {"all": (x, labels)}).probs["all"]
  assert np.all(probs[:, 2] == 0.0)
  np.testing.assert_allclose(probs.sum(1), 1.0)
  with pytest.raises(ValueError, match="two classes"):
    baseline.evaluate_baseline((x[labels == 0], labels[labels == 0]), {"all": (x, labels)})


def test_profiles_of_raw_images_normalise_them_as_the_model_does():
  rng = np.random.default_rng(4)
  raw = rng.uniform(3.0, 9.0, (5, 16, 16)).astype(np.float32)
  np.testing.assert_allclose(baseline.profiles_of(raw, batch=2),
                             baseline.radial_profile(np.asarray(batching.normalize(raw))),
                             rtol=1e-6)


@pytest.mark.slow
def test_classify_writes_the_baseline_beside_the_model(small_folder, tmp_path):
  """A probe-free fine-tune from scratch on 16x16 images: eval_metrics.json holds the
  baseline, equal to scikit-learn on the same splits, and the model's margin over it."""
  from configs import finetune as finetune_config  # pylint: disable=g-import-not-at-top
  root, _ = small_folder
  config = finetune_config.get_config("tiny")
  config.data.source = "deeplense"
  config.data.dir = str(root)
  config.data.cache_dir = str(tmp_path / "cache")
  config.data.validation_fraction = 0.3
  config.data.test_fraction = 0.3
  config.model.image_size = 16
  config.model.patch = 8
  config.init_from = ""
  config.epochs = 1
  workdir = tmp_path / "run"
  classify.run(config, str(workdir))

  written = json.loads((workdir / workdir_lib.EVAL_FILE).read_text())
  dataset = arrays.prepare(root, tmp_path / "cache",
                           rule=source.DataSettings.from_config(config.data).split, progress=False)
  split = {name: (baseline.profiles_of(dataset[name].images), dataset[name].labels)
           for name in ("train", "test")}
  scaler = preprocessing.StandardScaler().fit(split["train"][0])
  direct = linear_model.LogisticRegression(max_iter=2000).fit(
      scaler.transform(split["train"][0]), split["train"][1])
  probs = direct.predict_proba(scaler.transform(split["test"][0]))
  labels = split["test"][1]
  onehot = np.eye(3)[labels]

  base = written["baseline"]   # fitted on the labelled train images, scored on test
  assert base["num_examples"] == written["num_examples"] == len(labels)
  assert base["num_train"] == len(split["train"][1])
  assert base["macro_auc"] == pytest.approx(skm.roc_auc_score(onehot, probs, average="macro"))
  assert base["micro_auc"] == pytest.approx(skm.roc_auc_score(onehot, probs, average="micro"))
  assert base["accuracy"] == pytest.approx(skm.accuracy_score(labels, probs.argmax(1)))
  lo, hi = base["intervals"]["macro_auc"]
  assert lo <= base["macro_auc"] <= hi
  assert written["margin_over_baseline"]["macro_auc"] == pytest.approx(
      written["macro_auc"] - base["macro_auc"])
  assert (workdir / "plots" / "roc.png").read_bytes()[:4] == b"\x89PNG"
