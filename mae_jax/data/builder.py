"""tfds builder for a DeepLense folder: the prepared dataset the host feed reads.

`prepare()` is the entry point: it scans the source folder once (`splits.checked_scan`:
every file read safely and checked), then builds a tfds dataset in a cache folder
keyed by a fingerprint of the source (names, sizes, mtimes) and the split settings,
so a prepared dataset is reused until the folder changes. `read_split` reads a split
back as arrays, in the canonical order the TensorFlow-free reader (`arrays.py`) uses.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds

from mae_jax.data import arrays
from mae_jax.data import layout
from mae_jax.data import npy_io
from mae_jax.data import splits
from mae_jax.runtime import fileio

BAD_FILES_REPORT = splits.BAD_FILES_REPORT
_SCAN_FILE = "scan.json"


class DeepLense(tfds.core.GeneratorBasedBuilder):
  """DeepLense lensing images (no_sub, cdm, axion) from a folder of `.npy` files."""

  VERSION = tfds.core.Version("2.0.0")
  RELEASE_NOTES = {"1.0.0": "Images, labels, axion masses and file names; hash-based splits.",
                   "2.0.0": "A held-out test split beside train and validation."}

  def __init__(self, *, scan: splits.ScanResult, rule: splits.SplitRule, **kwargs):
    self._scan = scan
    self._rule = rule
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    h, w = self._scan.image_shape
    return self.dataset_info_from_configs(
        description=("Strong-lensing images in the DeepLense layout. `axion_mass` is "
                     f"{layout.AXION_MASS_NONE} for classes without one."),
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(h, w, 1), dtype=np.float32,
                                          encoding=tfds.features.Encoding.BYTES),
            "label": tfds.features.ClassLabel(names=list(layout.CLASS_NAMES)),
            "axion_mass": tfds.features.Scalar(dtype=np.float32),
            "file_name": tfds.features.Text(),
        }),
        supervised_keys=("image", "label"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Reads a local folder; nothing to download.
    by_split = {name: [] for name in splits.SPLITS}
    for label, path in self._scan.files:
      by_split[self._rule.split_of(splits.file_key(label, path))].append((label, path))
    return {name: self._generate_examples(files) for name, files in by_split.items()}

  def _generate_examples(self, files: list[tuple[int, Path]]) -> Iterator[tuple[str, dict]]:
    for label, path in files:
      record = npy_io.read_lens_file(path)  # Re-checked: the file may have changed since the scan.
      if record.image.shape != self._scan.image_shape:
        raise npy_io.BadFileError(path, "changed size while the dataset was being prepared")
      key = splits.file_key(label, path)
      yield key, {
          "image": record.image.astype(np.float32)[..., None],
          "label": label,
          "axion_mass": np.float32(layout.AXION_MASS_NONE if record.axion_mass is None
                                   else record.axion_mass),
          "file_name": key,
      }


@dataclasses.dataclass(frozen=True)
class PreparedData:
  """A ready tfds dataset and what the scan found."""
  builder: tfds.core.DatasetBuilder
  image_shape: tuple[int, int]
  bad_files: list[tuple[str, str]]
  cache_dir: Path


def prepare(source_dir: str | os.PathLike[str], cache_root: str | os.PathLike[str],
            rule: splits.SplitRule = splits.SplitRule(), on_bad_file: str = "error",
            progress: bool = True) -> PreparedData:
  """Returns the tfds dataset of `source_dir`, building it once per folder state.

  Args:
    source_dir: a DeepLense folder (`no_sub/`, `cdm/`, `axion/` of `.npy` files).
    cache_root: where prepared datasets live, one sub-folder per fingerprint.
    rule: how files are assigned to train / validation / test (by name hash).
    on_bad_file: 'error' raises one error listing every bad file; 'skip' leaves
      them out and lists them in `<cache>/bad_files.tsv`.
    progress: show progress bars.

  Raises:
    errors.LayoutError: the folder does not follow the layout.
    errors.BadDataError: bad files were found and `on_bad_file` is 'error'.
  """
  fp = splits.fingerprint(source_dir, rule, on_bad_file)
  cache_dir = Path(cache_root).expanduser() / fp
  builder_dir = cache_dir / "deep_lense" / str(DeepLense.VERSION)
  with fileio.exclusive_lock(Path(cache_root).expanduser() / f".{fp}.lock"):
    scan_path = cache_dir / _SCAN_FILE
    if (builder_dir / "dataset_info.json").exists() and scan_path.exists():
      saved = json.loads(scan_path.read_text())
      builder = tfds.builder_from_directory(builder_dir)
      return PreparedData(builder, tuple(saved["image_shape"]),
                          [tuple(b) for b in saved["bad_files"]], cache_dir)
    scan = splits.checked_scan(source_dir, cache_dir, on_bad_file, progress=progress)
    builder = DeepLense(scan=scan, rule=rule, data_dir=str(cache_dir))
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(verify_ssl=False))
    fileio.write_json_atomic(scan_path, {
        "source_dir": str(Path(source_dir).resolve()),
        "image_shape": list(scan.image_shape),
        "num_files": len(scan.files),
        "bad_files": [list(b) for b in scan.bad],
        "rule": dataclasses.asdict(rule),
    })
    return PreparedData(builder, scan.image_shape, scan.bad, cache_dir)


def read_split(builder: tfds.core.DatasetBuilder, split: str) -> arrays.Split:
  """A prepared split as arrays, in canonical order (by class, then file name)."""
  h, w, _ = builder.info.features["image"].shape
  images, labels, keys = [], [], []
  ds = builder.as_dataset(split=split, shuffle_files=False,
                          decoders={"axion_mass": tfds.decode.SkipDecoding()},
                          read_config=tfds.ReadConfig(try_autocache=False))
  for ex in tfds.as_numpy(ds.batch(1024)):
    images.append(ex["image"][..., 0])
    labels.append(ex["label"].astype(np.int32))
    keys += [k.decode() for k in ex["file_name"]]
  images = np.concatenate(images) if images else np.zeros((0, h, w), np.float32)
  labels = np.concatenate(labels) if labels else np.zeros((0,), np.int32)
  keys = np.array(keys, dtype=str)
  order = arrays.canonical_order(labels, keys)
  return arrays.Split(split, images[order], labels[order], keys[order])


def read_dataset(prepared: PreparedData) -> arrays.Dataset:
  """Every split of a prepared tfds dataset as arrays (what the host feed trains on)."""
  return arrays.Dataset({name: read_split(prepared.builder, name) for name in splits.SPLITS},
                        tuple(prepared.image_shape), prepared.bad_files, prepared.cache_dir)
