"""Safe reading of DeepLense .npy files: formats, defects, refused pickles."""

from __future__ import annotations

import io
import os
import pickle
import pickletools
from pathlib import Path

import numpy as np
import pytest

from mae_jax.data import npy_io


def _pickle_shape(raw: bytes) -> list[tuple[str, object]]:
  """Opcode names plus the global names they load: the 'structure' of a pickle."""
  f = io.BytesIO(raw)
  np.lib.format.read_magic(f)
  header = np.lib.format.read_array_header_1_0(f)
  ops = []
  for op, arg, _ in pickletools.genops(f):
    keep = isinstance(arg, str) and not arg.startswith("O")  # module/class names, dtype codes
    ops.append((op.name, arg if keep else None))
  return [("header", header)] + ops


def test_roundtrip_plain_and_axion(tmp_path):
  img = np.random.default_rng(0).random((64, 64))
  npy_io.write_lens_file(tmp_path / "a.npy", img)
  npy_io.write_lens_file(tmp_path / "b.npy", img, axion_mass=3.5e-23)
  a = npy_io.read_lens_file(tmp_path / "a.npy")
  b = npy_io.read_lens_file(tmp_path / "b.npy")
  assert a.axion_mass is None and b.axion_mass == 3.5e-23
  np.testing.assert_array_equal(a.image, img)
  np.testing.assert_array_equal(b.image, img)
  assert a.image.dtype == np.float64 and a.image.shape == (64, 64)


def test_written_files_match_deeplense_structure(tmp_path):
  """Same header and pickle structure as the original generator's np.save output."""
  img = np.random.default_rng(1).random((64, 64))
  mass = np.float64(10 ** -23.3)
  # DeepLenseSim: File = np.array([lens.image_real, axion_masses[i]]); np.save(path, File)
  # (old numpy made that an object array implicitly; today dtype=object says it).
  reference = np.array([img, mass], dtype=object)
  np.save(tmp_path / "ref.npy", reference, allow_pickle=True)
  npy_io.write_lens_file(tmp_path / "ours.npy", img, axion_mass=float(mass))
  ref_raw = (tmp_path / "ref.npy").read_bytes()
  ours_raw = (tmp_path / "ours.npy").read_bytes()
  assert _pickle_shape(ours_raw) == _pickle_shape(ref_raw)
  assert ours_raw == ref_raw
  np.save(tmp_path / "ref_plain.npy", img)
  npy_io.write_lens_file(tmp_path / "ours_plain.npy", img)
  assert (tmp_path / "ours_plain.npy").read_bytes() == (tmp_path / "ref_plain.npy").read_bytes()


def test_reads_old_numpy_protocol2_pickles(tmp_path):
  """Files written by numpy 1.x (numpy.core module names, _codecs.encode bytes)."""
  img = np.random.default_rng(2).random((64, 64))
  arr = np.empty(2, dtype=object)
  arr[0], arr[1] = img, np.float64(2e-23)
  payload = pickle.dumps(arr, protocol=2).replace(b"numpy._core.multiarray",
                                                  b"numpy.core.multiarray")
  assert b"_codecs" in payload and b"numpy.core.multiarray" in payload
  header = io.BytesIO()
  np.lib.format.write_array_header_1_0(header, {"descr": "|O", "fortran_order": False,
                                                "shape": (2,)})
  (tmp_path / "old.npy").write_bytes(header.getvalue() + payload)
  rec = npy_io.read_lens_file(tmp_path / "old.npy")
  assert rec.axion_mass == 2e-23
  np.testing.assert_array_equal(rec.image, img)


class _Evil:

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


class _EvalEvil:

  def __reduce__(self):
    return (eval, ("__import__('os').system('touch /tmp/should_not_exist')",))


@pytest.mark.parametrize("payload_kind", ["system_in_object_array", "eval", "bare_pickle"])
def test_malicious_pickle_runs_nothing(tmp_path, payload_kind):
  marker = tmp_path / "PWNED"
  path = tmp_path / "evil.npy"
  if payload_kind == "system_in_object_array":
    arr = np.empty(2, dtype=object)
    arr[0], arr[1] = _Evil(marker), 1e-23
    np.save(path, arr, allow_pickle=True)
  elif payload_kind == "eval":
    arr = np.empty(2, dtype=object)
    arr[0], arr[1] = np.zeros((4, 4)), _EvalEvil()
    np.save(path, arr, allow_pickle=True)
  else:  # an object-array header followed by a pickle of a bare callable call
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|O", "fortran_order": False,
                                                  "shape": (2,)})
    path.write_bytes(header.getvalue() + pickle.dumps(_Evil(marker)))
  with pytest.raises(npy_io.BadFileError, match="refused to load global") as info:
    npy_io.read_lens_file(path)
  assert str(path) in str(info.value)
  assert not marker.exists()
  assert not Path("/tmp/should_not_exist").exists()


def _save(path, array, allow_pickle=False):
  np.save(path, array, allow_pickle=allow_pickle)
  return path


@pytest.mark.parametrize("make, defect", [
    (lambda p: p.write_bytes(b"not a numpy file at all"), "not a valid .npy"),
    (lambda p: p.write_bytes(_raw(np.zeros((64, 64)))[:500]), "truncated"),
    (lambda p: p.write_bytes(_raw(_axion(np.zeros((64, 64))))[:700]), "pickle"),
    (lambda p: _save(p, np.zeros((64, 64, 3))), "wrong shape"),
    (lambda p: _save(p, np.zeros((4,))), "wrong shape"),
    (lambda p: _save(p, np.array(["a", "b"])), "non-numeric"),
    (lambda p: _save(p, np.zeros((8, 8), np.complex64)), "non-numeric"),
    (lambda p: _save(p, np.full((8, 8), np.nan)), "64 non-finite"),
    (lambda p: _save(p, np.where(np.eye(8) > 0, np.inf, 0.0)), "8 non-finite"),
    (lambda p: _save(p, np.array([1, 2, 3], dtype=object), True), "expected [image, axion_mass]"),
    (lambda p: _save(p, _axion(np.zeros((8, 8)), "heavy"), True), "not a number"),
    (lambda p: _save(p, _axion(np.zeros((8, 8)), -1.0), True), "not a positive"),
    (lambda p: _save(p, _axion(np.full((8, 8), np.nan), 1e-23), True), "non-finite"),
])
def test_defects_are_named(tmp_path, make, defect):
  path = tmp_path / "bad.npy"
  make(path)
  with pytest.raises(npy_io.BadFileError) as info:
    npy_io.read_lens_file(path)
  assert defect in info.value.defect
  assert info.value.path == str(path)


def _raw(array) -> bytes:
  f = io.BytesIO()
  np.save(f, array, allow_pickle=array.dtype.hasobject)
  return f.getvalue()


def _axion(image, mass=1e-23):
  arr = np.empty(2, dtype=object)
  arr[0], arr[1] = image, mass
  return arr


def test_singleton_channel_is_dropped(tmp_path):
  np.save(tmp_path / "c.npy", np.ones((1, 8, 8), np.float32))
  assert npy_io.read_lens_file(tmp_path / "c.npy").image.shape == (8, 8)


def test_atomic_write_leaves_no_temp_files(tmp_path):
  npy_io.write_lens_file(tmp_path / "x.npy", np.zeros((4, 4)))
  assert [p.name for p in tmp_path.iterdir()] == ["x.npy"]
