"""Safe reading and atomic writing of DeepLense `.npy` files.

DeepLense axion files are numpy *object* arrays `[image, axion_mass]`, i.e. a
pickle. `np.load(allow_pickle=True)` would execute whatever such a file says, so
object arrays are read here with a restricted unpickler that admits only the
handful of numpy callables needed to rebuild arrays, dtypes and scalars.
Anything else (`os.system`, `builtins.eval`, ...) is refused before it runs.
"""

from __future__ import annotations

import _codecs
import dataclasses
import io
import math
import os
import pickle
from pathlib import Path

import numpy as np

from mae_jax.runtime import fileio

# Largest file we agree to read; DeepLense files are ~33 kB (64x64) or ~180 kB (150x150).
MAX_FILE_BYTES = 64 * 1024 * 1024
# Largest image we accept (pixels); guards against absurd shapes in headers/pickles.
MAX_PIXELS = 4096 * 4096


class BadFileError(ValueError):
  """A file that cannot be used as a DeepLense image; says which and why."""

  def __init__(self, path: str | os.PathLike[str], defect: str):
    self.path = str(path)
    self.defect = defect
    super().__init__(f"{self.path}: {defect}")


@dataclasses.dataclass(frozen=True)
class LensImage:
  """One decoded file: a finite 2-D float64 image and, for axion files, its mass."""
  image: np.ndarray
  axion_mass: float | None


class _NdarrayToken:
  """Stands in for `numpy.ndarray` inside pickles so it can't be called directly."""


_NDARRAY = _NdarrayToken()


def _reconstruct(subtype, shape, dtype):
  """Guarded `numpy._core.multiarray._reconstruct` (array skeleton for unpickling)."""
  if subtype is not _NDARRAY:
    raise pickle.UnpicklingError("_reconstruct called with a type other than numpy.ndarray")
  if not isinstance(shape, tuple) or math.prod(int(s) for s in shape) > MAX_PIXELS:
    raise pickle.UnpicklingError(f"refused array skeleton of shape {shape!r}")
  return np._core.multiarray._reconstruct(np.ndarray, shape, dtype)  # pylint: disable=protected-access


def _scalar(dtype, *args):
  if not isinstance(dtype, np.dtype) or dtype.hasobject:
    raise pickle.UnpicklingError("refused numpy scalar of object dtype")
  return np._core.multiarray.scalar(dtype, *args)  # pylint: disable=protected-access


def _encode(text, encoding="latin1"):
  # Protocol-2 pickles written by Python 3 store bytes as _codecs.encode(str, 'latin1').
  if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
    raise pickle.UnpicklingError("refused _codecs.encode call")
  return _codecs.encode(text, encoding)


# (module, name) -> what the unpickler may receive. Old numpy wrote numpy.core.*,
# numpy >= 2 writes numpy._core.*; both are admitted, nothing else is.
_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.multiarray", "scalar"): _scalar,
    ("numpy._core.multiarray", "scalar"): _scalar,
    ("_codecs", "encode"): _encode,
}


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickler that resolves only numpy array/dtype/scalar reconstruction."""

  def find_class(self, module, name):
    try:
      return _ALLOWED_GLOBALS[(module, name)]
    except KeyError:
      raise pickle.UnpicklingError(
          f"refused to load global '{module}.{name}': only numpy array "
          "reconstruction is allowed in DeepLense files") from None

  def persistent_load(self, pid):
    raise pickle.UnpicklingError("refused persistent id in pickle")


def _read_header(f: io.BytesIO) -> tuple[tuple[int, ...], bool, np.dtype]:
  version = np.lib.format.read_magic(f)
  if version == (1, 0):
    return np.lib.format.read_array_header_1_0(f)
  if version in ((2, 0), (3, 0)):
    return np.lib.format.read_array_header_2_0(f)
  raise ValueError(f"unsupported .npy format version {version}")


def _check_image(image, path) -> np.ndarray:
  if not isinstance(image, np.ndarray):
    raise BadFileError(path, f"image is a {type(image).__name__}, not a numpy array")
  if image.dtype.kind not in "fiu":
    raise BadFileError(path, f"non-numeric image dtype {image.dtype}")
  if image.ndim == 3 and 1 in (image.shape[0], image.shape[-1]):
    image = image.reshape(image.shape[1:] if image.shape[0] == 1 else image.shape[:-1])
  if image.ndim != 2 or min(image.shape) < 1:
    raise BadFileError(path, f"wrong shape {image.shape}: expected a 2-D (H, W) image")
  image = image.astype(np.float64, copy=False)
  bad = int(np.size(image) - np.count_nonzero(np.isfinite(image)))
  if bad:
    raise BadFileError(path, f"{bad} non-finite pixel(s) (NaN/inf) of {image.size}")
  return image


def _check_mass(mass, path) -> float:
  if isinstance(mass, np.ndarray) and mass.shape == ():
    mass = mass[()]
  if isinstance(mass, (bool, np.bool_)) or not isinstance(mass, (int, float, np.integer, np.floating)):
    raise BadFileError(path, f"axion mass is a {type(mass).__name__}, not a number")
  mass = float(mass)
  if not math.isfinite(mass) or mass <= 0:
    raise BadFileError(path, f"axion mass {mass!r} is not a positive finite number")
  return mass


def read_lens_file(path: str | os.PathLike[str]) -> LensImage:
  """Reads one DeepLense `.npy` file without executing anything it contains.

  Accepts plain numeric arrays (no_sub, cdm) and object arrays
  `[image, axion_mass]` (axion). A singleton channel axis is dropped.

  Raises:
    BadFileError: naming the file and its defect (truncated, refused pickle,
      wrong shape, non-numeric dtype, non-finite pixels, ...).
  """
  path = Path(path)
  try:
    size = path.stat().st_size
  except OSError as e:
    raise BadFileError(path, f"cannot be read ({e.strerror})") from None
  if size > MAX_FILE_BYTES:
    raise BadFileError(path, f"file of {size} bytes exceeds the {MAX_FILE_BYTES}-byte limit")
  raw = path.read_bytes()
  f = io.BytesIO(raw)
  try:
    shape, fortran_order, dtype = _read_header(f)
  except Exception as e:  # pylint: disable=broad-except
    raise BadFileError(path, f"not a valid .npy file ({e})") from None
  if math.prod(shape) > MAX_PIXELS:
    raise BadFileError(path, f"array shape {shape} is too large")

  if not dtype.hasobject:
    f.seek(0)
    try:
      array = np.lib.format.read_array(f, allow_pickle=False)
    except Exception as e:  # pylint: disable=broad-except
      raise BadFileError(path, f"truncated or corrupt array data ({e})") from None
    return LensImage(_check_image(array, path), None)

  try:
    obj = _RestrictedUnpickler(f).load()
  except pickle.UnpicklingError as e:
    raise BadFileError(path, f"unsafe or invalid pickle: {e}") from None
  except Exception as e:  # pylint: disable=broad-except
    raise BadFileError(path, f"truncated or corrupt pickle ({type(e).__name__}: {e})") from None
  if not (isinstance(obj, np.ndarray) and obj.dtype.hasobject and obj.shape == (2,)):
    desc = obj.shape if isinstance(obj, np.ndarray) else type(obj).__name__
    raise BadFileError(path, f"object array of shape {desc}: expected [image, axion_mass]")
  return LensImage(_check_image(obj[0], path), _check_mass(obj[1], path))


def write_lens_file(path: str | os.PathLike[str], image: np.ndarray,
                    axion_mass: float | None = None) -> None:
  """Writes one image in the DeepLense format, atomically (never half-written).

  `axion_mass=None` writes a plain float64 (H, W) array (no_sub, cdm); a mass
  writes the axion object array `[image, numpy.float64(mass)]`.
  """
  image = np.asarray(image, dtype=np.float64)
  if axion_mass is None:
    array = image
  else:
    array = np.empty(2, dtype=object)
    array[0] = image
    array[1] = np.float64(axion_mass)
  fileio.write_atomic(path, lambda f: np.save(f, array, allow_pickle=axion_mass is not None))
