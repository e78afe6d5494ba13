"""tfds builder for a DeepLense folder: the prepared dataset the host feed reads.

`prepare()` is the entry point: it scans the source folder once (`splits.scan_source`:
every file read safely and checked), then builds a tfds dataset in a cache folder
keyed by a fingerprint of the source (names, sizes, mtimes) and the split settings,
so a prepared dataset is reused until the folder changes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds

from mae_jax.data import layout
from mae_jax.data import npy_io
from mae_jax.data import splits
from mae_jax.runtime import errors
from mae_jax.runtime import fileio

BAD_FILES_REPORT = "bad_files.tsv"
_SCAN_FILE = "scan.json"


class DeepLense(tfds.core.GeneratorBasedBuilder):
  """DeepLense lensing images (no_sub, cdm, axion) from a folder of `.npy` files."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Images, labels, axion masses and file names; hash-based splits."}

  def __init__(self, *, scan: splits.ScanResult, validation_fraction: float, **kwargs):
    self._scan = scan
    self._validation_fraction = validation_fraction
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
    by_split = {"train": [], "validation": []}
    for label, path in self._scan.files:
      by_split[splits.split_of(splits.file_key(label, path), self._validation_fraction)].append((label, path))
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


@contextlib.contextmanager
def _file_lock(path: Path):
  """Exclusive advisory lock, so concurrent runs prepare a dataset only once."""
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "a+") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def prepare(source_dir: str | os.PathLike[str], cache_root: str | os.PathLike[str],
            validation_fraction: float = 0.1, on_bad_file: str = "error",
            progress: bool = True) -> PreparedData:
  """Returns the tfds dataset of `source_dir`, building it once per folder state.

  Args:
    source_dir: a DeepLense folder (`no_sub/`, `cdm/`, `axion/` of `.npy` files).
    cache_root: where prepared datasets live, one sub-folder per fingerprint.
    validation_fraction: share of files (by name hash) in the `validation` split.
    on_bad_file: 'error' raises one error listing every bad file; 'skip' leaves
      them out and lists them in `<cache>/bad_files.tsv`.
    progress: show progress bars.

  Raises:
    errors.LayoutError: the folder does not follow the layout.
    errors.BadDataError: bad files were found and `on_bad_file` is 'error'.
  """
  if on_bad_file not in ("error", "skip"):
    raise ValueError(f"on_bad_file must be 'error' or 'skip', got {on_bad_file!r}")
  if not 0.0 < validation_fraction < 1.0:
    raise ValueError(f"validation_fraction must lie in (0, 1), got {validation_fraction}")
  fp = splits.fingerprint(source_dir, validation_fraction, on_bad_file)
  cache_dir = Path(cache_root).expanduser() / fp
  builder_dir = cache_dir / "deep_lense" / str(DeepLense.VERSION)
  with _file_lock(Path(cache_root).expanduser() / f".{fp}.lock"):
    scan_path = cache_dir / _SCAN_FILE
    if (builder_dir / "dataset_info.json").exists() and scan_path.exists():
      saved = json.loads(scan_path.read_text())
      builder = tfds.builder_from_directory(builder_dir)
      return PreparedData(builder, tuple(saved["image_shape"]),
                          [tuple(b) for b in saved["bad_files"]], cache_dir)
    scan = splits.scan_source(source_dir, progress=progress)
    if scan.bad and on_bad_file == "error":
      raise errors.BadDataError(
          f"{len(scan.bad)} bad file(s) in {source_dir}:\n{splits.format_bad_files(scan.bad)}\n"
          "Fix or remove them, or set --config.data.on_bad_file=skip to train on the rest.")
    cache_dir.mkdir(parents=True, exist_ok=True)
    if scan.bad:
      logging.warning("skipping %d bad file(s), listed in %s:\n%s", len(scan.bad),
                      cache_dir / BAD_FILES_REPORT, splits.format_bad_files(scan.bad, limit=10))
    (cache_dir / BAD_FILES_REPORT).write_text(
        "path\tdefect\n" + "".join(f"{p}\t{d}\n" for p, d in scan.bad))
    builder = DeepLense(scan=scan, validation_fraction=validation_fraction,
                        data_dir=str(cache_dir))
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(verify_ssl=False))
    fileio.write_json_atomic(scan_path, {
        "source_dir": str(Path(source_dir).resolve()),
        "image_shape": list(scan.image_shape),
        "num_files": len(scan.files),
        "bad_files": [list(b) for b in scan.bad],
        "validation_fraction": validation_fraction,
    })
    return PreparedData(builder, scan.image_shape, scan.bad, cache_dir)
