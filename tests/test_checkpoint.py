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
