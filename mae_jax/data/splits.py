"""Reading a DeepLense folder once, safely, and assigning its files to splits.

`scan_source` reads and checks every file (through `npy_io`'s restricted reader);
`split_of` puts a file in a split by a hash of its name alone, so adding files
moves none; `fingerprint` names a folder's state (listing and split settings), so
prepared copies of it are reused until it changes. No TensorFlow: the tfds
builder and the in-memory arrays both start here.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from mae_jax.data import layout
from mae_jax.data import npy_io
from mae_jax.runtime import errors

# Bumped when the stored features or the split rule change: invalidates caches.
FORMAT = "deeplense-tfds-v1"


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
    raise errors.BadDataError(f"no usable file in {root}; every file is bad:\n"
                       + format_bad_files(bad))
  shape = max(shapes, key=lambda s: (len(shapes[s]), s))
  for other, files in shapes.items():
    if other != shape:
      bad.extend((str(p), f"image size {other[0]}x{other[1]} differs from the "
                          f"dataset's {shape[0]}x{shape[1]}") for _, p in files)
  bad.sort()
  return ScanResult(files=sorted(shapes[shape], key=lambda x: (x[0], x[1].name)),
                    image_shape=shape, bad=bad)


def fingerprint(root: str | os.PathLike[str], validation_fraction: float,
                on_bad_file: str) -> str:
  """Hash of the folder's listing (names, sizes, mtimes) and the split settings."""
  h = hashlib.sha256(f"{FORMAT}|{validation_fraction!r}|{on_bad_file}".encode())
  for name, paths in layout.list_class_files(root).items():
    for p in paths:
      st = p.stat()
      h.update(f"|{name}/{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
  return h.hexdigest()[:20]
