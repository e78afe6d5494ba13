"""Gradient accumulation over micro-batches (`steps.accumulated_value_and_grad`): the same
pretraining update as the whole batch at once."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest

from configs import pretrain as pretrain_config
from mae_jax.models import build
from mae_jax.runtime import parallel
from mae_jax import objectives
from mae_jax.train import steps


@pytest.mark.parametrize("local_batch, micro, pieces", [
    (8, 0, 1), (8, 8, 1), (8, 100, 1), (8, 4, 2), (8, 3, 4), (8, 1, 8), (6, 4, 2), (7, 3, 7)])
def test_micro_batches_is_the_fewest_equal_pieces_within_the_size(local_batch, micro, pieces):
  assert steps.micro_batches(local_batch, micro) == pieces


def _steps(micro_batch: int, num_steps: int = 2):
  config = pretrain_config.get_config("tiny")
  mae = build.build_mae(config.model)
  params = build.init_mae(mae, jax.random.key(0))
  mesh = parallel.make_mesh(jax.devices()[:1])
  # SGD: Adam's g / sqrt(v) would magnify float-rounding differences of tiny gradients.
  state = parallel.replicate(
      steps.TrainState.create(apply_fn=mae.apply, params=params, tx=optax.sgd(0.5)), mesh)
  step = steps.make_pretrain_step(mae, objectives.from_config(config.loss), mesh,
                                  micro_batch)
  rng = np.random.default_rng(0)
  out = []
  for _ in range(num_steps):
    images = parallel.global_batch({"image": rng.random((8, 64, 64, 1), np.float32)}, mesh)
    state, metrics = step(state, images["image"], jax.random.key(1))
    out.append({k: float(metrics[k]) for k in ("loss", "grad_norm")})
  return out, jax.device_get(state.params)


def test_micro_batched_steps_match_the_whole_batch():
  whole, p_whole = _steps(0)
  for micro in (4, 2):
    pieces, p_pieces = _steps(micro)
    np.testing.assert_allclose([m["loss"] for m in pieces], [m["loss"] for m in whole],
                               rtol=1e-5)
    np.testing.assert_allclose([m["grad_norm"] for m in pieces],
                               [m["grad_norm"] for m in whole], rtol=1e-4)
    diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()), p_whole,
                                         p_pieces))
    assert max(diffs) < 1e-5, max(diffs)
