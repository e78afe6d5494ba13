"""Data parallelism: 1 device and 4 forced CPU devices agree; batch checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mae_jax.models import load
from mae_jax.runtime import parallel

HERE = Path(__file__).resolve().parent


@pytest.mark.slow
def test_one_and_four_devices_give_the_same_steps():
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
         "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}
  result = subprocess.run([sys.executable, str(HERE / "multidevice_pretrain.py")], env=env,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout.strip().splitlines()[-1])
  np.testing.assert_allclose(out["loss_1"], out["loss_4"], rtol=1e-5)
  assert out["max_param_diff"] < 1e-6, out
  np.testing.assert_allclose(out["eval_1"], out["eval_4"], rtol=1e-5)
  assert out["loss_1"][0] != out["loss_1"][-1]  # the steps did train


def test_batch_must_divide_over_devices(monkeypatch):
  monkeypatch.setattr(parallel.jax, "device_count", lambda: 4)
  monkeypatch.setattr(parallel.jax, "process_count", lambda: 2)
  assert parallel.check_batch(16) == 8  # per-process share
  with pytest.raises(ValueError, match=r"batch_size=10 must be a positive multiple of the "
                                       r"device count \(4\), e.g. 8"):
    parallel.check_batch(10)


def test_global_batch_shape():
  mesh = parallel.make_mesh()
  batch = parallel.global_batch({"image": np.zeros((4, 2, 2, 1), np.float32)}, mesh)
  assert batch["image"].shape == (4, 2, 2, 1)
  assert batch["image"].sharding.spec == parallel.BATCH


@pytest.mark.slow
def test_stage_restores_a_checkpoint_written_on_more_devices(tmp_path):
  """Pretrain on 4 devices, then start a stage from it on 1 (this process)."""
  script = f"""
import sys; sys.path.insert(0, {str(HERE.parent)!r})
import jax, numpy as np
from mae_jax.models import load
from mae_jax.runtime import checkpoint
from mae_jax.models import load
from mae_jax.runtime import parallel
mesh = parallel.make_mesh()
assert jax.device_count() == 4
state = parallel.replicate({{"params": {{"encoder": {{"w": np.arange(6.0).reshape(2, 3)}}}},
                             "step": np.int32(7)}}, mesh)
mngr = checkpoint.manager({str(tmp_path)!r}, 1)
checkpoint.save(mngr, 7, state)
checkpoint.seal(mngr)
"""
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
         "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}
  result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  template = {"encoder": {"w": np.zeros((2, 3))}}
  params, _, step, fresh = load.restore_from_stage(tmp_path, template, {}, dont_load=[])
  assert step == 7 and not fresh
  np.testing.assert_array_equal(params["encoder"]["w"], np.arange(6.0).reshape(2, 3))


class _FakeDevice:
  """What make_mesh reads of a device: its process and id."""

  def __init__(self, process_index: int, id_: int):
    self.process_index, self.id = process_index, id_

  def __repr__(self):
    return f"dev({self.process_index}, {self.id})"


def test_a_shuffled_device_list_builds_the_same_mesh():
  """The mesh orders devices by (process index, id): each process's devices contiguous,
  whatever order the runtime lists them in (large TPU slices list them physically)."""
  devices = [_FakeDevice(p, 4 * p + i) for p in range(2) for i in range(4)]
  rng = np.random.default_rng(0)
  want = [(d.process_index, d.id) for d in devices]
  for _ in range(5):
    shuffled = [devices[i] for i in rng.permutation(len(devices))]
    mesh = parallel.make_mesh(shuffled)
    assert [(d.process_index, d.id) for d in mesh.devices.ravel()] == want
  interleaved = [_FakeDevice(i % 2, i) for i in range(8)]   # ids not grouped by process
  order = [(d.process_index, d.id) for d in parallel.make_mesh(interleaved[::-1]).devices.ravel()]
  assert order == [(0, 0), (0, 2), (0, 4), (0, 6), (1, 1), (1, 3), (1, 5), (1, 7)]
