"""The `data` stage: prepare a dataset and show what it holds.

Writes `<workdir>/data_summary.json` (folder, image size, images per split and
class, bad files, input-pipeline throughput) and `<workdir>/plots/samples.png`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import ml_collections
import numpy as np

from mae_jax.data import builder
from mae_jax.data import input_pipeline
from mae_jax.data import layout
from mae_jax.data import source
from mae_jax.eval import plots
from mae_jax.runtime import fileio
from mae_jax.stages import registry

SUMMARY_FILE = "data_summary.json"


def _class_counts(ip: input_pipeline.InputPipeline, batch_size: int) -> dict[str, int]:
  counts = np.zeros(len(layout.CLASS_NAMES), np.int64)
  for b in ip.eval_batches(batch_size):
    counts += np.bincount(b["label"][b["mask"]], minlength=len(layout.CLASS_NAMES))
  return dict(zip(layout.CLASS_NAMES, counts.tolist()))


def _samples(ip: input_pipeline.InputPipeline, per_class: int) -> dict[str, np.ndarray]:
  found = {name: [] for name in layout.CLASS_NAMES}
  for b in ip.eval_batches(256):
    for image, label, real in zip(b["image"], b["label"], b["mask"]):
      name = layout.CLASS_NAMES[label]
      if real and len(found[name]) < per_class:
        found[name].append(image)
    if all(len(v) >= per_class for v in found.values()):
      break
  return {k: np.stack(v) for k, v in found.items() if v}


@registry.register("data")
def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Prepares `config.data` and writes its summary and sample figure to `workdir`."""
  workdir = Path(workdir)
  prepared = source.load(config.data)
  splits = {name: input_pipeline.InputPipeline(prepared.builder, name)
            for name in ("train", "validation")}
  counts = {name: _class_counts(ip, config.batch_size) for name, ip in splits.items()}

  train = splits["train"]
  batch = min(config.batch_size, train.num_examples)
  start, n = time.perf_counter(), 0
  for b in train.train_epoch(batch, seed=0, epoch=0, augment=source.augment_config(config.data)):
    n += len(b["label"])
  rate = n / (time.perf_counter() - start)

  h, w = prepared.image_shape
  fig = plots.sample_grid(
      _samples(splits["validation"] if splits["validation"].num_examples else train,
               config.samples_per_class),
      workdir / "plots" / "samples.png",
      title=f"{config.data.source} data, {h}x{w}, min-max normalised")
  summary = {
      "source": config.data.source,
      "data_dir": str(Path(config.data.dir).resolve()),
      "tfds_dir": str(prepared.cache_dir),
      "image_shape": [h, w],
      "counts": counts,
      "bad_files": len(prepared.bad_files),
      "bad_files_report": (str(prepared.cache_dir / builder.BAD_FILES_REPORT)
                           if prepared.bad_files else None),
      "train_pipeline_images_per_s": round(rate, 1),
      "train_pipeline_batch": batch,
  }
  workdir.mkdir(parents=True, exist_ok=True)
  fileio.write_json_atomic(workdir / SUMMARY_FILE, summary)
  for name, c in counts.items():
    logging.info("%-10s %s (total %d)", name, c, sum(c.values()))
  logging.info("image size %dx%d; %d bad file(s); augmented train batches: %.0f images/s",
               h, w, len(prepared.bad_files), rate)
  logging.info("wrote %s and %s", workdir / SUMMARY_FILE, fig)
  return summary
