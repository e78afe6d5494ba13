"""Run by test_feeds.py with 4 forced CPU devices: compares the batches of both feeds."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from mae_jax.data import feeds  # pylint: disable=g-import-not-at-top
from mae_jax.runtime import parallel  # pylint: disable=g-import-not-at-top
from mae_jax.train import batching  # pylint: disable=g-import-not-at-top
from mae_jax.train import steps  # pylint: disable=g-import-not-at-top


def _body(state, x, labels, key, shard, batch):
  """Returns the prepared batch (every device's rows) and its labels as 'metrics'."""
  del key, shard, batch
  gather = lambda v: jax.lax.all_gather(v, parallel.AXIS, tiled=True)  # pylint: disable=unnecessary-lambda-assignment
  return state, {"x": gather(x), "y": gather(labels)}


def batches(kind: str, mesh, images, labels, first: int, num: int, epoch: int):
  lb = 2
  feed = feeds.make(kind, images, labels, mesh, seed=5)
  feeding = steps.Feeding(source=kind, local_batch=lb, seed=5,
                          augmentation=batching.Augment(flip=True, rot90=True, max_shift=2))
  chunk = steps.make_chunk(_body, mesh, feeding, num)
  _, out = chunk(jax.numpy.zeros(()), feed.chunk_data(epoch, first, num, lb), np.int32(epoch),
                 np.int32(first), jax.random.key(0))
  return jax.device_get(out)


def main():
  rng = np.random.default_rng(0)
  images = rng.random((45, 16, 16)).astype(np.float32)
  labels = rng.integers(0, 3, 45).astype(np.int32)
  report = {}
  for n in (1, 4):
    mesh = parallel.make_mesh(jax.devices()[:n])
    spe = batching.steps_per_epoch(45, n, 2)
    ok = True
    for epoch in (0, 3):
      host = batches("host", mesh, images, labels, 0, spe, epoch)
      device = batches("device", mesh, images, labels, 0, spe, epoch)
      late = batches("device", mesh, images, labels, 2, spe - 2, epoch)
      ok &= all(np.array_equal(host[k], device[k]) for k in ("x", "y"))
      ok &= all(np.array_equal(device[k][2:], late[k]) for k in ("x", "y"))
      ok &= device["x"].shape == (spe, 2 * n, 16, 16, 1)
      # Every batch of an epoch holds distinct examples.
      seen = device["y"].size
      ok &= seen == spe * 2 * n
    report[str(n)] = "same" if ok else "different"
  print(json.dumps(report))


if __name__ == "__main__":
  main()
