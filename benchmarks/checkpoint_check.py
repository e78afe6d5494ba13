"""What the checkpoint manifest costs: writing it after a save, and checking it before a
restore, against the save and restore themselves, on a preset's pretraining state
(params and AdamW state; the seed MAE by default).

  python benchmarks/checkpoint_check.py [--preset seed] [--repeats 5] [--dir /tmp/ckpt_bench]

Prints the checkpoint's size, then the median (and min/max) seconds of: the save (until
finished), `seal` (the manifest: every file's size and CRC-32), `manifest_problem` (the
check every restore runs first) and `restore_latest` (which runs the check, then orbax's
read), over `repeats` rounds.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

from configs import pretrain as pretrain_config  # pylint: disable=g-import-not-at-top,wrong-import-position
from mae_jax.models import build  # pylint: disable=g-import-not-at-top,wrong-import-position
from mae_jax.runtime import checkpoint  # pylint: disable=g-import-not-at-top,wrong-import-position
from mae_jax.runtime import parallel  # pylint: disable=g-import-not-at-top,wrong-import-position
from mae_jax.train import optim  # pylint: disable=g-import-not-at-top,wrong-import-position
from mae_jax.train import steps  # pylint: disable=g-import-not-at-top,wrong-import-position


def _state(preset: str):
  config = pretrain_config.get_config(preset)
  mae = build.build_mae(config.model)
  params = build.init_mae(mae, jax.random.key(0))
  tx, _ = optim.adamw(params, optim.AdamWSettings.from_config(config.optim), 100, 10)
  return parallel.replicate(steps.TrainState.create(apply_fn=mae.apply, params=params, tx=tx),
                            parallel.make_mesh())


def _timed(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def _line(name: str, times: list[float]) -> str:
  return (f"{name:28s} {statistics.median(times):8.3f} s  (min {min(times):.3f}, "
          f"max {max(times):.3f})")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", default="seed")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--dir", default="/tmp/mae_jax_checkpoint_check")
  args = parser.parse_args()
  state = _state(args.preset)
  times = {"save (until finished)": [], "seal (write the manifest)": [],
           "manifest_problem (check)": [], "restore_latest (check + read)": []}
  size = 0
  for r in range(args.repeats):
    root = Path(args.dir) / str(r)
    shutil.rmtree(root, ignore_errors=True)
    mngr = checkpoint.manager(root, 1)

    def save():
      checkpoint.save(mngr, 1, state)
      mngr.wait_until_finished()

    times["save (until finished)"].append(_timed(save))
    times["seal (write the manifest)"].append(_timed(lambda: checkpoint.seal(mngr)))
    step_dir = root / "checkpoints" / "1"
    size = sum(p.stat().st_size for p in step_dir.rglob("*") if p.is_file())
    times["manifest_problem (check)"].append(
        _timed(lambda: checkpoint.manifest_problem(step_dir)))
    times["restore_latest (check + read)"].append(
        _timed(lambda: checkpoint.restore_latest(mngr, state)))
    mngr.close()
    shutil.rmtree(root, ignore_errors=True)
  params = optim.count_params(state.params)
  print(f"{args.preset} pretraining state: {params:,} params, checkpoint {size / 2**20:.1f} MiB "
        f"on {jax.default_backend()}, {args.repeats} rounds")
  for name, values in times.items():
    print(_line(name, values))


if __name__ == "__main__":
  main()
