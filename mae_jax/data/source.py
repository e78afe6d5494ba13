"""From a `data` config to the prepared splits as arrays.

The embedded default: with `data.source='simulated'` the folder is generated (or
completed, if an earlier generation was interrupted) before it is read. Two
readers give the same arrays in the same order: `files`, the project's safe
reader (`arrays.py`, no TensorFlow: what a GPU or TPU host without TensorFlow
uses), and `tfds`, the tfds dataset (`builder.py`, needs TensorFlow), for users
who keep their data as tfds. TensorFlow loads only when `tfds` is chosen.
"""

from __future__ import annotations

import jax
import ml_collections
from jax.experimental import multihost_utils

from mae_jax.data import arrays
from mae_jax.data import simulate
from mae_jax.data import splits
from mae_jax.train import batching

SOURCES = ("deeplense", "simulated")
READERS = ("files", "tfds")


def split_rule(data: ml_collections.ConfigDict) -> splits.SplitRule:
  """The split settings of a `data` config."""
  return splits.SplitRule(validation_fraction=data.validation_fraction,
                          test_fraction=data.test_fraction)


def augmentation(data: ml_collections.ConfigDict) -> batching.Augment:
  """The augmentation settings of a `data` config."""
  return batching.Augment(flip=data.augment.flip, rot90=data.augment.rot90,
                          max_shift=data.augment.max_shift)


def _make(data: ml_collections.ConfigDict, progress: bool) -> arrays.Dataset:
  if data.source == "simulated":
    simulate.generate(data.dir, per_class=data.sim.per_class, seed=data.sim.seed,
                      workers=data.sim.workers or None, noise=data.sim.noise,
                      progress=progress, variant=data.sim.variant,
                      source_spread=data.sim.get("source_spread", 0))
  if data.reader == "tfds":
    from mae_jax.data import builder  # pylint: disable=g-import-not-at-top (TensorFlow only here)
    prepared = builder.prepare(data.dir, data.cache_dir, rule=split_rule(data),
                               on_bad_file=data.on_bad_file, progress=progress)
    return builder.read_dataset(prepared)
  return arrays.prepare(data.dir, data.cache_dir, rule=split_rule(data),
                        on_bad_file=data.on_bad_file, progress=progress)


def load(data: ml_collections.ConfigDict, progress: bool = True) -> arrays.Dataset:
  """Makes sure the data folder exists (simulating it if so configured), prepares it,
  and returns every split as arrays.

  `data` is checked beforehand (`stages/validate.py`: source, reader, variant, ...).

  Raises:
    errors.SimulationMismatchError: the simulated folder was made with other
      settings (e.g. the other `data.sim.variant`).
    errors.LayoutError: a `deeplense` folder without the class folders; the
      message says what is expected and how to simulate a folder.
    errors.BadDataError: bad files while `data.on_bad_file='error'`.
  """
  if jax.process_count() == 1:
    return _make(data, progress)
  # Multi-process: process 0 simulates and prepares; the others then find it done
  # (on a shared filesystem) or make their own copy (on local disks).
  dataset = _make(data, progress) if jax.process_index() == 0 else None
  multihost_utils.sync_global_devices("mae_jax: data prepared")
  return dataset if dataset is not None else _make(data, progress=False)
