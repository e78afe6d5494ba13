"""Checkpoints: progress records travel with the state, half-written saves are never
the latest, and a state holding NaN/inf is never saved."""

from __future__ import annotations

import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from mae_jax.runtime import checkpoint
from mae_jax.runtime import errors
from mae_jax.runtime import faults


def _state(value: float) -> dict:
  return {"params": {"w": jnp.full((3,), value)}, "step": jnp.asarray(1, jnp.int32)}


def test_state_and_progress_round_trip(tmp_path):
  with checkpoint.manager(tmp_path) as mngr:
    checkpoint.save(mngr, 5, _state(2.0), {"epoch": 2, "rng_key": [0, 7]})
    checkpoint.seal(mngr)
    state, step, progress = checkpoint.restore_latest(mngr, _state(0.0))
  assert step == 5 and progress == {"epoch": 2, "rng_key": [0, 7]}
  np.testing.assert_array_equal(state["params"]["w"], [2.0, 2.0, 2.0])


def test_non_finite_state_is_never_saved(tmp_path):
  with checkpoint.manager(tmp_path) as mngr:
    checkpoint.save(mngr, 1, _state(1.0))
    checkpoint.seal(mngr)
    for bad in (np.nan, np.inf):
      with pytest.raises(errors.NonFiniteError, match="latest checkpoint stays step 1"):
        checkpoint.save(mngr, 2, _state(bad))
    assert mngr.all_steps() == [1]
  assert checkpoint.all_finite({"a": jnp.ones(2), "n": jnp.asarray(3)})
  assert not checkpoint.all_finite({"a": jnp.ones(2), "b": jnp.asarray([1.0, np.nan])})


def test_half_written_checkpoint_is_ignored_and_removed(tmp_path):
  with checkpoint.manager(tmp_path) as mngr:
    checkpoint.save(mngr, 3, _state(1.0))
    checkpoint.seal(mngr)
  tmp = tmp_path / "checkpoints" / "4.orbax-checkpoint-tmp"
  (tmp / "state").mkdir(parents=True)
  (tmp / "state" / "partial").write_bytes(b"\0" * 10)
  with checkpoint.manager(tmp_path) as mngr:
    assert mngr.latest_step() == 3
    _, step, progress = checkpoint.restore_latest(mngr, _state(0.0))
  assert step == 3 and progress is None and not tmp.exists()


@pytest.mark.parametrize("lower", [False, True])
def test_the_best_step_is_kept_beside_the_latest_and_restored(tmp_path, lower):
  """One manager: LatestN keeps the last two, BestN the best-ranked step; a damaged best
  is set aside and the next best restored."""
  scores = {1: 0.5, 2: 0.7, 3: None, 4: 0.6, 5: None, 6: None}   # None: not a new best
  if lower:
    scores = {s: None if v is None else 1 - v for s, v in scores.items()}
  with checkpoint.manager(tmp_path, 2, keep_best=True) as mngr:
    for step, score in scores.items():
      new_best = score is not None and step != 4
      metrics = checkpoint.best_metrics("val_x", score, lower) if new_best else {}
      checkpoint.save(mngr, step, _state(float(step)), metrics=metrics)
      checkpoint.seal(mngr)
    assert mngr.all_steps() == [2, 5, 6]          # 1 was overtaken by 2; 3 and 4 by newer ones
    assert checkpoint.ranked_steps(mngr.directory) == [2] and mngr.best_step() == 2
    state, step, _ = checkpoint.restore_best(mngr, _state(0.0))
    assert step == 2 and float(state["params"]["w"][0]) == 2.0
    assert checkpoint.restore_latest(mngr, _state(0.0))[1] == 6
  tree, step = checkpoint.restore_latest_on_one_device(tmp_path / "checkpoints", best=True)
  assert step == 2 and float(tree["params"]["w"][0]) == 2.0


def test_a_damaged_best_gives_way_to_the_next_best(tmp_path):
  """Within the latest three, step 1 was a best before step 2: with 2 damaged, the
  one-device read skips it (left in place) and resume's read sets it aside."""
  with checkpoint.manager(tmp_path, 3, keep_best=True) as mngr:
    for step, score in ((1, 0.5), (2, 0.7), (3, None)):
      metrics = {} if score is None else checkpoint.best_metrics("val_x", score, False)
      checkpoint.save(mngr, step, _state(float(step)), metrics=metrics)
      checkpoint.seal(mngr)
    assert checkpoint.ranked_steps(mngr.directory) == [2, 1]
  (tmp_path / "checkpoints" / "2" / "state" / "_METADATA").unlink()
  with pytest.raises(errors.MissingCheckpointError, match="no checkpoint chosen on validation"):
    checkpoint.restore_latest_on_one_device(tmp_path / "empty", best=True)
  tree, step = checkpoint.restore_latest_on_one_device(tmp_path / "checkpoints", best=True)
  assert step == 1 and float(tree["params"]["w"][0]) == 1.0
  with checkpoint.manager(tmp_path, 3, keep_best=True) as mngr:
    state, step, _ = checkpoint.restore_best(mngr, _state(0.0))
    assert step == 1 and float(state["params"]["w"][0]) == 1.0
    assert mngr.all_steps() == [1, 3]
  assert (tmp_path / "damaged_checkpoints" / "checkpoints_2").is_dir()


def test_a_metrics_file_that_does_not_parse_is_set_aside_before_orbax_opens_the_folder(
    tmp_path, caplog):
  """orbax reads every step's metrics when it opens a folder: a cut metrics file would stop
  resume, test scoring and predict with a JSON traceback."""
  with checkpoint.manager(tmp_path, 3, keep_best=True) as mngr:
    for step, score in ((1, 0.5), (2, 0.7)):
      checkpoint.save(mngr, step, _state(float(step)),
                      metrics=checkpoint.best_metrics("val_x", score, False))
      checkpoint.seal(mngr)
  metrics = tmp_path / "checkpoints" / "2" / "metrics" / "metrics"
  metrics.write_text(metrics.read_text()[:5])
  assert checkpoint.latest_step(tmp_path) == 2
  with caplog.at_level("WARNING"):
    tree, step = checkpoint.restore_latest_on_one_device(tmp_path / "checkpoints", best=True)
  assert step == 1 and float(tree["params"]["w"][0]) == 1.0   # another workdir: left in place
  assert "metrics/metrics does not parse" in caplog.text and metrics.exists()
  with checkpoint.manager(tmp_path, 3, keep_best=True) as mngr:   # its own: set aside
    assert mngr.all_steps() == [1]
    assert checkpoint.restore_best(mngr, _state(0.0))[1] == 1
  assert (tmp_path / "damaged_checkpoints" / "checkpoints_2").is_dir()


def test_a_non_finite_rank_is_never_the_best():
  assert checkpoint._rank({"rank": float("nan")}) == float("-inf")  # pylint: disable=protected-access
  assert checkpoint._rank({"rank": "x"}) == checkpoint._rank({}) == float("-inf")  # pylint: disable=protected-access
  assert checkpoint._rank(checkpoint.best_metrics("val_ece", 0.2, True)) == -0.2  # pylint: disable=protected-access


@pytest.mark.slow
def test_crash_points(tmp_path, monkeypatch):
  monkeypatch.delenv(faults.ENV, raising=False)
  faults.maybe_kill("save", 3)  # unset: nothing happens
  monkeypatch.setenv(faults.ENV, "step:2")
  faults.maybe_kill("step", 3)
  with pytest.raises(ValueError, match="unknown crash point"):
    faults.maybe_kill("epoch", 2)
  code = "from mae_jax.runtime import faults; faults.maybe_kill('step', 1); faults.maybe_kill('step', 2)"
  result = subprocess.run([sys.executable, "-c", code], env={**os.environ, faults.ENV: "step:2"},
                          capture_output=True, timeout=60)
  assert result.returncode == -9
