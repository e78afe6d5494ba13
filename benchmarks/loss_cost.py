"""What a pretraining loss costs: images/s of the real pretrain step under each loss recipe,
the rest of the preset unchanged.

  python benchmarks/loss_cost.py [--preset demo] [--batch 64] [--rounds 5] [--steps 10]

The recipes are the `demo` preset's high-pass loss (MSE on every patch's high-pass part,
normalised per patch) and the recipe before it (BCE on the removed patches' pixels). Both
steps are compiled first, then timed in alternation (`--rounds` rounds of `--steps` steps
each), so a machine whose load changes meanwhile slows both alike. Prints the median
images/s of each and their ratio; the machine's load is printed beside them.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from configs import pretrain as pretrain_config  # pylint: disable=wrong-import-position
from mae_jax.models import build  # pylint: disable=wrong-import-position
from mae_jax.runtime import parallel  # pylint: disable=wrong-import-position
from mae_jax import objectives  # pylint: disable=wrong-import-position
from mae_jax.objectives import reconstruction  # pylint: disable=wrong-import-position
from mae_jax.train import optim  # pylint: disable=wrong-import-position
from mae_jax.train import steps  # pylint: disable=wrong-import-position

# The demo preset's loss as configs/pretrain.py sets it, and the loss's own defaults (the
# seed's BCE on the removed patches, the demo's before).
RECIPES = {
    "demo default (highpass)": pretrain_config.get_config("demo").loss.to_dict(),
    "bce, removed patches": dataclasses.asdict(reconstruction.Reconstruction()),
}


def compiled_step(preset: str, loss: dict, batch: int):
  """The preset's jitted pretrain step under `loss`, compiled, with its state and inputs."""
  config = pretrain_config.get_config(preset)
  config.loss.update(loss)
  mesh = parallel.make_mesh()
  parallel.check_batch(batch)
  rng = np.random.default_rng(0)
  size = config.model.image_size
  images = parallel.global_batch(
      {"image": rng.random((batch, size, size, config.model.channels), np.float32)}, mesh)["image"]
  model = build.build_mae(config.model)
  params = build.init_mae(model, jax.random.key(0))
  tx, _ = optim.adamw(params, optim.AdamWSettings.from_config(config.optim), total_steps=1000,
                      steps_per_epoch=100)
  state = parallel.replicate(steps.TrainState.create(apply_fn=model.apply, params=params, tx=tx),
                             mesh)
  fn = steps.make_pretrain_step(model, objectives.from_config(config.loss), mesh,
                                steps.backend_micro_batch(**config.micro_batch))
  key = jax.random.key(1)
  return fn.lower(state, images, key).compile(), state, images, key


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="demo")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--steps", type=int, default=10, help="steps per timed round")
  args = parser.parse_args()
  runs = {}
  for name, loss in RECIPES.items():
    fn, state, images, key = compiled_step(args.preset, loss, args.batch)
    state, _ = fn(state, images, key)   # one warm-up step
    jax.block_until_ready(state)
    runs[name] = [fn, state, images, key]
  rates = {name: [] for name in RECIPES}
  print(f"preset {args.preset}, batch {args.batch}, {jax.device_count()} x "
        f"{jax.devices()[0].device_kind}, load {os.getloadavg()[0]:.2f}", flush=True)
  for r in range(args.rounds):
    for name, run in runs.items():
      fn, state, images, key = run
      start = time.perf_counter()
      for _ in range(args.steps):
        state, metrics = fn(state, images, key)
      jax.block_until_ready(metrics)
      run[1] = state
      rates[name].append(args.steps * args.batch / (time.perf_counter() - start))
    print(f"round {r + 1}: " + ", ".join(f"{n} {rates[n][-1]:.0f}" for n in RECIPES), flush=True)
  medians = {n: statistics.median(v) for n, v in rates.items()}
  for name, median in medians.items():
    print(f"{name:<30} {median:8.0f} images/s (median of {args.rounds} rounds of {args.steps} "
          f"steps; min {min(rates[name]):.0f}, max {max(rates[name]):.0f})")
  first, second = medians.values()
  print(f"ratio {first / second:.2f} ({' / '.join(RECIPES)}); load at end "
        f"{os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
  main()
