"""Tests of the DeepLense Model II simulator (mae_jax.data.simulate)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from mae_jax.data import simulate
from mae_jax.data.layout import CLASS_NAMES, list_class_files
from mae_jax.data.npy_io import read_lens_file

PER_CLASS = 3
_NAME = re.compile(r"^(no_sub|cdm|axion)_sim_(\d+)\.npy$")


def _snapshot(root: Path) -> dict[str, bytes]:
  """Relative path -> bytes of every visible .npy file under `root`."""
  return {f"{c}/{p.name}": p.read_bytes()
          for c, paths in list_class_files(root).items() for p in paths}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
  """A small dataset made in-process (workers=1), seed 0."""
  root = tmp_path_factory.mktemp("sim") / "data"
  counts = simulate.generate(root, PER_CLASS, seed=0, workers=1, progress=False)
  assert counts == dict.fromkeys(CLASS_NAMES, PER_CLASS)
  return root


def test_einstein_radius_value_and_scaling():
  assert simulate.einstein_radius(1e12) == pytest.approx(1.28, abs=0.01)
  masses = np.array([1e6, 1e8, 1e10, 1e12])
  radii = simulate.einstein_radius(masses)
  assert isinstance(radii, np.ndarray) and radii.shape == (4,)
  np.testing.assert_allclose(radii, simulate.einstein_radius(1e12) * np.sqrt(masses / 1e12))
  assert isinstance(simulate.einstein_radius(3e8), float)
  with pytest.raises(ValueError):
    simulate.einstein_radius(-1.0)


def test_layout(dataset):
  assert json.loads((dataset / simulate.MANIFEST_NAME).read_text())["complete"]
  for class_name in CLASS_NAMES:
    files = sorted((dataset / class_name).iterdir())
    assert len(files) == PER_CLASS
    for path in files:
      match = _NAME.match(path.name)
      assert match and match.group(1) == class_name
      assert int(match.group(2)) < 2**128
      array = np.load(path, allow_pickle=True)  # our own trusted files
      if class_name == "axion":
        assert array.dtype == object and array.shape == (2,)
        image, mass = array
        assert type(mass) is np.float64 and 1e-24 <= mass <= 1e-22
      else:
        assert array.dtype == np.float64
        image, mass = array, None
      assert isinstance(image, np.ndarray) and image.dtype == np.float64
      assert image.shape == (64, 64)
      assert image.min() == 0.0 and image.max() == 1.0
      decoded = read_lens_file(path)
      np.testing.assert_array_equal(decoded.image, image)
      assert decoded.axion_mass == mass


def test_reproducible_across_workers_and_seeds(dataset, tmp_path):
  parallel = tmp_path / "parallel"
  simulate.generate(parallel, PER_CLASS, seed=0, workers=2, progress=False)
  assert _snapshot(parallel) == _snapshot(dataset)

  other = tmp_path / "other_seed"
  simulate.generate(other, 1, seed=1, workers=1, progress=False)
  for class_name in CLASS_NAMES:
    new = read_lens_file(simulate.image_path(other, class_name, 1, 0)).image
    old = read_lens_file(simulate.image_path(dataset, class_name, 0, 0)).image
    assert not np.array_equal(new, old)


def test_image_path_is_deterministic_and_distinct(tmp_path):
  paths = {simulate.image_path(tmp_path, c, s, i)
           for c in CLASS_NAMES for s in (0, 1) for i in range(20)}
  assert len(paths) == 3 * 2 * 20
  assert simulate.image_path(tmp_path, "cdm", 5, 7) == simulate.image_path(tmp_path, "cdm", 5, 7)
  assert simulate.image_path(tmp_path, "cdm", 5, 7).parent == tmp_path / "cdm"


def test_resume_writes_only_missing_files(dataset, tmp_path):
  root = tmp_path / "data"
  simulate.generate(root, PER_CLASS, seed=0, workers=1, progress=False)
  victim = simulate.image_path(root, "cdm", 0, 1)
  victim.unlink()
  stale = victim.with_name(f".{victim.name}.tmp99999")
  stale.write_bytes(b"half-written")
  mtimes = {p: p.stat().st_mtime_ns for p in root.glob("*/*.npy")}

  counts = simulate.generate(root, PER_CLASS, seed=0, workers=1, progress=False)
  assert counts == {"no_sub": 0, "cdm": 1, "axion": 0}
  assert victim.exists()
  assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
  assert _snapshot(root) == _snapshot(dataset)

  # A larger per_class extends the folder; the old files stay untouched.
  counts = simulate.generate(root, PER_CLASS + 1, seed=0, workers=1, progress=False)
  assert counts == dict.fromkeys(CLASS_NAMES, 1)
  assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
  assert json.loads((root / simulate.MANIFEST_NAME).read_text())["per_class"] == PER_CLASS + 1


def test_mismatched_settings_refused(dataset):
  before = _snapshot(dataset)
  with pytest.raises(simulate.SimulationMismatchError, match="seed"):
    simulate.generate(dataset, PER_CLASS, seed=1, workers=1, progress=False)
  with pytest.raises(simulate.SimulationMismatchError, match="noise"):
    simulate.generate(dataset, PER_CLASS, seed=0, noise=True, workers=1, progress=False)
  assert _snapshot(dataset) == before


def test_foreign_folder_refused(tmp_path):
  (tmp_path / "cdm").mkdir()
  np.save(tmp_path / "cdm" / "real.npy", np.zeros((64, 64)))
  with pytest.raises(simulate.SimulationMismatchError, match="simulation.json"):
    simulate.generate(tmp_path, 1, workers=1, progress=False)


def test_invalid_arguments(tmp_path):
  with pytest.raises(ValueError, match="unknown class"):
    simulate.simulate_image("wdm", np.random.default_rng(0))
  with pytest.raises(ValueError, match="seed"):
    simulate.generate(tmp_path, 1, seed=-1, progress=False)
  with pytest.raises(ValueError, match="per_class"):
    simulate.generate(tmp_path, -1, progress=False)


def test_constant_image_scales_without_nan():
  scaled = simulate._min_max(np.full((64, 64), 3.0))  # pylint: disable=protected-access
  assert np.all(scaled == 0.0)


def _ring_radius(image: np.ndarray) -> float:
  """Mean distance (arcsec) of the brightest 2% of pixels from the centre."""
  yy, xx = np.indices(image.shape)
  centre = (image.shape[0] - 1) / 2
  radius = np.hypot(xx - centre, yy - centre) * simulate.PIXEL_SCALE
  return float(radius[image >= np.quantile(image, 0.98)].mean())


def test_physics_sanity():
  images = {c: simulate.simulate_image(c, np.random.default_rng(123))[0] for c in CLASS_NAMES}
  # Same rng seed -> same source position; substructure must change the image.
  assert np.abs(images["cdm"] - images["no_sub"]).max() > 1e-3
  assert np.abs(images["axion"] - images["no_sub"]).max() > 1e-3
  for image in images.values():
    assert 0.6 <= _ring_radius(image) <= 2.0


def test_noise_is_reproducible_and_leaves_global_state_alone():
  state = np.random.get_state()
  first, _ = simulate.simulate_image("no_sub", np.random.default_rng(5), noise=True)
  second, _ = simulate.simulate_image("no_sub", np.random.default_rng(5), noise=True)
  clean, _ = simulate.simulate_image("no_sub", np.random.default_rng(5))
  after = np.random.get_state()
  assert state[0] == after[0] and np.array_equal(state[1], after[1]) and state[2:] == after[2:]
  np.testing.assert_array_equal(first, second)
  assert not np.array_equal(first, clean)
  assert first.min() == 0.0 and first.max() == 1.0


def test_cli_summary(tmp_path, capsys):
  assert simulate.main(["--out", str(tmp_path / "cli"), "--per_class", "1",
                        "--workers", "1", "--no_progress"]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("wrote 3 images")
  assert simulate.main(["--out", str(tmp_path / "cli"), "--per_class", "1",
                        "--seed", "4", "--workers", "1", "--no_progress"]) == 2
