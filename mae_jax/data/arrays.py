"""A DeepLense folder as in-memory numpy arrays, one per split, read without TensorFlow.

`prepare` scans the folder once with the project's safe reader (`splits.checked_scan`:
the same checks and the same hash split as the tfds builder), then stores each
split as plain `.npy` arrays beside the tfds dataset, in the cache folder named by
the folder's fingerprint. Later runs map those files in a fraction of a second, so
a GPU or TPU host without TensorFlow reads the data as fast as its disk allows.

A split's examples are in canonical order: by class (`no_sub`, `cdm`, `axion`),
then by file name. Images keep the values stored in the files (float32);
normalisation happens in the training step.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from mae_jax.data import layout
from mae_jax.data import splits
from mae_jax.runtime import fileio

ARRAYS_FOLDER = "arrays"
_META = "meta.json"


@dataclasses.dataclass(frozen=True)
class Split:
  """One split's examples in canonical order."""
  name: str
  images: np.ndarray        # (N, H, W) float32, as stored in the files
  labels: np.ndarray        # (N,) int32 indices into layout.CLASS_NAMES
  keys: np.ndarray          # (N,) str: `<class>/<file name>`

  def __len__(self) -> int:
    return len(self.labels)

  def take(self, indices: np.ndarray | Sequence[int]) -> "Split":
    """The examples at `indices`, in that order."""
    indices = np.asarray(indices, np.int64)
    return Split(self.name, self.images[indices], self.labels[indices], self.keys[indices])

  def of_classes(self, classes: Sequence[str]) -> "Split":
    """The examples of `classes` only (canonical order kept)."""
    wanted = [layout.CLASS_NAMES.index(c) for c in classes]
    return self.take(np.flatnonzero(np.isin(self.labels, wanted)))

  def class_counts(self) -> dict[str, int]:
    counts = np.bincount(self.labels, minlength=len(layout.CLASS_NAMES))
    return dict(zip(layout.CLASS_NAMES, counts.tolist()))


@dataclasses.dataclass(frozen=True)
class Dataset:
  """Every split of a prepared folder, and what its scan found."""
  splits: dict[str, Split]
  image_shape: tuple[int, int]
  bad_files: list[tuple[str, str]]
  cache_dir: Path

  def __getitem__(self, name: str) -> Split:
    return self.splits[name]


def canonical_order(labels: np.ndarray, keys: np.ndarray) -> np.ndarray:
  """Indices that sort examples by class, then file name (the order of every split)."""
  names = np.array([k.split("/", 1)[1] for k in keys.tolist()], dtype=object)
  return np.lexsort((names, labels))


def _save(folder: Path, split: Split) -> None:
  for suffix, array in (("images", split.images), ("labels", split.labels)):
    fileio.write_atomic(folder / f"{split.name}_{suffix}.npy",
                        lambda f, a=array: np.save(f, a, allow_pickle=False))
  fileio.write_json_atomic(folder / f"{split.name}_keys.json", split.keys.tolist())


def _load(folder: Path, name: str) -> Split:
  images = np.load(folder / f"{name}_images.npy", mmap_mode="r", allow_pickle=False)
  labels = np.load(folder / f"{name}_labels.npy", allow_pickle=False)
  keys = np.array(json.loads((folder / f"{name}_keys.json").read_text()), dtype=str)
  return Split(name, images, labels, keys)


def prepare(source_dir: str | os.PathLike[str], cache_root: str | os.PathLike[str],
            rule: splits.SplitRule = splits.SplitRule(), on_bad_file: str = "error",
            progress: bool = True) -> Dataset:
  """The folder's splits as arrays, scanned and stored once per folder state.

  Raises:
    errors.LayoutError: the folder does not follow the layout.
    errors.BadDataError: bad files were found and `on_bad_file` is 'error'.
  """
  fp = splits.fingerprint(source_dir, rule, on_bad_file)
  cache_dir = Path(cache_root).expanduser() / fp
  folder = cache_dir / ARRAYS_FOLDER
  with fileio.exclusive_lock(Path(cache_root).expanduser() / f".{fp}.lock"):
    if (folder / _META).exists():
      meta = json.loads((folder / _META).read_text())
      return Dataset({name: _load(folder, name) for name in splits.SPLITS},
                     tuple(meta["image_shape"]), [tuple(b) for b in meta["bad_files"]],
                     cache_dir)
    scan = splits.checked_scan(source_dir, cache_dir, on_bad_file, progress=progress,
                               keep_images=True)
    labels = np.array([label for label, _ in scan.files], np.int32)
    keys = np.array([splits.file_key(label, path) for label, path in scan.files], dtype=str)
    which = np.array([rule.split_of(k) for k in keys.tolist()], dtype=str)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in splits.SPLITS:
      index = np.flatnonzero(which == name)
      index = index[canonical_order(labels[index], keys[index])]
      images = (np.stack([scan.images[i] for i in index]).astype(np.float32) if len(index)
                else np.zeros((0, *scan.image_shape), np.float32))
      out[name] = Split(name, images, labels[index], keys[index])
      _save(folder, out[name])
    fileio.write_json_atomic(folder / _META, {
        "source_dir": str(Path(source_dir).resolve()), "image_shape": list(scan.image_shape),
        "bad_files": [list(b) for b in scan.bad], "rule": dataclasses.asdict(rule),
        "counts": {name: s.class_counts() for name, s in out.items()}})
    return Dataset(out, scan.image_shape, scan.bad, cache_dir)
