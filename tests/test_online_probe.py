"""The online probe: a few-shot score of the frozen features during pretraining."""

from __future__ import annotations

import json

import ml_collections
import numpy as np
import pytest

from configs import pretrain as pretrain_config
from mae_jax.data import arrays
from mae_jax.eval import online_probe
from mae_jax.runtime import errors
from mae_jax.stages import pretrain as pretrain_stage
from tests.conftest import write_folder


def _split(counts: tuple[int, ...], name: str = "train", dim: int = 6) -> arrays.Split:
  labels = np.concatenate([np.full(n, c, np.int32) for c, n in enumerate(counts)])
  images = np.random.default_rng(0).random((len(labels), dim, dim), np.float32)
  return arrays.Split(name, images, labels, np.array([f"k{i}" for i in range(len(labels))]))


def test_problems_name_each_bad_key():
  config = ml_collections.ConfigDict(dict(probe_every_epochs=-1, probe_shots=1,
                                          probe_validation=True))
  found = online_probe.problems(config)
  assert len(found) == 3 and found[0].startswith("probe_every_epochs=-1")
  assert online_probe.problems(pretrain_config.get_config("demo")) == []
  assert online_probe.problems(ml_collections.ConfigDict(dict(epochs=3))) == []


def test_due_every_n_epochs_and_after_the_last():
  settings = online_probe.Settings(every_epochs=5, shots=2, validation=2)
  assert [e + 1 for e in range(12) if settings.due(e, 12)] == [5, 10, 12]
  off = online_probe.Settings(every_epochs=0, shots=2, validation=2)
  assert not off.enabled and not any(off.due(e, 12) for e in range(12))


def test_labelled_sets_are_balanced_seeded_and_capped_by_the_split():
  settings = online_probe.Settings(every_epochs=1, shots=3, validation=5)
  train, val = _split((10, 10, 10)), _split((8, 4, 9), "validation")
  shots, scored = online_probe.labelled_sets(train, val, settings, seed=0)
  assert np.bincount(shots.labels).tolist() == [3, 3, 3]
  assert np.bincount(scored.labels).tolist() == [5, 4, 5]   # cdm has only 4
  again, _ = online_probe.labelled_sets(train, val, settings, seed=0)
  other, _ = online_probe.labelled_sets(train, val, settings, seed=1)
  assert again.keys.tolist() == shots.keys.tolist() != other.keys.tolist()


def test_a_class_missing_from_the_labelled_images_is_named():
  settings = online_probe.Settings(every_epochs=1, shots=3, validation=5)
  with pytest.raises(errors.InsufficientDataError, match="holds 1 cdm image"):
    online_probe.labelled_sets(_split((10, 1, 10)), _split((5, 5, 5), "validation"), settings, 0)


def test_score_is_the_best_candidates_validation_auc():
  rng = np.random.default_rng(0)
  labels = np.tile(np.arange(3), 40)
  separable = np.eye(3)[labels] * 3 + 0.1 * rng.standard_normal((len(labels), 3))
  noise = rng.standard_normal((len(labels), 3))
  out = online_probe.score({"block0_cls": noise, "block1_mean": separable}, labels, num_shots=30)
  assert out[online_probe.FEATURE] == "block1_mean" and out[online_probe.SCORE] == 1.0
  chance = online_probe.score({"block0_cls": noise}, labels, num_shots=30)[online_probe.SCORE]
  assert 0.3 < chance < 0.7


def _tiny(tmp_path, **overrides) -> ml_collections.ConfigDict:
  write_folder(tmp_path / "src", per_class=16, size=64)
  config = pretrain_config.get_config("tiny")
  config.data.dir, config.data.source = str(tmp_path / "src"), "deeplense"
  config.data.cache_dir = str(tmp_path / "cache")
  config.tensorboard = "none"
  config.phase_epochs = (2, 1)
  config.phase_augment = (False, False)
  config.update(overrides)
  return config


def test_pretraining_records_the_probe_when_due_and_trains_as_without_it(tmp_path):
  config = _tiny(tmp_path, probe_every_epochs=2)
  summary = pretrain_stage.run(config, str(tmp_path / "run"))
  history = json.loads((tmp_path / "run" / "history.json").read_text())
  scored = [h["epoch"] for h in history if online_probe.SCORE in h]
  assert scored == [2, 3]                        # every 2 epochs and after the last
  assert all(0.0 <= h[online_probe.SCORE] <= 1.0 and h[online_probe.FEATURE].startswith("block")
             for h in history if online_probe.SCORE in h)
  assert summary["final_probe_auc"] == history[-1][online_probe.SCORE]
  figure = json.loads((tmp_path / "run" / "plots" / "online_probe.json").read_text())
  assert [h["epoch"] for h in figure["data"]["history"] if h["probe_auc"] is not None] == [2, 3]

  config.probe_every_epochs = 0
  off = pretrain_stage.run(config, str(tmp_path / "off"))
  without = json.loads((tmp_path / "off" / "history.json").read_text())
  assert not any(online_probe.SCORE in h for h in without) and off["final_probe_auc"] is None
  assert not (tmp_path / "off" / "plots" / "online_probe.png").exists()
  losses = lambda h: [(r["train_loss"], r.get("val_loss")) for r in h]  # pylint: disable=unnecessary-lambda-assignment
  assert losses(without) == losses(history)      # watching changes nothing it watches


def test_pretraining_goes_on_without_the_probe_where_a_class_has_no_labelled_images(
    tmp_path, caplog):
  config = _tiny(tmp_path)
  for extra in sorted((tmp_path / "src" / "cdm").iterdir())[1:]:   # one cdm image is left
    extra.unlink()
  with caplog.at_level("WARNING"):
    summary = pretrain_stage.run(config, str(tmp_path / "run"))
  assert summary["final_probe_auc"] is None
  assert any("online probe off" in r.getMessage() and "cdm image" in r.getMessage()
             for r in caplog.records)
