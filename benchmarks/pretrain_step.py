"""Images/s of the jitted data-parallel MAE pretraining step (compile time apart).

  python benchmarks/pretrain_step.py [--preset seed] [--batch 256] [--repeats 5] [--steps 3]

Runs on whatever devices JAX sees (the CPU here). Prints the compile time, then
the median (and min/max) images/s over `repeats` timed runs of `steps` steps.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from configs import pretrain as pretrain_config  # pylint: disable=g-import-not-at-top
from mae_jax.models import build  # pylint: disable=g-import-not-at-top
from mae_jax.runtime import parallel  # pylint: disable=g-import-not-at-top
from mae_jax import objectives  # pylint: disable=g-import-not-at-top
from mae_jax.train import optim  # pylint: disable=g-import-not-at-top
from mae_jax.train import steps  # pylint: disable=g-import-not-at-top


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="seed")
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--steps", type=int, default=3)
  args = parser.parse_args()

  config = pretrain_config.get_config(args.preset)
  mae = build.build_mae(config.model)
  params = build.init_mae(mae, jax.random.key(0))
  tx, _ = optim.adamw(params, optim.AdamWSettings.from_config(config.optim), total_steps=1000,
                      steps_per_epoch=100)
  mesh = parallel.make_mesh()
  parallel.check_batch(args.batch)
  state = parallel.replicate(steps.TrainState.create(apply_fn=mae.apply, params=params, tx=tx),
                             mesh)
  step = steps.make_pretrain_step(mae, objectives.from_config(config.loss), mesh)
  size = config.model.image_size
  images = parallel.global_batch(
      {"image": np.random.default_rng(0).random((args.batch, size, size, 1), np.float32)},
      mesh)["image"]
  key = jax.random.key(1)

  start = time.perf_counter()
  compiled = step.lower(state, images, key).compile()
  compile_s = time.perf_counter() - start
  state, metrics = compiled(state, images, key)  # warm-up run
  jax.block_until_ready(metrics)
  rates = []
  for _ in range(args.repeats):
    start = time.perf_counter()
    for _ in range(args.steps):
      state, metrics = compiled(state, images, key)
    jax.block_until_ready(metrics)
    rates.append(args.steps * args.batch / (time.perf_counter() - start))
  print(f"preset {args.preset}: {optim.count_params(params):,} params, batch {args.batch}, "
        f"{jax.device_count()} x {jax.devices()[0].device_kind}")
  print(f"compile: {compile_s:.1f} s")
  print(f"pretrain step: median {statistics.median(rates):.1f} images/s "
        f"(min {min(rates):.1f}, max {max(rates):.1f}, {args.repeats} runs of {args.steps} steps)")


if __name__ == "__main__":
  main()
