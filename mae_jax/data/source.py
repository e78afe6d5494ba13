"""From a `data` config to a prepared tfds dataset and input pipelines.

The embedded default: with `data.source='simulated'` the folder is generated
(or completed, if an earlier generation was interrupted) before it is read.
"""

from __future__ import annotations

import jax
import ml_collections
from jax.experimental import multihost_utils

from mae_jax.data import builder
from mae_jax.data import input_pipeline
from mae_jax.data import simulate

SOURCES = ("deeplense", "simulated")


def load(data: ml_collections.ConfigDict, progress: bool = True) -> builder.PreparedData:
  """Makes sure the data folder exists (simulating it if so configured) and prepares it.

  Raises:
    ValueError: unknown `data.source` or `data.sim.variant`.
    errors.SimulationMismatchError: the simulated folder was made with other
      settings (e.g. the other `data.sim.variant`).
    errors.LayoutError: a `deeplense` folder without the class folders; the
      message says what is expected and how to simulate a folder.
    errors.BadDataError: bad files while `data.on_bad_file='error'`.
  """
  if data.source not in SOURCES:
    raise ValueError(f"data.source must be one of {SOURCES}, got {data.source!r}")

  def make() -> builder.PreparedData:
    if data.source == "simulated":
      simulate.generate(data.dir, per_class=data.sim.per_class, seed=data.sim.seed,
                        workers=data.sim.workers or None, noise=data.sim.noise,
                        progress=progress, variant=data.sim.variant)
    return builder.prepare(data.dir, data.cache_dir,
                           validation_fraction=data.validation_fraction,
                           on_bad_file=data.on_bad_file, progress=progress)

  if jax.process_count() == 1:
    return make()
  # Multi-process: process 0 simulates and prepares; the others then find it done
  # (on a shared filesystem) or make their own copy (on local disks).
  prepared = make() if jax.process_index() == 0 else None
  multihost_utils.sync_global_devices("mae_jax: data prepared")
  return prepared if prepared is not None else make()


def augment_config(data: ml_collections.ConfigDict) -> input_pipeline.AugmentConfig:
  """The augmentation settings of a `data` config."""
  return input_pipeline.AugmentConfig(flip=data.augment.flip, rot90=data.augment.rot90,
                                max_shift=data.augment.max_shift)
