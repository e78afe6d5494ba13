"""Reading a DeepLense folder once, safely, and assigning its files to splits.

`scan_source` reads and checks every file (through `npy_io`'s restricted reader);
`SplitRule.split_of` puts a file in `train`, `validation` or `test` by a hash of its
name alone, so adding files moves none; `fingerprint` names a folder's state
(listing and split settings), so prepared copies of it are reused until it
changes. No TensorFlow: the tfds builder and the in-memory arrays both start here.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from mae_jax.data import layout
from mae_jax.data import npy_io
from mae_jax.runtime import errors

# Bumped when the stored features or the split rule change: invalidates caches.
FORMAT = "deeplense-v2"
SPLITS = ("train", "validation", "test")
BAD_FILES_REPORT = "bad_files.tsv"


@dataclasses.dataclass(frozen=True)
class ScanResult:
  """What a scan of the source folder found."""
  files: list[tuple[int, Path]]        # (label, path) of every usable file
  image_shape: tuple[int, int]         # (H, W) agreed by the usable files
  bad: list[tuple[str, str]]           # (path, defect) of every rejected file
  images: list[np.ndarray] | None = None   # each usable file's image, if kept


def hash_fraction(key: str) -> float:
  """Maps a file key to a stable number in [0, 1) from a hash of its name."""
  digest = hashlib.sha256(key.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64


@dataclasses.dataclass(frozen=True)
class SplitRule:
  """Which split a file belongs to, by the hash of its key alone: `validation` below
  `validation_fraction`, `test` in the next `test_fraction`, `train` above. Adding files
  moves none, and raising `test_fraction` moves files from train to test only."""
  validation_fraction: float = 0.1
  test_fraction: float = 0.1

  def __post_init__(self):
    v, t = self.validation_fraction, self.test_fraction
    if not (0.0 < v < 1.0 and 0.0 <= t < 1.0 and v + t < 1.0):
      raise ValueError(f"validation_fraction={v} and test_fraction={t} must lie in (0, 1) and "
                       "[0, 1), and leave some files for training (their sum below 1)")

  def split_of(self, key: str) -> str:
    h = hash_fraction(key)
    if h < self.validation_fraction:
      return "validation"
    return "test" if h < self.validation_fraction + self.test_fraction else "train"


def file_key(label: int, path: Path) -> str:
  """The unique, stable name of a file: `<class>/<file name>`."""
  return f"{layout.CLASS_NAMES[label]}/{path.name}"


def format_bad_files(bad: Sequence[tuple[str, str]], limit: int = 50) -> str:
  """One line per bad file, `path: defect`, the list cut after `limit` lines."""
  lines = [f"  {path}: {defect}" for path, defect in bad[:limit]]
  if len(bad) > limit:
    lines.append(f"  ... and {len(bad) - limit} more")
  return "\n".join(lines)


def scan_source(root: str | os.PathLike[str], progress: bool = True,
                keep_images: bool = False) -> ScanResult:
  """Reads and checks every file of a DeepLense folder (keeping the images if asked).

  The dataset's image size is the one most files agree on; a file of another
  size is a bad file, as are unreadable, unsafe, non-numeric or non-finite ones.
  """
  class_files = layout.list_class_files(root)
  candidates = [(label, path) for label, name in enumerate(layout.CLASS_NAMES)
                for path in class_files[name]]
  shapes: dict[tuple[int, int], list[tuple[int, Path]]] = collections.defaultdict(list)
  kept: dict[Path, np.ndarray] = {}
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
    if keep_images:
      kept[path] = record.image.astype(np.float32)
  if not shapes:
    raise errors.BadDataError(f"no usable file in {root}; every file is bad:\n"
                       + format_bad_files(bad))
  shape = max(shapes, key=lambda s: (len(shapes[s]), s))
  for other, files in shapes.items():
    if other != shape:
      bad.extend((str(p), f"image size {other[0]}x{other[1]} differs from the "
                          f"dataset's {shape[0]}x{shape[1]}") for _, p in files)
  bad.sort()
  files = sorted(shapes[shape], key=lambda x: (x[0], x[1].name))
  return ScanResult(files=files, image_shape=shape, bad=bad,
                    images=[kept[p] for _, p in files] if keep_images else None)


def checked_scan(root: str | os.PathLike[str], cache_dir: Path, on_bad_file: str,
                 progress: bool = True, keep_images: bool = False) -> ScanResult:
  """`scan_source`, then the bad-file policy: 'error' raises one error listing every bad
  file; 'skip' leaves them out and lists them in `<cache_dir>/bad_files.tsv`.

  Raises:
    errors.BadDataError: bad files were found and `on_bad_file` is 'error'.
  """
  if on_bad_file not in ("error", "skip"):
    raise ValueError(f"on_bad_file must be 'error' or 'skip', got {on_bad_file!r}")
  scan = scan_source(root, progress=progress, keep_images=keep_images)
  if scan.bad and on_bad_file == "error":
    raise errors.BadDataError(
        f"{len(scan.bad)} bad file(s) in {root}:\n{format_bad_files(scan.bad)}\n"
        "Fix or remove them, or set --config.data.on_bad_file=skip to train on the rest.")
  cache_dir.mkdir(parents=True, exist_ok=True)
  if scan.bad:
    logging.warning("skipping %d bad file(s), listed in %s:\n%s", len(scan.bad),
                    cache_dir / BAD_FILES_REPORT, format_bad_files(scan.bad, limit=10))
  (cache_dir / BAD_FILES_REPORT).write_text(
      "path\tdefect\n" + "".join(f"{p}\t{d}\n" for p, d in scan.bad))
  return scan


def fingerprint(root: str | os.PathLike[str], rule: SplitRule, on_bad_file: str) -> str:
  """Hash of the folder's listing (names, sizes, mtimes) and the split settings."""
  h = hashlib.sha256(f"{FORMAT}|{rule.validation_fraction!r}|{rule.test_fraction!r}|"
                     f"{on_bad_file}".encode())
  for name, paths in layout.list_class_files(root).items():
    for p in paths:
      st = p.stat()
      h.update(f"|{name}/{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
  return h.hexdigest()[:20]
