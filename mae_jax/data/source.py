"""From a stage's data settings (`DataSettings`, made once from its `data` config) to
the prepared splits as arrays.

The embedded default: with `data.source='simulated'` the folder is generated (or
completed, if an earlier generation was interrupted) before it is read. Two
readers give the same arrays in the same order: `files`, the project's safe
reader (`arrays.py`, no TensorFlow: what a GPU or TPU host without TensorFlow
uses), and `tfds`, the tfds dataset (`builder.py`, needs TensorFlow), for users
who keep their data as tfds. TensorFlow loads only when `tfds` is chosen.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
from jax.experimental import multihost_utils

from mae_jax.data import arrays
from mae_jax.data import feeds
from mae_jax.data import layout
from mae_jax.data import simulate
from mae_jax.data import splits
from mae_jax.train import batching

SOURCES = ("deeplense", "simulated")
READERS = ("files", "tfds")


@dataclasses.dataclass(frozen=True)
class SimSettings:
  """How a simulated folder is made: a data config's `sim`."""
  per_class: int       # images per class
  seed: int
  noise: bool
  workers: int         # parallel workers; 0: one per CPU core
  variant: str         # one of simulate.VARIANTS
  source_spread: int   # the substructure variant's source dial, 0..SOURCE_SPREAD_MAX

  @classmethod
  def from_config(cls, sim: Any) -> "SimSettings":
    """From a data config's `sim` (anything with the keys above)."""
    return cls(per_class=int(sim.per_class), seed=int(sim.seed), noise=bool(sim.noise),
               workers=int(sim.workers), variant=str(sim.variant),
               source_spread=int(sim.source_spread))


@dataclasses.dataclass(frozen=True)
class DataSettings:
  """A stage's `data` config (defaults in `configs/common.py`, `data_config`): where the
  images come from, how they are split, read, fed and augmented."""
  source: str                  # one of SOURCES
  dir: str                     # the DeepLense-layout folder (simulated first if 'simulated')
  cache_dir: str               # the prepared splits
  reader: str                  # one of READERS
  on_bad_file: str             # 'error' or 'skip'
  split: splits.SplitRule      # validation and test fractions
  sim: SimSettings
  augment: batching.Augment
  feed: str                    # 'auto', 'device' or 'host' (`feeds.choose`)
  device_memory_share: float   # the device feed's share of a device's memory ('auto')

  @classmethod
  def from_config(cls, data: Any) -> "DataSettings":
    """From a config's `data` (anything with the keys above), checked beforehand by
    `stages/validate.py`."""
    return cls(source=str(data.source), dir=str(data.dir), cache_dir=str(data.cache_dir),
               reader=str(data.reader), on_bad_file=str(data.on_bad_file),
               split=splits.SplitRule(validation_fraction=data.validation_fraction,
                                      test_fraction=data.test_fraction),
               sim=SimSettings.from_config(data.sim),
               augment=batching.Augment(flip=bool(data.augment.flip),
                                        rot90=bool(data.augment.rot90),
                                        max_shift=int(data.augment.max_shift)),
               feed=str(data.feed), device_memory_share=float(data.device_memory_share))


def _make(data: DataSettings, progress: bool) -> arrays.Dataset:
  if data.source == "simulated":
    sim = data.sim
    simulate.generate(data.dir, per_class=sim.per_class, seed=sim.seed,
                      workers=sim.workers or None, noise=sim.noise, progress=progress,
                      variant=sim.variant, source_spread=sim.source_spread)
  if data.reader == "tfds":
    from mae_jax.data import builder  # pylint: disable=g-import-not-at-top (TensorFlow only here)
    prepared = builder.prepare(data.dir, data.cache_dir, rule=data.split,
                               on_bad_file=data.on_bad_file, progress=progress)
    return builder.read_dataset(prepared)
  return arrays.prepare(data.dir, data.cache_dir, rule=data.split,
                        on_bad_file=data.on_bad_file, progress=progress)


def load(data: DataSettings, progress: bool = True) -> arrays.Dataset:
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


def problems(data: Any) -> list[str]:
  """Problems of a config's `data` keys (and of a DeepLense folder's layout), one line each."""
  found = []
  if data.get("source") not in SOURCES:
    found.append(f"data.source={data.get('source')!r} must be one of {', '.join(SOURCES)}")
  if "validation_fraction" in data:
    try:
      splits.SplitRule(data.validation_fraction, data.get("test_fraction", 0.0))
    except ValueError as e:
      found.append(f"data.{e}")
  if data.get("reader", "files") not in READERS:
    found.append(f"data.reader={data.reader!r} must be one of {', '.join(READERS)}")
  if data.get("feed", "auto") not in feeds.FEEDS:
    found.append(f"data.feed={data.feed!r} must be one of {', '.join(feeds.FEEDS)}")
  share = data.get("device_memory_share", 0.5)
  if not 0.0 < share <= 1.0:
    found.append(f"data.device_memory_share={share} must lie in (0, 1]")
  variant = data.get("sim", {}).get("variant")
  if variant is not None and variant not in simulate.VARIANTS:
    found.append(f"data.sim.variant={variant!r} must be one of {', '.join(simulate.VARIANTS)}")
  spread = data.get("sim", {}).get("source_spread", 0)
  if isinstance(spread, bool) or not isinstance(spread, int) \
      or not 0 <= spread <= simulate.SOURCE_SPREAD_MAX:
    found.append(f"data.sim.source_spread={spread!r} must be an integer in "
                 f"[0, {simulate.SOURCE_SPREAD_MAX}]")
  elif spread and variant != "substructure":
    found.append(f"data.sim.source_spread={spread} applies to the substructure variant "
                 f"only (data.sim.variant={variant!r})")
  if data.get("on_bad_file") not in (None, "error", "skip"):
    found.append(f"data.on_bad_file={data.on_bad_file!r} must be 'error' or 'skip'")
  if data.get("source") == "deeplense":
    root = Path(data.dir)
    missing = [c for c in layout.CLASS_NAMES if not (root / c).is_dir()]
    if missing:
      what = "does not exist" if not root.is_dir() else f"lacks the class folder(s) {', '.join(missing)}"
      found.append(f"data folder {root} {what}.\n" + layout.expected_layout_message(root))
  return found
