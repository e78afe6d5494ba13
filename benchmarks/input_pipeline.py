"""Input-pipeline throughput: images/s of training batches (default 256 of 64x64).

  python benchmarks/input_pipeline.py [--data DIR] [--per_class 4000] [--batch 256]

Without --data it writes random images in the DeepLense layout to a temporary
folder (content does not matter for throughput). Prints the tfds preparation
time, the first epoch (reading the tfrecords, filling the in-memory cache) and
the median of the following epochs, with and without augmentation.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # pylint: disable=g-import-not-at-top

from mae_jax.data import builder  # pylint: disable=g-import-not-at-top
from mae_jax.data import layout  # pylint: disable=g-import-not-at-top
from mae_jax.data import npy_io  # pylint: disable=g-import-not-at-top
from mae_jax.data import input_pipeline as pipeline  # pylint: disable=g-import-not-at-top


def _write_random(root: Path, per_class: int, size: int) -> None:
  rng = np.random.default_rng(0)
  for name in layout.CLASS_NAMES:
    (root / name).mkdir(parents=True, exist_ok=True)
    for i in range(per_class):
      npy_io.write_lens_file(root / name / f"{name}_{i}.npy", rng.random((size, size)),
                             1e-23 if name == "axion" else None)


def _epoch_rate(ip: pipeline.InputPipeline, batch: int, epoch: int,
                augment: pipeline.AugmentConfig | None) -> float:
  start = time.perf_counter()
  n = 0
  for b in ip.train_epoch(batch, seed=0, epoch=epoch, augment=augment):
    n += b["image"].shape[0]
  return n / (time.perf_counter() - start)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data", help="a DeepLense folder (default: random images)")
  parser.add_argument("--per_class", type=int, default=4000)
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--epochs", type=int, default=5, help="timed epochs after the first")
  args = parser.parse_args()

  with tempfile.TemporaryDirectory() as tmp:
    source = Path(args.data) if args.data else Path(tmp) / "src"
    if not args.data:
      _write_random(source, args.per_class, 64)
    start = time.perf_counter()
    prepared = builder.prepare(source, Path(tmp) / "cache", progress=False)
    print(f"tfds prepare: {time.perf_counter() - start:.1f} s for "
          f"{prepared.builder.info.splits['train'].num_examples} train + "
          f"{prepared.builder.info.splits['validation'].num_examples} validation images")
    ip = pipeline.InputPipeline(prepared.builder, "train")
    start = time.perf_counter()
    n = ip.num_examples
    print(f"first pass (read + decode + cache): {n / (time.perf_counter() - start):,.0f} images/s")
    for name, aug in (("no augmentation", None),
                      ("flips + rot90 + shift 4", pipeline.AugmentConfig(max_shift=4))):
      rates = [_epoch_rate(ip, args.batch, e, aug) for e in range(args.epochs)]
      print(f"train batches of {args.batch}, {name}: median {statistics.median(rates):,.0f} "
            f"images/s (min {min(rates):,.0f}, max {max(rates):,.0f}, {args.epochs} epochs of "
            f"{ip.steps_per_epoch(args.batch) * args.batch} images, {os.cpu_count()} CPUs)")


if __name__ == "__main__":
  main()
