"""The `data` stage: prepare a dataset and show what it holds.

Simulates the folder if so configured, prepares its splits (`data.reader`: the
project's safe reader, or tfds), and writes `<workdir>/data_summary.json` (folder,
image size, images per split and class, bad files, the feed's throughput) and
`<workdir>/plots/samples.png`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mae_jax.data import feeds
from mae_jax.data import layout
from mae_jax.data import source
from mae_jax.data import splits
from mae_jax.eval import plots
from mae_jax.runtime import fileio
from mae_jax.runtime import parallel
from mae_jax.runtime import workdir as workdir_lib
from mae_jax.stages import registry
from mae_jax.train import batching
from mae_jax.train import steps



def _samples(split, per_class: int) -> dict[str, np.ndarray]:
  out = {}
  for label, name in enumerate(layout.CLASS_NAMES):
    rows = np.flatnonzero(split.labels == label)[:per_class]
    if len(rows):
      out[name] = np.asarray(batching.normalize(split.images[rows]))
  return out


def feed_rate(images: np.ndarray, batch: int, augmentation: batching.Augment,
              num_steps: int = 20) -> float:
  """Images/s of the device feed making augmented training batches (no model)."""
  mesh = parallel.make_mesh()
  lb = max(batch // mesh.devices.size, 1)
  feed = feeds.DeviceFeed(images, np.zeros(len(images), np.int32), mesh)
  if min(feed.layout.counts) < lb:
    return float("nan")
  num_steps = min(num_steps, batching.steps_per_epoch(len(images), mesh.devices.size, lb))

  def body(state, x, labels, key, shard, b):
    del labels, key, shard, b
    return state, {"loss": jax.lax.pmean(jnp.mean(x), parallel.AXIS)}

  feeding = steps.Feeding(source="device", local_batch=lb, seed=0, augmentation=augmentation)
  chunk = steps.make_chunk(body, mesh, feeding, num_steps)
  run = lambda e: chunk(jnp.zeros(()), feed.data, np.int32(e), np.int32(0), jax.random.key(0))  # pylint: disable=unnecessary-lambda-assignment
  jax.block_until_ready(run(0))   # compile
  start = time.perf_counter()
  jax.block_until_ready(run(1))
  return num_steps * lb * mesh.devices.size / (time.perf_counter() - start)


@registry.register("data")
def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Prepares `config.data` and writes its summary and sample figure to `workdir`."""
  workdir = Path(workdir)
  data = source.DataSettings.from_config(config.data)
  dataset = source.load(data)
  counts = {name: dataset[name].class_counts() for name in splits.SPLITS}
  train = dataset["train"]
  rate = feed_rate(train.images, min(config.batch_size, len(train)), data.augment)
  h, w = dataset.image_shape
  shown = dataset["validation"] if len(dataset["validation"]) else train
  fig = plots.sample_grid(_samples(shown, config.samples_per_class),
                          workdir / workdir_lib.PLOTS / "samples.png",
                          title=f"{data.source} data, {h}x{w}, min-max normalised")
  summary = {
      "source": data.source,
      "data_dir": str(Path(data.dir).resolve()),
      "reader": data.reader,
      "cache_dir": str(dataset.cache_dir),
      "image_shape": [h, w],
      "counts": counts,
      "bad_files": len(dataset.bad_files),
      "bad_files_report": (str(dataset.cache_dir / splits.BAD_FILES_REPORT)
                           if dataset.bad_files else None),
      "device_feed_augmented_images_per_s": round(rate, 1),
      "feed_batch": config.batch_size,
  }
  workdir.mkdir(parents=True, exist_ok=True)
  fileio.write_json_atomic(workdir / workdir_lib.DATA_SUMMARY, summary)
  for name, c in counts.items():
    logging.info("%-10s %s (total %d)", name, c, sum(c.values()))
  logging.info("image size %dx%d; %d bad file(s); device feed, augmented: %.0f images/s",
               h, w, len(dataset.bad_files), rate)
  logging.info("wrote %s and %s", workdir / workdir_lib.DATA_SUMMARY, fig)
  return summary
