"""Tests of the DeepLense Model II simulator (mae_jax.data.simulate)."""

from __future__ import annotations

import dataclasses
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
  """Relative path -> bytes of every visible .npy file under `root`, and of params.csv."""
  files = {f"{c}/{p.name}": p.read_bytes()
           for c, paths in list_class_files(root).items() for p in paths}
  if (root / simulate.PARAMS_NAME).exists():
    files[simulate.PARAMS_NAME] = (root / simulate.PARAMS_NAME).read_bytes()
  return files


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
  """A small dataset made in-process (workers=1), seed 0."""
  root = tmp_path_factory.mktemp("sim") / "data"
  counts = simulate.generate(root, PER_CLASS, seed=0, workers=1, progress=False)
  assert counts == dict.fromkeys(CLASS_NAMES, PER_CLASS)
  return root


@pytest.fixture(scope="module")
def hard_dataset(tmp_path_factory) -> Path:
  """A small `hard` dataset made in-process (workers=1), seed 0."""
  root = tmp_path_factory.mktemp("sim_hard") / "data"
  counts = simulate.generate(root, PER_CLASS, seed=0, workers=1, progress=False,
                             variant="hard")
  assert counts == dict.fromkeys(CLASS_NAMES, PER_CLASS)
  return root


@pytest.fixture(scope="module")
def substructure_dataset(tmp_path_factory) -> Path:
  """A small `substructure` dataset (source spread 0) made in-process, seed 0."""
  root = tmp_path_factory.mktemp("sim_substructure") / "data"
  counts = simulate.generate(root, PER_CLASS, seed=0, workers=1, progress=False,
                             variant="substructure")
  assert counts == dict.fromkeys(CLASS_NAMES, PER_CLASS)
  return root


@pytest.fixture(params=simulate.VARIANTS)
def variant_dataset(request, dataset, hard_dataset, substructure_dataset) -> tuple[str, Path]:
  """(variant, its small dataset), for the tests every variant must pass."""
  return request.param, {"model_ii": dataset, "hard": hard_dataset,
                         "substructure": substructure_dataset}[request.param]


def test_einstein_radius_value_and_scaling():
  assert simulate.einstein_radius(1e12) == pytest.approx(1.28, abs=0.01)
  masses = np.array([1e6, 1e8, 1e10, 1e12])
  radii = simulate.einstein_radius(masses)
  assert isinstance(radii, np.ndarray) and radii.shape == (4,)
  np.testing.assert_allclose(radii, simulate.einstein_radius(1e12) * np.sqrt(masses / 1e12))
  assert isinstance(simulate.einstein_radius(3e8), float)
  with pytest.raises(ValueError):
    simulate.einstein_radius(-1.0)


def test_layout(variant_dataset):
  variant, dataset = variant_dataset
  manifest = json.loads((dataset / simulate.MANIFEST_NAME).read_text())
  assert manifest["complete"] and manifest["variant"] == variant
  assert manifest["noise"] == (variant != "model_ii")
  assert manifest["recipe"] == json.loads(json.dumps(simulate.recipe(variant)))
  assert sorted(p.name for p in dataset.iterdir()) == sorted(
      [*CLASS_NAMES, simulate.MANIFEST_NAME, simulate.PARAMS_NAME])
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


def test_reproducible_across_workers_and_seeds(variant_dataset, tmp_path):
  variant, dataset = variant_dataset
  parallel = tmp_path / "parallel"
  simulate.generate(parallel, PER_CLASS, seed=0, workers=2, progress=False, variant=variant)
  assert simulate.PARAMS_NAME in _snapshot(parallel)
  assert _snapshot(parallel) == _snapshot(dataset)

  other = tmp_path / "other_seed"
  simulate.generate(other, 1, seed=1, workers=1, progress=False, variant=variant)
  for class_name in CLASS_NAMES:
    new = read_lens_file(simulate.image_path(other, class_name, 1, 0)).image
    old = read_lens_file(simulate.image_path(dataset, class_name, 0, 0)).image
    assert not np.array_equal(new, old)


# Image 0 of seed 0 per class as the simulator wrote it before variants existed
# (data/model_ii_sim_demo): pixel sum, sum of squares, pixel [20, 32], axion mass.
_MODEL_II_IMAGE_0 = {
    "no_sub": (148.12376149930654, 61.8463345402228, 0.4288958842847798, None),
    "cdm": (115.29993192013274, 40.23117145011105, 0.09218138843195584, None),
    "axion": (116.87510042356675, 42.67143805164997, 0.07197517307842596,
              1.5943307133651416e-23),
}


@pytest.mark.parametrize("class_name", CLASS_NAMES)
def test_model_ii_images_are_unchanged_by_the_variants(class_name):
  # The default recipe and its draw order must not move (tolerance only for the
  # last bits that another CPU's vector maths may change).
  image, mass = simulate.simulate_image(class_name, simulate.image_rng(0, class_name, 0))
  total, squares, pixel, expected_mass = _MODEL_II_IMAGE_0[class_name]
  np.testing.assert_allclose([image.sum(), (image**2).sum(), image[20, 32]],
                             [total, squares, pixel], rtol=1e-9)
  assert mass == expected_mass


def test_image_path_is_deterministic_and_distinct(tmp_path):
  paths = {simulate.image_path(tmp_path, c, s, i)
           for c in CLASS_NAMES for s in (0, 1) for i in range(20)}
  assert len(paths) == 3 * 2 * 20
  assert simulate.image_path(tmp_path, "cdm", 5, 7) == simulate.image_path(tmp_path, "cdm", 5, 7)
  assert simulate.image_path(tmp_path, "cdm", 5, 7).parent == tmp_path / "cdm"


def test_resume_writes_only_missing_files(variant_dataset, tmp_path):
  variant, dataset = variant_dataset
  root = tmp_path / "data"
  simulate.generate(root, PER_CLASS, seed=0, workers=1, progress=False, variant=variant)
  victim = simulate.image_path(root, "cdm", 0, 1)
  victim.unlink()
  stale = victim.with_name(f".{victim.name}.tmp99999")
  stale.write_bytes(b"half-written")
  mtimes = {p: p.stat().st_mtime_ns for p in root.glob("*/*.npy")}

  (root / simulate.PARAMS_NAME).unlink()
  counts = simulate.generate(root, PER_CLASS, seed=0, workers=1, progress=False,
                             variant=variant)
  assert counts == {"no_sub": 0, "cdm": 1, "axion": 0}
  assert victim.exists()
  assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
  assert _snapshot(root) == _snapshot(dataset)

  # A larger per_class extends the folder (and its table); the old files stay untouched.
  counts = simulate.generate(root, PER_CLASS + 1, seed=0, workers=1, progress=False,
                             variant=variant)
  assert counts == dict.fromkeys(CLASS_NAMES, 1)
  assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
  assert json.loads((root / simulate.MANIFEST_NAME).read_text())["per_class"] == PER_CLASS + 1
  rows = simulate.read_parameters(root)
  assert len(rows) == 3 * (PER_CLASS + 1)
  assert (root / simulate.PARAMS_NAME).read_bytes() == simulate.parameters_table(
      root, PER_CLASS + 1, seed=0, variant=variant)


def test_mismatched_settings_refused(dataset):
  before = _snapshot(dataset)
  with pytest.raises(simulate.SimulationMismatchError, match="seed"):
    simulate.generate(dataset, PER_CLASS, seed=1, workers=1, progress=False)
  with pytest.raises(simulate.SimulationMismatchError, match="noise"):
    simulate.generate(dataset, PER_CLASS, seed=0, noise=True, workers=1, progress=False)
  with pytest.raises(simulate.SimulationMismatchError, match="variant"):
    simulate.generate(dataset, PER_CLASS, seed=0, workers=1, progress=False, variant="hard")
  assert _snapshot(dataset) == before


def test_other_variant_refused(hard_dataset):
  before = _snapshot(hard_dataset)
  with pytest.raises(simulate.SimulationMismatchError, match="variant"):
    simulate.generate(hard_dataset, PER_CLASS, seed=0, workers=1, progress=False)
  # Noise is part of the hard recipe: asking for it again changes nothing.
  assert simulate.generate(hard_dataset, PER_CLASS, seed=0, noise=True, workers=1,
                           progress=False, variant="hard") == dict.fromkeys(CLASS_NAMES, 0)
  assert _snapshot(hard_dataset) == before


def test_manifest_without_variant_is_model_ii(tmp_path):
  # Folders simulated before variants existed have no "variant" key.
  root = tmp_path / "old"
  simulate.generate(root, 1, seed=0, workers=1, progress=False)
  manifest = json.loads((root / simulate.MANIFEST_NAME).read_text())
  del manifest["variant"]
  (root / simulate.MANIFEST_NAME).write_text(json.dumps(manifest))
  assert simulate.generate(root, 1, seed=0, workers=1, progress=False) == dict.fromkeys(
      CLASS_NAMES, 0)
  with pytest.raises(simulate.SimulationMismatchError, match="variant"):
    simulate.generate(root, 1, seed=0, workers=1, progress=False, variant="hard")


_MAIN_LENS = ("halo_mass_msun", "theta_E", "lens_e1", "lens_e2", "shear_gamma1", "shear_gamma2")
_SOURCE = ("source_magnitude", "source_R_sersic", "source_n_sersic")


def test_hard_main_lens_and_source_vary_per_image(hard_dataset):
  rows = simulate.read_parameters(hard_dataset)
  assert [(r["class"], r["index"]) for r in rows] == [
      (c, i) for c in CLASS_NAMES for i in range(PER_CLASS)]
  for r in rows:  # every row names its file, and that file exists
    assert (hard_dataset / r["file"]) == simulate.image_path(hard_dataset, r["class"], 0,
                                                             r["index"])
    assert (hard_dataset / r["file"]).exists()
  for key in _MAIN_LENS + _SOURCE + ("noise_seed",):
    values = [r[key] for r in rows]
    assert len(set(values)) == len(rows), f"{key} repeats: {values}"
  lo, hi = simulate.HARD_LOG10_HALO_MASS
  for r in rows:
    assert lo <= np.log10(r["halo_mass_msun"]) <= hi
    assert r["theta_E"] == simulate.einstein_radius(r["halo_mass_msun"])
    assert np.hypot(r["lens_e1"], r["lens_e2"]) <= simulate.HARD_LENS_ELLIPTICITY_MAX + 1e-12
    assert np.hypot(r["shear_gamma1"], r["shear_gamma2"]) <= simulate.HARD_SHEAR_MAX + 1e-12
    assert simulate.HARD_SOURCE_MAGNITUDE[0] <= r["source_magnitude"] <= simulate.HARD_SOURCE_MAGNITUDE[1]
    assert simulate.HARD_SOURCE_R_SERSIC[0] <= r["source_R_sersic"] <= simulate.HARD_SOURCE_R_SERSIC[1]
    assert simulate.HARD_SOURCE_N_SERSIC[0] <= r["source_n_sersic"] <= simulate.HARD_SOURCE_N_SERSIC[1]
    mass = read_lens_file(hard_dataset / r["file"]).axion_mass
    assert r["axion_mass_ev"] == mass  # None for no_sub and cdm
  # The Einstein radii span a good part of the sqrt(10) range even in 9 images.
  radii = [r["theta_E"] for r in rows]
  assert max(radii) / min(radii) > 1.5


def test_model_ii_main_lens_is_fixed(dataset):
  rows = simulate.read_parameters(dataset)
  for key in _MAIN_LENS + _SOURCE:
    assert len({r[key] for r in rows}) == 1, key
  assert rows[0]["theta_E"] == simulate.einstein_radius(simulate.MAIN_LENS_MASS)
  assert all(r["noise_seed"] is None for r in rows)
  assert len({(r["source_center_x"], r["source_center_y"]) for r in rows}) == len(rows)


def test_recorded_parameters_are_those_the_images_were_made_from(hard_dataset):
  # The rows are the draws that made each file: re-simulating from the same draws
  # gives the file's bytes, and the ring measured in the file follows the recorded theta_E.
  from scipy import stats  # pylint: disable=g-import-not-at-top
  rows = simulate.read_parameters(hard_dataset)
  for r in rows:
    params = simulate.draw_parameters(r["class"], simulate.image_rng(0, r["class"], r["index"]),
                                      variant="hard")
    assert {k: r[k] for k in params.row} == params.row
  r = rows[0]
  params = simulate.draw_parameters(r["class"], simulate.image_rng(0, r["class"], r["index"]),
                                    variant="hard")
  np.testing.assert_array_equal(simulate.render(params),
                                read_lens_file(hard_dataset / r["file"]).image)
  radii = [_ring_radius(read_lens_file(hard_dataset / r["file"]).image) for r in rows]
  assert stats.spearmanr([r["theta_E"] for r in rows], radii)[0] > 0.8


def test_hard_images_carry_noise():
  params = simulate.draw_parameters("no_sub", np.random.default_rng(3), variant="hard")
  assert params.noise_seed is not None
  noisy = simulate.render(params)
  clean = simulate.render(dataclasses.replace(params, noise_seed=None))
  assert not np.array_equal(noisy, clean)
  # Noise, not a different image: the two agree to a few per cent of the peak.
  assert np.abs(noisy - clean).mean() < 0.05


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
  with pytest.raises(ValueError, match="variant"):
    simulate.generate(tmp_path, 1, progress=False, variant="wdm")
  with pytest.raises(ValueError, match="variant"):
    simulate.simulate_image("cdm", np.random.default_rng(0), variant="easy")


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
  assert simulate.main(["--out", str(tmp_path / "cli"), "--per_class", "1", "--variant", "hard",
                        "--workers", "1", "--no_progress"]) == 2
  assert simulate.main(["--out", str(tmp_path / "cli_hard"), "--per_class", "1",
                        "--variant", "hard", "--workers", "1", "--no_progress"]) == 0
  assert "variant hard" in capsys.readouterr().out
  assert json.loads((tmp_path / "cli_hard" / simulate.MANIFEST_NAME).read_text())["variant"] == "hard"


def test_every_image_is_re_rendered_exactly_from_its_recorded_row(variant_dataset):
  # params.csv alone (no generator) remakes every file: main lens, source, noise seed,
  # each subhalo's mass and position and each vortex element.
  variant, dataset = variant_dataset
  rows = simulate.read_parameters(dataset)
  assert len(rows) == 3 * PER_CLASS
  for r in rows:
    assert (r["point_masses"] is None) == (r["class"] == "no_sub")
    if r["class"] == "cdm":
      assert len(r["point_masses"]) == simulate.CDM_NUM_SUBHALOS
      masses = [m for m, _, _ in r["point_masses"]]
      assert simulate.CDM_MASS_MIN <= min(masses) and max(masses) <= simulate.CDM_MASS_MAX
      radii = [np.hypot(x, y) for _, x, y in r["point_masses"]]
      assert simulate.CDM_R_MIN <= min(radii) and max(radii) <= simulate.CDM_R_MAX
    if r["class"] == "axion":
      assert len(r["point_masses"]) == simulate.AXION_VORTEX_POINTS
      assert r["vortex_half_length"] == pytest.approx(
          simulate.AXION_VORTEX_SCALE / r["axion_mass_ev"])
      x, y = r["point_masses"][-1][1:]   # the far end lies at +half-length along the angle
      assert (x, y) == pytest.approx((r["vortex_half_length"] * np.cos(r["vortex_angle"]),
                                      r["vortex_half_length"] * np.sin(r["vortex_angle"])))
    else:
      assert r["vortex_angle"] is None and r["vortex_half_length"] is None
    np.testing.assert_array_equal(simulate.render(simulate.parameters_from_row(r)),
                                  read_lens_file(dataset / r["file"]).image,
                                  err_msg=f"{variant}: {r['file']}")


def test_substructure_variant_draws_lens_per_image_and_keeps_the_model_ii_source(
    substructure_dataset):
  rows = simulate.read_parameters(substructure_dataset)
  for key in _MAIN_LENS + ("noise_seed",):
    assert len({r[key] for r in rows}) == len(rows), key
  for key, value in (("source_magnitude", simulate.SOURCE_MAGNITUDE),
                     ("source_R_sersic", simulate.SOURCE_R_SERSIC),
                     ("source_n_sersic", simulate.SOURCE_N_SERSIC)):
    assert {r[key] for r in rows} == {value}, key
  lo, hi = simulate.HARD_LOG10_HALO_MASS
  assert all(lo <= np.log10(r["halo_mass_msun"]) <= hi for r in rows)


def test_source_spread_dial_runs_from_model_ii_to_hard_ranges():
  top = simulate.SOURCE_SPREAD_MAX
  assert simulate.source_ranges(0) == {
      "magnitude": (simulate.SOURCE_MAGNITUDE,) * 2, "R_sersic": (simulate.SOURCE_R_SERSIC,) * 2,
      "n_sersic": (simulate.SOURCE_N_SERSIC,) * 2}
  hard = {"magnitude": simulate.HARD_SOURCE_MAGNITUDE, "R_sersic": simulate.HARD_SOURCE_R_SERSIC,
          "n_sersic": simulate.HARD_SOURCE_N_SERSIC}
  for key, value in simulate.source_ranges(top).items():
    assert value == pytest.approx(hard[key]), key
  for level in range(top):   # nested: each level's ranges hold the previous level's
    for (lo, hi), (lo2, hi2) in zip(simulate.source_ranges(level).values(),
                                    simulate.source_ranges(level + 1).values()):
      assert lo2 <= lo <= hi <= hi2 and (lo2, hi2) != (lo, hi)
  # Every level uses the same draws: the lens and the substructure do not move.
  first, last = (simulate.draw_parameters("cdm", simulate.image_rng(0, "cdm", 4),
                                          variant="substructure", source_spread=s)
                 for s in (0, top))
  assert first.kwargs_lens == last.kwargs_lens and first.noise_seed == last.noise_seed
  assert last.row["source_magnitude"] >= first.row["source_magnitude"]
  # The top level draws hard's images: the same lens, source, noise and substructure.
  hard = simulate.draw_parameters("cdm", simulate.image_rng(0, "cdm", 4), variant="hard")
  assert hard.kwargs_lens == last.kwargs_lens and hard.noise_seed == last.noise_seed
  assert hard.kwargs_source_mag[0] == pytest.approx(last.kwargs_source_mag[0])


def test_source_spread_levels_are_monotone_in_difficulty():
  # On a small set, the substructure's signal-to-noise falls level by level (fainter,
  # more varied sources), and with no substructure there is no signal at all.
  medians = []
  for level in range(simulate.SOURCE_SPREAD_MAX + 1):
    snr = [simulate.substructure_snr(simulate.draw_parameters(
        c, simulate.image_rng(0, c, i), variant="substructure", source_spread=level))
           for c in ("cdm", "axion") for i in range(8)]
    medians.append(float(np.median(snr)))
  assert all(a > b for a, b in zip(medians, medians[1:])), medians
  assert simulate.substructure_snr(simulate.draw_parameters(
      "no_sub", simulate.image_rng(0, "no_sub", 0), variant="substructure")) == 0.0


def test_substructure_snr_is_the_noise_weighted_norm_of_the_substructure():
  params = simulate.draw_parameters("cdm", np.random.default_rng(7), variant="substructure")
  snr = simulate.substructure_snr(params)
  # Ten times the subhalo masses: a stronger signal.
  heavier = dataclasses.replace(params, kwargs_lens=params.kwargs_lens[:2] + [
      {**k, "theta_E": k["theta_E"] * np.sqrt(10.0)} for k in params.kwargs_lens[2:]])
  assert 0 < snr < simulate.substructure_snr(heavier)


def test_source_spread_is_checked_and_part_of_the_folder(tmp_path, substructure_dataset):
  with pytest.raises(ValueError, match="substructure variant only"):
    simulate.generate(tmp_path / "x", 1, progress=False, variant="hard", source_spread=1)
  with pytest.raises(ValueError, match="source_spread"):
    simulate.draw_parameters("cdm", np.random.default_rng(0), variant="substructure",
                             source_spread=simulate.SOURCE_SPREAD_MAX + 1)
  before = _snapshot(substructure_dataset)
  with pytest.raises(simulate.SimulationMismatchError, match="source_spread=2"):
    simulate.generate(substructure_dataset, PER_CLASS, seed=0, workers=1, progress=False,
                      variant="substructure", source_spread=2)
  assert _snapshot(substructure_dataset) == before
  assert simulate.main(["--out", str(tmp_path / "cli"), "--per_class", "1", "--variant",
                        "hard", "--source_spread", "1", "--workers", "1", "--no_progress"]) == 2


def test_an_older_parameters_table_is_rewritten_with_todays_columns(tmp_path):
  root = tmp_path / "old"
  simulate.generate(root, 1, seed=0, workers=1, progress=False)
  table = root / simulate.PARAMS_NAME
  current = table.read_bytes()
  lines = current.decode().splitlines()   # drop the three newest columns, as older tables had
  table.write_text("\n".join(",".join(line.split(",")[:18]) for line in lines) + "\n")
  assert simulate.generate(root, 1, seed=0, workers=1, progress=False) == dict.fromkeys(
      CLASS_NAMES, 0)
  assert table.read_bytes() == current
