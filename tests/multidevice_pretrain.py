"""Run by test_parallel.py in a subprocess with 4 forced CPU devices: the same
pretraining steps on a 1-device mesh and a 4-device mesh; prints the max
differences as JSON."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from configs import pretrain as pretrain_config  # pylint: disable=g-import-not-at-top
import optax  # pylint: disable=g-import-not-at-top
from mae_jax.data import feeds  # pylint: disable=g-import-not-at-top
from mae_jax.models import build  # pylint: disable=g-import-not-at-top
from mae_jax.runtime import parallel  # pylint: disable=g-import-not-at-top
from mae_jax import objectives  # pylint: disable=g-import-not-at-top
from mae_jax.stages import common  # pylint: disable=g-import-not-at-top
from mae_jax.train import steps  # pylint: disable=g-import-not-at-top


def run(devices, num_steps=3):
  config = pretrain_config.get_config("tiny")
  mae = build.build_mae(config.model)
  params = build.init_mae(mae, jax.random.key(0))
  # Plain SGD: Adam's g / sqrt(v) turns float-rounding differences of near-zero
  # gradients into lr-sized updates, which would hide what is compared here.
  tx = optax.sgd(0.5)
  mesh = parallel.make_mesh(devices)
  state = parallel.replicate(steps.TrainState.create(apply_fn=mae.apply, params=params, tx=tx),
                             mesh)
  loss = objectives.from_config(config.loss)
  step = steps.make_pretrain_step(mae, loss, mesh)
  rng = np.random.default_rng(0)
  history = []
  for _ in range(num_steps):
    images = rng.random((8, 64, 64, 1), dtype=np.float32)
    batch = parallel.global_batch({"image": images}, mesh)
    state, metrics = step(state, batch["image"], jax.random.key(1))
    history.append(float(metrics["loss"]))
  # Evaluation of 6 images (padded shards on 4 devices): each image's mask is keyed by
  # its index, so the loss does not depend on the device count.
  images = rng.random((6, 64, 64), dtype=np.float32)
  feed = feeds.DeviceFeed(images, np.zeros(6, np.int32), mesh)
  out = common.Evaluator(steps.pretrain_eval_fn(mae, loss, jax.random.key(2)), mesh, feed,
                         steps.Feeding(source="device", local_batch=2, seed=0))(state.params)
  return history, jax.device_get(state.params), float(out["loss"].sum() / out["count"].sum())


def main():
  assert jax.device_count() == 4, jax.devices()
  l1, p1, e1 = run(jax.devices()[:1])
  l4, p4, e4 = run(jax.devices())
  diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()), p1, p4))
  print(json.dumps({"loss_1": l1, "loss_4": l4, "max_param_diff": max(diffs),
                    "eval_1": e1, "eval_4": e4,
                    "devices": [len(jax.devices()[:1]), jax.device_count()]}))


if __name__ == "__main__":
  main()
