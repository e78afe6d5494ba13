"""Data parallelism: 1 device and 4 forced CPU devices agree; batch checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from mae_jax import parallel

HERE = Path(__file__).resolve().parent


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


def test_batch_must_divide_over_devices():
  assert parallel.check_batch(8 * jax.device_count()) == 8 * jax.device_count()
  if jax.device_count() == 1:
    pytest.skip("needs several devices to be indivisible")


def test_global_batch_shape():
  mesh = parallel.make_mesh()
  batch = parallel.global_batch({"image": np.zeros((4, 2, 2, 1), np.float32)}, mesh)
  assert batch["image"].shape == (4, 2, 2, 1)
  assert batch["image"].sharding.spec == parallel.BATCH
