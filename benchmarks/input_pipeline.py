"""Input throughput: preparing a folder, and images/s of training batches from each feed.

  python benchmarks/input_pipeline.py [--data DIR] [--per_class 4000] [--batch 256] [--epochs 3]

Without --data it writes random images in the DeepLense layout to a temporary
folder (content does not matter for throughput). Prints the time to scan and
prepare the folder (the safe reader, no TensorFlow), to load the prepared arrays
again, and the median images/s over `--epochs` epochs of training batches: the
device feed (order, normalisation and augmentation computed in a jitted scan over
the split in device memory) and the host feed (rows gathered on the host and
transferred, then normalised and augmented in the same jitted scan).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from mae_jax.data import arrays  # pylint: disable=g-import-not-at-top
from mae_jax.data import feeds  # pylint: disable=g-import-not-at-top
from mae_jax.data import layout  # pylint: disable=g-import-not-at-top
from mae_jax.data import npy_io  # pylint: disable=g-import-not-at-top
from mae_jax.runtime import parallel  # pylint: disable=g-import-not-at-top
from mae_jax.train import batching  # pylint: disable=g-import-not-at-top
from mae_jax.train import steps  # pylint: disable=g-import-not-at-top


def _write_random(root: Path, per_class: int, size: int) -> None:
  rng = np.random.default_rng(0)
  for name in layout.CLASS_NAMES:
    (root / name).mkdir(parents=True, exist_ok=True)
    for i in range(per_class):
      npy_io.write_lens_file(root / name / f"{name}_{i}.npy", rng.random((size, size)),
                             1e-23 if name == "axion" else None)


def _body(state, x, labels, key, shard, batch):
  """No model: a checksum of the batch, so the batch is really made."""
  del labels, key, shard, batch
  return state, {"loss": jax.lax.pmean(jnp.mean(x), parallel.AXIS)}


def epoch_rates(kind: str, split: arrays.Split, batch: int, epochs: int,
                augmentation: batching.Augment | None, steps_per_call: int) -> list[float]:
  """Images/s of each of `epochs` epochs of `kind` feed's training batches (after one
  warm-up epoch that compiles)."""
  mesh = parallel.make_mesh()
  lb = batch // mesh.devices.size
  feed = feeds.make(kind, split.images, split.labels, mesh, seed=0)
  feeding = steps.Feeding(source=kind, local_batch=lb, seed=0, augmentation=augmentation)
  per_epoch = batching.steps_per_epoch(len(split), mesh.devices.size, lb)
  chunks = {}
  rates = []
  for epoch in range(epochs + 1):
    start = time.perf_counter()
    out = None
    for first in range(0, per_epoch, steps_per_call):
      num = min(steps_per_call, per_epoch - first)
      if num not in chunks:
        chunks[num] = steps.make_chunk(_body, mesh, feeding, num)
      _, out = chunks[num](jnp.zeros(()), feed.chunk_data(epoch, first, num, lb),
                           np.int32(epoch), np.int32(first), jax.random.key(0))
    jax.block_until_ready(out)
    if epoch:
      rates.append(per_epoch * batch / (time.perf_counter() - start))
  return rates


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data", default=None, help="a DeepLense folder (default: random images)")
  parser.add_argument("--per_class", type=int, default=4000)
  parser.add_argument("--size", type=int, default=64)
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--epochs", type=int, default=3)
  parser.add_argument("--steps_per_call", type=int, default=10)
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    source = Path(args.data) if args.data else Path(tmp) / "src"
    if not args.data:
      _write_random(source, args.per_class, args.size)
    start = time.perf_counter()
    dataset = arrays.prepare(source, Path(tmp) / "cache", progress=False)
    prepared_s = time.perf_counter() - start
    start = time.perf_counter()
    dataset = arrays.prepare(source, Path(tmp) / "cache", progress=False)
    loaded_s = time.perf_counter() - start
    train = dataset["train"]
    print(f"{len(train)} training images of {dataset.image_shape[0]}x{dataset.image_shape[1]}, "
          f"batch {args.batch}, {jax.device_count()} x {jax.devices()[0].device_kind}")
    print(f"scan and prepare (safe reader):  {prepared_s:8.1f} s "
          f"({sum(len(dataset[s]) for s in ('train', 'validation', 'test')) / prepared_s:,.0f} "
          "files/s)")
    print(f"load the prepared arrays again:  {loaded_s:8.2f} s")
    for kind in ("device", "host"):
      for what, augmentation in (("no augmentation", None),
                                 ("flips + rot90 + shift 4", batching.Augment(max_shift=4))):
        rates = epoch_rates(kind, train, args.batch, args.epochs, augmentation,
                            args.steps_per_call)
        print(f"{kind} feed, {what:<24} {statistics.median(rates):10,.0f} images/s "
              f"(median of {len(rates)} epochs)")


if __name__ == "__main__":
  main()
