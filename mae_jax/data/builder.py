"""tfds builder for a DeepLense folder, with validation, stable splits and caching.

`prepare()` is the entry point: it scans the source folder once (every file read
safely and checked), then builds a tfds dataset in a cache folder keyed by a
fingerprint of the source (names, sizes, mtimes) and the split settings, so a
prepared dataset is reused until the folder changes.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds
from tqdm import tqdm

from mae_jax import fileio
from mae_jax.data import layout
from mae_jax.data import npy_io

BAD_FILES_REPORT = "bad_files.tsv"
_SCAN_FILE = "scan.json"
# Bumped when the stored features or the split rule change: invalidates caches.
_FORMAT = "deeplense-tfds-v1"


class BadDataError(ValueError):
  """The source folder holds files that cannot be used (and skipping is off)."""


@dataclasses.dataclass(frozen=True)
class ScanResult:
  """What a scan of the source folder found."""
  files: list[tuple[int, Path]]        # (label, path) of every usable file
  image_shape: tuple[int, int]         # (H, W) agreed by the usable files
  bad: list[tuple[str, str]]           # (path, defect) of every rejected file


def validation_fraction_of(key: str) -> float:
  """Maps a file key to a stable number in [0, 1) from a hash of its name."""
  digest = hashlib.sha256(key.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64


def split_of(key: str, validation_fraction: float) -> str:
  """'validation' or 'train', decided by the key alone (adding files moves none)."""
  return "validation" if validation_fraction_of(key) < validation_fraction else "train"


def file_key(label: int, path: Path) -> str:
  """The unique, stable name of a file: `<class>/<file name>`."""
  return f"{layout.CLASS_NAMES[label]}/{path.name}"


def format_bad_files(bad: Sequence[tuple[str, str]], limit: int = 50) -> str:
  """One line per bad file, `path: defect`, the list cut after `limit` lines."""
  lines = [f"  {path}: {defect}" for path, defect in bad[:limit]]
  if len(bad) > limit:
    lines.append(f"  ... and {len(bad) - limit} more")
  return "\n".join(lines)


def scan_source(root: str | os.PathLike[str], progress: bool = True) -> ScanResult:
  """Reads and checks every file of a DeepLense folder.

  The dataset's image size is the one most files agree on; a file of another
  size is a bad file, as are unreadable, unsafe, non-numeric or non-finite ones.
  """
  class_files = layout.list_class_files(root)
  candidates = [(label, path) for label, name in enumerate(layout.CLASS_NAMES)
                for path in class_files[name]]
  shapes: dict[tuple[int, int], list[tuple[int, Path]]] = collections.defaultdict(list)
  bad: list[tuple[str, str]] = []
  for label, path in tqdm(candidates, desc=f"checking {root}", unit="file",
                          disable=not progress, mininterval=1.0):
    try:
      record = npy_io.read_lens_file(path)
    except npy_io.BadFileError as e:
      bad.append((e.path, e.defect))
      continue
    if record.axion_mass is not None and layout.CLASS_NAMES[label] != "axion":
      bad.append((str(path), "holds an axion mass but is not in the axion folder"))
      continue
    shapes[record.image.shape].append((label, path))
  if not shapes:
    raise BadDataError(f"no usable file in {root}; every file is bad:\n"
                       + format_bad_files(bad))
  shape = max(shapes, key=lambda s: (len(shapes[s]), s))
  for other, files in shapes.items():
    if other != shape:
      bad.extend((str(p), f"image size {other[0]}x{other[1]} differs from the "
                          f"dataset's {shape[0]}x{shape[1]}") for _, p in files)
  bad.sort()
  return ScanResult(files=sorted(shapes[shape], key=lambda x: (x[0], x[1].name)),
                    image_shape=shape, bad=bad)


class DeepLense(tfds.core.GeneratorBasedBuilder):
  """DeepLense lensing images (no_sub, cdm, axion) from a folder of `.npy` files."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Images, labels, axion masses and file names; hash-based splits."}

  def __init__(self, *, scan: ScanResult, validation_fraction: float, **kwargs):
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
      by_split[split_of(file_key(label, path), self._validation_fraction)].append((label, path))
    return {name: self._generate_examples(files) for name, files in by_split.items()}

  def _generate_examples(self, files: list[tuple[int, Path]]) -> Iterator[tuple[str, dict]]:
    for label, path in files:
      record = npy_io.read_lens_file(path)  # Re-checked: the file may have changed since the scan.
      if record.image.shape != self._scan.image_shape:
        raise npy_io.BadFileError(path, "changed size while the dataset was being prepared")
      key = file_key(label, path)
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


def fingerprint(root: str | os.PathLike[str], validation_fraction: float,
                on_bad_file: str) -> str:
  """Hash of the folder's listing (names, sizes, mtimes) and the split settings."""
  h = hashlib.sha256(f"{_FORMAT}|{validation_fraction!r}|{on_bad_file}".encode())
  for name, paths in layout.list_class_files(root).items():
    for p in paths:
      st = p.stat()
      h.update(f"|{name}/{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
  return h.hexdigest()[:20]


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
    layout.LayoutError: the folder does not follow the layout.
    BadDataError: bad files were found and `on_bad_file` is 'error'.
  """
  if on_bad_file not in ("error", "skip"):
    raise ValueError(f"on_bad_file must be 'error' or 'skip', got {on_bad_file!r}")
  if not 0.0 < validation_fraction < 1.0:
    raise ValueError(f"validation_fraction must lie in (0, 1), got {validation_fraction}")
  fp = fingerprint(source_dir, validation_fraction, on_bad_file)
  cache_dir = Path(cache_root).expanduser() / fp
  builder_dir = cache_dir / "deep_lense" / str(DeepLense.VERSION)
  with _file_lock(Path(cache_root).expanduser() / f".{fp}.lock"):
    scan_path = cache_dir / _SCAN_FILE
    if (builder_dir / "dataset_info.json").exists() and scan_path.exists():
      saved = json.loads(scan_path.read_text())
      builder = tfds.builder_from_directory(builder_dir)
      return PreparedData(builder, tuple(saved["image_shape"]),
                          [tuple(b) for b in saved["bad_files"]], cache_dir)
    scan = scan_source(source_dir, progress=progress)
    if scan.bad and on_bad_file == "error":
      raise BadDataError(
          f"{len(scan.bad)} bad file(s) in {source_dir}:\n{format_bad_files(scan.bad)}\n"
          "Fix or remove them, or set --config.data.on_bad_file=skip to train on the rest.")
    cache_dir.mkdir(parents=True, exist_ok=True)
    if scan.bad:
      logging.warning("skipping %d bad file(s), listed in %s:\n%s", len(scan.bad),
                      cache_dir / BAD_FILES_REPORT, format_bad_files(scan.bad, limit=10))
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
