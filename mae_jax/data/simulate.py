"""Simulator of the DeepLense "Model II" strong-lensing dataset.

Reproduces the recipe of DeepLenseSim (M. Toomey, built on lenstronomy) for
Euclid-VIS-like 64x64 images of a galaxy-scale lens with three classes of
substructure: none (`no_sub`), CDM point-mass subhalos (`cdm`) and an axion
vortex (`axion`). Files are written in exactly the released DeepLense layout
(see `layout.py`) with `npy_io.write_lens_file`, so readers cannot tell a
simulated folder from a downloaded one.

Three variants (`--variant`):

- `model_ii` (default): exactly the DeepLense recipe. The main lens is the same
  in every image (fixed Einstein radius, ellipticity and shear); only the source
  position varies. Substructure adds 3-4% of the lens mass, which shifts the
  ring's radial profile, so the classes can be told apart from the total mass
  alone (see `mae_jax/eval/baseline.py`).
- `hard`: per image, the main-lens halo mass (log-uniform over a decade, so the
  Einstein radius varies by sqrt(10)), its ellipticity and the external shear
  (modulus and orientation), and the source magnitude, size and Sersic index
  are drawn, and Euclid VIS background + Poisson noise (lenstronomy's noise
  model of the same instrument) is always added. The ranges are `HARD_*` below,
  recorded in simulation.json.
- `substructure`: the benchmark where substructure itself is the signal. The main
  lens, shear and noise are drawn as in `hard` (so total mass and ring radius say
  nothing about the class), and the source's spread is a dial, `--source_spread`
  0..3: level 0 is the Model II source (magnitude 20, R_sersic 0.25", n 1); each
  level widens magnitude, radius and Sersic index a third of the way toward
  `hard`'s ranges (level 3: `hard`'s source). Every image at every level uses the
  same uniform draws, so a higher level only moves each source toward fainter,
  more varied ones.

Every image draws from its own generator seeded by (seed, class index, image
index), and its file name is derived from the same triple, so a run gives
byte-identical files whatever the worker count or order, and an interrupted run
can be resumed by simulating only the files that are missing. Each image's
drawn parameters are recorded in `params.csv` beside the class folders, every
subhalo's mass and position and the vortex geometry included, so an image can
be re-rendered from its row alone (`parameters_from_row`). The rows are re-drawn
from the same generators (no image is rendered for that), so the table is the
same however the folder was made. `substructure_snr` says how far above the
noise an image's substructure lies.

Usage:
  python -m mae_jax.data.simulate --out DIR --per_class N [--seed S]
      [--variant model_ii|hard|substructure] [--source_spread 0..3] [--workers W]
      [--noise]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import dataclasses
import functools
import io
import json
import math
import multiprocessing
import os
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mae_jax.runtime import errors
from mae_jax.runtime import fileio
from mae_jax.data.layout import CLASS_NAMES
from mae_jax.data.npy_io import write_lens_file

# --- The recipe (DeepLense Model II). Recorded verbatim in simulation.json. ---

# Cosmology (astropy FlatLambdaCDM) and redshifts.
H0 = 70.0
OM0 = 0.3
OB0 = 0.05
Z_LENS = 0.5
Z_SOURCE = 1.0
# Redshift at which lenstronomy's multi-plane deflections are normalised.
# Kept from the original code: it makes the effective ring smaller than
# `einstein_radius` (the source sits at z=1.0, not 2.5).
Z_SOURCE_CONVENTION = 2.5
# The original code converts radians to arcsec with this rounded constant.
ARCSEC_PER_RAD = 206265.0

# Instrument: lenstronomy's Euclid VIS configuration.
NUM_PIX = 64
PIXEL_SCALE = 0.101  # arcsec; what Euclid(band='VIS') gives, checked at run time.
EUCLID_BAND = "VIS"
EUCLID_PSF_TYPE = "GAUSSIAN"
EUCLID_COADD_YEARS = 6

# Main lens: SIE plus external shear.
MAIN_LENS_MASS = 1e12  # M_sun
MAIN_LENS_E1 = 0.1
MAIN_LENS_E2 = 0.0
SHEAR_GAMMA1 = 0.05
SHEAR_GAMMA2 = 0.0

# Source: elliptical Sersic at a random position.
SOURCE_MAGNITUDE = 20.0
SOURCE_R_SERSIC = 0.25
SOURCE_N_SERSIC = 1.0
SOURCE_E1 = -0.1
SOURCE_E2 = 0.1
SOURCE_CENTER_MAX = 0.35  # center_x, center_y ~ U[-max, max] arcsec

# CDM: point-mass subhalos with dN/dm ∝ m^beta.
CDM_NUM_SUBHALOS = 25
CDM_MASS_MIN = 1e6
CDM_MASS_MAX = 1e10
CDM_MASS_SLOPE = -0.9
CDM_R_MIN = 0.25  # arcsec
CDM_R_MAX = 2.0

# Axion: straight vortex of point masses through the image centre.
AXION_LOG10_MASS_MIN = -24.0  # eV
AXION_LOG10_MASS_MAX = -22.0
AXION_VORTEX_MASS = 3e10  # M_sun, total
AXION_VORTEX_POINTS = 100
AXION_VORTEX_SCALE = 0.03e-22  # half-length lambda = scale / m_a, in arcsec

# --- The hard variant: per-image draws (recorded in simulation.json). ---
# Main-lens halo mass, log10 uniform over a decade around the Model II 1e12:
# Einstein radius 0.72"-2.28" (Model II: 1.28").
HARD_LOG10_HALO_MASS = (11.5, 12.5)
# SIE ellipticity modulus |e| ~ U[0, 0.2] (axis ratio q >= 0.67) and position
# angle phi ~ U[0, pi): e1 = |e| cos 2phi, e2 = |e| sin 2phi (Model II: 0.1, 0).
HARD_LENS_ELLIPTICITY_MAX = 0.2
# External shear modulus ~ U[0, 0.1], orientation as the ellipticity (Model II: 0.05, 0).
HARD_SHEAR_MAX = 0.1
# Source: magnitude, half-light radius (arcsec) and Sersic index, each uniform.
HARD_SOURCE_MAGNITUDE = (20.0, 23.0)
HARD_SOURCE_R_SERSIC = (0.1, 0.5)
HARD_SOURCE_N_SERSIC = (0.5, 4.0)

# --- The substructure variant: hard's lens, shear and noise; the source on a dial. ---
# Level 0 is the Model II source; level SOURCE_SPREAD_MAX is hard's ranges.
SOURCE_SPREAD_MAX = 3

VARIANTS = ("model_ii", "hard", "substructure")

MANIFEST_NAME = "simulation.json"
MANIFEST_FORMAT = "deeplense-model-ii-sim/1"
PARAMS_NAME = "params.csv"
# Columns of params.csv: one row per image, classes in CLASS_NAMES order, then by index.
PARAMS_COLUMNS = (
    "file", "class", "index", "halo_mass_msun", "theta_E", "lens_e1", "lens_e2",
    "shear_gamma1", "shear_gamma2", "source_magnitude", "source_R_sersic",
    "source_n_sersic", "source_e1", "source_e2", "source_center_x", "source_center_y",
    "axion_mass_ev", "noise_seed", "point_masses", "vortex_angle", "vortex_half_length")
# Cells holding JSON: point_masses is [[mass_msun, x_arcsec, y_arcsec], ...] (cdm subhalos,
# axion vortex elements), empty for no_sub.
_JSON_COLUMNS = ("point_masses",)

# Mixed into the name seed so names and image randomness use different streams.
_NAME_STREAM = 0x6E616D65  # "name"


def _check_variant(variant: str) -> str:
  if variant not in VARIANTS:
    raise ValueError(f"unknown simulation variant {variant!r}; expected one of "
                     f"{', '.join(VARIANTS)}")
  return variant


def _check_spread(variant: str, source_spread: int) -> int:
  if isinstance(source_spread, bool) or not isinstance(source_spread, (int, np.integer)) \
      or not 0 <= source_spread <= SOURCE_SPREAD_MAX:
    raise ValueError(f"source_spread must be an integer in [0, {SOURCE_SPREAD_MAX}], "
                     f"got {source_spread!r}")
  if source_spread and variant != "substructure":
    raise ValueError(f"source_spread={source_spread} applies to the substructure variant "
                     f"only, not {variant!r}")
  return int(source_spread)


def source_ranges(source_spread: int) -> dict[str, tuple[float, float]]:
  """The substructure variant's source ranges at dial level `source_spread`.

  Each of magnitude, R_sersic (arcsec) and Sersic index is uniform on
  [v0 + f (lo - v0), v0 + f (hi - v0)] with v0 the Model II value, (lo, hi)
  `hard`'s range and f = level / SOURCE_SPREAD_MAX: one value at level 0,
  `hard`'s range at the top level, nested ranges in between.
  """
  f = _check_spread("substructure", source_spread) / SOURCE_SPREAD_MAX
  out = {}
  for name, v0, (lo, hi) in (("magnitude", SOURCE_MAGNITUDE, HARD_SOURCE_MAGNITUDE),
                             ("R_sersic", SOURCE_R_SERSIC, HARD_SOURCE_R_SERSIC),
                             ("n_sersic", SOURCE_N_SERSIC, HARD_SOURCE_N_SERSIC)):
    out[name] = (v0 + f * (lo - v0), v0 + f * (hi - v0))
  return out


def recipe(variant: str = "model_ii", source_spread: int = 0) -> dict[str, Any]:
  """All recipe numbers of `variant`, as recorded in simulation.json (JSON types only).

  `model_ii` gives the recipe as recorded before variants existed, so folders
  made then are still accepted. `hard` replaces the fixed main lens and source
  by the ranges each image draws from, and records the always-on noise.
  `substructure` is `hard` with the source ranges of dial level `source_spread`.
  """
  base = _model_ii_recipe()
  source_spread = _check_spread(_check_variant(variant), source_spread)
  if variant == "model_ii":
    return base
  hard = _hard_recipe(base)
  if variant == "hard":
    return hard
  ranges = source_ranges(source_spread)
  return {
      **hard,
      "model": ("DeepLense Model II recipe, substructure variant: main lens and shear "
                "drawn per image as in hard, Euclid noise, source spread on a dial"),
      "variant": "substructure",
      "source_spread": source_spread,
      "source": {
          "model": "SERSIC_ELLIPSE",
          "magnitude_uniform": list(ranges["magnitude"]),
          "R_sersic_uniform": list(ranges["R_sersic"]),
          "n_sersic_uniform": list(ranges["n_sersic"]),
          "e1": SOURCE_E1, "e2": SOURCE_E2,
          "center_uniform": [-SOURCE_CENTER_MAX, SOURCE_CENTER_MAX],
          "dial": (f"level L in 0..{SOURCE_SPREAD_MAX}: each range is v0 + L/"
                   f"{SOURCE_SPREAD_MAX} (hard range - v0), v0 the Model II value; "
                   "the same uniform draws at every level")},
  }


def _hard_recipe(base: dict[str, Any]) -> dict[str, Any]:
  """The hard recipe: Model II with the per-image ranges and the noise."""
  return {
      **base,
      "model": ("DeepLense Model II recipe, hard variant: main lens, shear and "
                "source drawn per image, Euclid noise"),
      "variant": "hard",
      "main_lens": {
          "models": ["SIE", "SHEAR"],
          "log10_mass_msun_uniform": list(HARD_LOG10_HALO_MASS),
          "theta_E_arcsec_range": [einstein_radius(10.0**m) for m in HARD_LOG10_HALO_MASS],
          "ellipticity_modulus_uniform": [0.0, HARD_LENS_ELLIPTICITY_MAX],
          "ellipticity_angle_uniform": [0.0, math.pi],
          "ellipticity": "e1 = |e| cos(2 phi), e2 = |e| sin(2 phi)",
          "center": [0.0, 0.0],
          "shear_modulus_uniform": [0.0, HARD_SHEAR_MAX],
          "shear_angle_uniform": [0.0, math.pi],
          "shear": "gamma1 = |g| cos(2 phi), gamma2 = |g| sin(2 phi)"},
      "source": {
          "model": "SERSIC_ELLIPSE",
          "magnitude_uniform": list(HARD_SOURCE_MAGNITUDE),
          "R_sersic_uniform": list(HARD_SOURCE_R_SERSIC),
          "n_sersic_uniform": list(HARD_SOURCE_N_SERSIC),
          "e1": SOURCE_E1, "e2": SOURCE_E2,
          "center_uniform": [-SOURCE_CENTER_MAX, SOURCE_CENTER_MAX]},
      "noise": ("always: lenstronomy SimAPI.noise_for_model of the instrument above "
                "(sky background and read noise of the co-added exposures, plus "
                "Poisson noise of the lensed source), seeded per image"),
      "per_image_parameters": PARAMS_NAME,
  }


def _model_ii_recipe() -> dict[str, Any]:
  """The Model II recipe (unchanged since the first simulator, so old manifests match)."""
  return {
      "model": "DeepLense Model II (DeepLenseSim recipe)",
      "cosmology": {"name": "FlatLambdaCDM", "H0": H0, "Om0": OM0, "Ob0": OB0},
      "z_lens": Z_LENS,
      "z_source": Z_SOURCE,
      "z_source_convention": Z_SOURCE_CONVENTION,
      "einstein_radius": ("sqrt(4 G M / c^2 * (D_S - D_L) / (D_L * D_S)) * "
                          "206265 with luminosity distances D_L, D_S"),
      "arcsec_per_rad": ARCSEC_PER_RAD,
      "instrument": {"name": "Euclid", "band": EUCLID_BAND,
                     "psf_type": EUCLID_PSF_TYPE,
                     "coadd_years": EUCLID_COADD_YEARS,
                     "num_pix": NUM_PIX, "pixel_scale": PIXEL_SCALE,
                     "point_source_supersampling_factor": 1},
      "main_lens": {"models": ["SIE", "SHEAR"], "mass_msun": MAIN_LENS_MASS,
                    "e1": MAIN_LENS_E1, "e2": MAIN_LENS_E2,
                    "center": [0.0, 0.0],
                    "gamma1": SHEAR_GAMMA1, "gamma2": SHEAR_GAMMA2},
      "source": {"model": "SERSIC_ELLIPSE", "magnitude": SOURCE_MAGNITUDE,
                 "R_sersic": SOURCE_R_SERSIC, "n_sersic": SOURCE_N_SERSIC,
                 "e1": SOURCE_E1, "e2": SOURCE_E2,
                 "center_uniform": [-SOURCE_CENTER_MAX, SOURCE_CENTER_MAX]},
      "cdm": {"model": "POINT_MASS", "num_subhalos": CDM_NUM_SUBHALOS,
              "mass_range_msun": [CDM_MASS_MIN, CDM_MASS_MAX],
              "mass_slope": CDM_MASS_SLOPE,
              "radius_uniform": [CDM_R_MIN, CDM_R_MAX],
              "angle_uniform": [0.0, 2 * math.pi]},
      "axion": {"model": "POINT_MASS",
                "log10_mass_ev_uniform": [AXION_LOG10_MASS_MIN,
                                          AXION_LOG10_MASS_MAX],
                "vortex_mass_msun": AXION_VORTEX_MASS,
                "vortex_points": AXION_VORTEX_POINTS,
                # Half-length lambda = vortex_half_length_scale / m_a (arcsec).
                "vortex_half_length_scale": AXION_VORTEX_SCALE,
                "angle_uniform": [0.0, 2 * math.pi]},
      "scaling": "per-image min-max to [0, 1]",
  }


SimulationMismatchError = errors.SimulationMismatchError


# --- Physics ---------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _cosmology():
  """The recipe's astropy cosmology (built once per process)."""
  from astropy.cosmology import FlatLambdaCDM  # pylint: disable=import-outside-toplevel
  return FlatLambdaCDM(H0=H0, Om0=OM0, Ob0=OB0)


@functools.lru_cache(maxsize=None)
def _einstein_factor(z_lens: float, z_source: float) -> float:
  """sqrt(4 G M_sun / c^2 * D_LS / (D_L D_S)) * 206265 (arcsec per sqrt(M_sun)).

  D_L, D_S are *luminosity* distances, reproducing the original code.
  """
  from astropy import constants, units  # pylint: disable=import-outside-toplevel
  cosmo = _cosmology()
  d_l = cosmo.luminosity_distance(z_lens).to_value(units.m)
  d_s = cosmo.luminosity_distance(z_source).to_value(units.m)
  g = constants.G.to_value(units.m**3 / units.kg / units.s**2)
  c = constants.c.to_value(units.m / units.s)
  m_sun = constants.M_sun.to_value(units.kg)
  return math.sqrt(4 * g * m_sun / c**2 * (d_s - d_l) / (d_l * d_s)) * ARCSEC_PER_RAD


def einstein_radius(mass_msun: float | np.ndarray, z_lens: float = Z_LENS,
                    z_source: float = Z_SOURCE) -> float | np.ndarray:
  """Einstein radius in arcsec of point mass(es) `mass_msun` (solar masses).

  Uses the original DeepLenseSim formula (luminosity distances); ≈1.28" for
  1e12 M_sun at the default redshifts. Distances are computed once per
  (z_lens, z_source) and cached.

  Raises:
    ValueError: a negative or non-finite mass, or z_source <= z_lens.
  """
  if not z_source > z_lens >= 0:
    raise ValueError(f"need 0 <= z_lens < z_source, got z_lens={z_lens}, "
                     f"z_source={z_source}")
  mass = np.asarray(mass_msun, dtype=np.float64)
  if not np.all(np.isfinite(mass)) or np.any(mass < 0):
    raise ValueError("masses must be finite and non-negative (solar masses)")
  radius = _einstein_factor(float(z_lens), float(z_source)) * np.sqrt(mass)
  return float(radius) if radius.ndim == 0 else radius


@functools.lru_cache(maxsize=None)
def _kwargs_single_band() -> dict[str, Any]:
  """Euclid VIS instrument kwargs (once per process); checks the pixel scale."""
  from lenstronomy.SimulationAPI.ObservationConfig.Euclid import Euclid  # pylint: disable=import-outside-toplevel
  kwargs = Euclid(band=EUCLID_BAND, psf_type=EUCLID_PSF_TYPE,
                  coadd_years=EUCLID_COADD_YEARS).kwargs_single_band()
  if not math.isclose(kwargs["pixel_scale"], PIXEL_SCALE):
    raise RuntimeError(f"lenstronomy's Euclid VIS pixel scale is "
                       f"{kwargs['pixel_scale']}\", the recipe needs {PIXEL_SCALE}\"")
  return kwargs


@functools.lru_cache(maxsize=None)
def _image_model(num_point_masses: int):
  """(SimAPI, ImageModel) for the main lens plus `num_point_masses` point masses.

  The model lists depend only on the class (its number of point masses), not on
  an image's parameters, so each worker builds these once per class.
  """
  from lenstronomy.SimulationAPI.sim_api import SimAPI  # pylint: disable=import-outside-toplevel
  lens_models = ["SIE", "SHEAR"] + ["POINT_MASS"] * num_point_masses
  kwargs_model = {
      "lens_model_list": lens_models,
      "lens_redshift_list": [Z_LENS] * len(lens_models),
      "source_light_model_list": ["SERSIC_ELLIPSE"],
      "source_redshift_list": [Z_SOURCE],
      "cosmo": _cosmology(),
      "z_source_convention": Z_SOURCE_CONVENTION,
      "z_source": Z_SOURCE,
  }
  with warnings.catch_warnings():
    # "Cosmology is provided ...": intended, we pass the recipe's cosmology.
    warnings.filterwarnings("ignore", message="Cosmology is provided")
    sim = SimAPI(NUM_PIX, _kwargs_single_band(), kwargs_model)
    image_model = sim.image_model_class({"point_source_supersampling_factor": 1})
  return sim, image_model


def _point_masses(masses: np.ndarray, x: np.ndarray,
                  y: np.ndarray) -> list[dict[str, float]]:
  """POINT_MASS lens kwargs for masses (M_sun) at positions (x, y) arcsec."""
  theta_e = einstein_radius(masses)
  return [{"theta_E": float(t), "center_x": float(cx), "center_y": float(cy)}
          for t, cx, cy in zip(theta_e, x, y)]


PointMasses = tuple[np.ndarray, np.ndarray, np.ndarray]   # masses (M_sun), x, y (arcsec)


def _cdm_subhalos(rng: np.random.Generator) -> PointMasses:
  """25 point masses, dN/dm ∝ m^-0.9 on [1e6, 1e10], r ~ U[0.25, 2]"."""
  p = CDM_MASS_SLOPE + 1
  lo, hi = CDM_MASS_MIN**p, CDM_MASS_MAX**p
  masses = (lo + (hi - lo) * rng.uniform(size=CDM_NUM_SUBHALOS))**(1 / p)
  r = rng.uniform(CDM_R_MIN, CDM_R_MAX, size=CDM_NUM_SUBHALOS)
  th = rng.uniform(0, 2 * np.pi, size=CDM_NUM_SUBHALOS)
  return masses, r * np.sin(th), r * np.cos(th)


def _axion_vortex(rng: np.random.Generator) -> tuple[PointMasses, float, float, float]:
  """A straight vortex of 100 point masses through the centre.

  Returns:
    (its point masses, the axion mass in eV, the vortex angle in radians, its
    half-length in arcsec).
  """
  axion_mass = 10.0**rng.uniform(AXION_LOG10_MASS_MIN, AXION_LOG10_MASS_MAX)
  phi = rng.uniform(0, 2 * np.pi)
  half_length = AXION_VORTEX_SCALE / axion_mass
  t = np.linspace(-half_length, half_length, AXION_VORTEX_POINTS)
  masses = np.full(AXION_VORTEX_POINTS, AXION_VORTEX_MASS / AXION_VORTEX_POINTS)
  return ((masses, t * np.cos(phi), t * np.sin(phi)), float(axion_mass), float(phi),
          float(half_length))


def _min_max(image: np.ndarray) -> np.ndarray:
  """Scales to [0, 1]; a constant image becomes all zeros (not NaN)."""
  if not np.all(np.isfinite(image)):
    raise FloatingPointError("lenstronomy returned non-finite pixels")
  lo, hi = float(image.min()), float(image.max())
  if hi <= lo:
    return np.zeros_like(image, dtype=np.float64)
  return np.clip((image - lo) / (hi - lo), 0.0, 1.0).astype(np.float64, copy=False)


@dataclasses.dataclass(frozen=True)
class ImageParameters:
  """Everything one image is made from: what `draw_parameters` drew.

  Attributes:
    class_name: the image's class.
    row: the recorded scalars (the PARAMS_COLUMNS other than file, class and
      index), as written to params.csv.
    kwargs_lens: lenstronomy lens kwargs: main SIE, shear, then the point masses.
    kwargs_source_mag: the source's SERSIC_ELLIPSE kwargs with a magnitude.
    noise_seed: the seed of lenstronomy's noise realisation, None without noise.
    axion_mass: eV, None for no_sub and cdm.
  """
  class_name: str
  row: dict[str, float | int | None]
  kwargs_lens: list[dict[str, float]]
  kwargs_source_mag: list[dict[str, float]]
  noise_seed: int | None
  axion_mass: float | None


def _polar(modulus: float, angle: float) -> tuple[float, float]:
  """(e1, e2) of an ellipticity or shear of `modulus` at position angle `angle`."""
  return float(modulus * math.cos(2 * angle)), float(modulus * math.sin(2 * angle))


def draw_parameters(class_name: str, rng: np.random.Generator, noise: bool = False,
                    variant: str = "model_ii", source_spread: int = 0) -> ImageParameters:
  """Draws the parameters of one image of `class_name` from `rng`.

  Draw order is fixed per variant. `model_ii` (as the original code): source
  position, then substructure, then the noise seed (only with `noise`).
  `hard`: halo mass, lens ellipticity modulus and angle, shear modulus and
  angle, source magnitude, radius, Sersic index and position, the noise seed
  (noise is always on), then substructure. `substructure`: as `hard`, with the
  source's magnitude, radius and index mapped from their uniform draws into
  `source_ranges(source_spread)`. So the same `rng` state gives the same main
  lens and source in every class (and, in `substructure`, at every level).

  Raises:
    ValueError: unknown `class_name` or `variant`, or a `source_spread` out of
      range or given to another variant.
    TypeError: `rng` is not a numpy Generator.
  """
  if class_name not in CLASS_NAMES:
    raise ValueError(f"unknown class {class_name!r}; expected one of "
                     f"{', '.join(CLASS_NAMES)}")
  source_spread = _check_spread(_check_variant(variant), source_spread)
  if not isinstance(rng, np.random.Generator):
    raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")

  noise_seed = None
  if variant == "substructure":
    halo_mass = 10.0**rng.uniform(*HARD_LOG10_HALO_MASS)
    lens_e1, lens_e2 = _polar(rng.uniform(0.0, HARD_LENS_ELLIPTICITY_MAX),
                              rng.uniform(0.0, math.pi))
    gamma1, gamma2 = _polar(rng.uniform(0.0, HARD_SHEAR_MAX), rng.uniform(0.0, math.pi))
    ranges = source_ranges(source_spread)
    magnitude, r_sersic, n_sersic = (
        float(lo + (hi - lo) * u) for (lo, hi), u in zip(
            (ranges["magnitude"], ranges["R_sersic"], ranges["n_sersic"]), rng.uniform(size=3)))
    center_x, center_y = rng.uniform(-SOURCE_CENTER_MAX, SOURCE_CENTER_MAX, size=2)
    noise_seed = int(rng.integers(0, 2**32))
  elif variant == "hard":
    halo_mass = 10.0**rng.uniform(*HARD_LOG10_HALO_MASS)
    lens_e1, lens_e2 = _polar(rng.uniform(0.0, HARD_LENS_ELLIPTICITY_MAX),
                              rng.uniform(0.0, math.pi))
    gamma1, gamma2 = _polar(rng.uniform(0.0, HARD_SHEAR_MAX), rng.uniform(0.0, math.pi))
    magnitude = float(rng.uniform(*HARD_SOURCE_MAGNITUDE))
    r_sersic = float(rng.uniform(*HARD_SOURCE_R_SERSIC))
    n_sersic = float(rng.uniform(*HARD_SOURCE_N_SERSIC))
    center_x, center_y = rng.uniform(-SOURCE_CENTER_MAX, SOURCE_CENTER_MAX, size=2)
    noise_seed = int(rng.integers(0, 2**32))  # np.random.RandomState's range
  else:
    halo_mass, lens_e1, lens_e2 = MAIN_LENS_MASS, MAIN_LENS_E1, MAIN_LENS_E2
    gamma1, gamma2 = SHEAR_GAMMA1, SHEAR_GAMMA2
    magnitude, r_sersic, n_sersic = SOURCE_MAGNITUDE, SOURCE_R_SERSIC, SOURCE_N_SERSIC
    center_x, center_y = rng.uniform(-SOURCE_CENTER_MAX, SOURCE_CENTER_MAX, size=2)

  theta_e = einstein_radius(float(halo_mass))
  kwargs_lens = [
      {"theta_E": theta_e, "e1": lens_e1, "e2": lens_e2, "center_x": 0.0, "center_y": 0.0},
      {"gamma1": gamma1, "gamma2": gamma2},
  ]
  kwargs_source_mag = [{
      "magnitude": magnitude, "R_sersic": r_sersic, "n_sersic": n_sersic,
      "e1": SOURCE_E1, "e2": SOURCE_E2,
      "center_x": float(center_x), "center_y": float(center_y)}]
  axion_mass = vortex_angle = half_length = None
  point_masses = None
  if class_name == "cdm":
    point_masses = _cdm_subhalos(rng)
  elif class_name == "axion":
    point_masses, axion_mass, vortex_angle, half_length = _axion_vortex(rng)
  if point_masses is not None:
    kwargs_lens += _point_masses(*point_masses)
  if variant == "model_ii" and noise:
    noise_seed = int(rng.integers(0, 2**32))

  row = {"halo_mass_msun": float(halo_mass), "theta_E": theta_e,
         "lens_e1": lens_e1, "lens_e2": lens_e2,
         "shear_gamma1": gamma1, "shear_gamma2": gamma2,
         "source_magnitude": magnitude, "source_R_sersic": r_sersic,
         "source_n_sersic": n_sersic, "source_e1": SOURCE_E1, "source_e2": SOURCE_E2,
         "source_center_x": float(center_x), "source_center_y": float(center_y),
         "axion_mass_ev": axion_mass, "noise_seed": noise_seed,
         "point_masses": (None if point_masses is None else
                          [[float(m), float(x), float(y)] for m, x, y in zip(*point_masses)]),
         "vortex_angle": vortex_angle, "vortex_half_length": half_length}
  return ImageParameters(class_name, row, kwargs_lens, kwargs_source_mag, noise_seed,
                         axion_mass)


def _render_counts(params: ImageParameters, with_point_masses: bool = True) -> np.ndarray:
  """The noise-free image of `params` in the instrument's units (counts per second)."""
  kwargs_lens = params.kwargs_lens if with_point_masses else params.kwargs_lens[:2]
  sim, image_model = _image_model(len(kwargs_lens) - 2)
  _, kwargs_source, _ = sim.magnitude2amplitude(None, params.kwargs_source_mag, None)
  return np.asarray(image_model.image(kwargs_lens, kwargs_source, None), dtype=np.float64)


def render(params: ImageParameters) -> np.ndarray:
  """The image of `params`, scaled to [0, 1] (float64, (64, 64)).

  With a noise seed, lenstronomy's background + Poisson noise is added from it
  (global np.random state is neither used nor touched).
  """
  image = _render_counts(params)
  if params.noise_seed is not None:
    sim, _ = _image_model(len(params.kwargs_lens) - 2)
    image = image + sim.noise_for_model(model=image, seed=params.noise_seed)
  return _min_max(np.asarray(image, dtype=np.float64))


def substructure_snr(params: ImageParameters) -> float:
  """How far above the noise the substructure of `params` lies (0 for no_sub).

  The optimal (matched-filter) signal-to-noise ratio of the substructure when the
  smooth lens is known: sqrt(sum over pixels of (I_sub - I_smooth)^2 / sigma^2),
  with I_sub and I_smooth the noise-free images with and without the point masses
  and sigma the instrument's per-pixel noise (background, read and Poisson noise
  of I_smooth, lenstronomy's `estimate_noise`). It is the same whether or not the
  image was made with noise: it measures the signal against the noise Euclid would
  add. A classifier that has to infer the smooth lens from the image itself can do
  no better than this.
  """
  if len(params.kwargs_lens) == 2:
    return 0.0
  smooth = _render_counts(params, with_point_masses=False)
  diff = _render_counts(params) - smooth
  sim, _ = _image_model(0)
  sigma = np.asarray(sim.estimate_noise(smooth), dtype=np.float64)
  return float(np.sqrt(np.sum((diff / sigma)**2)))


def parameters_from_row(row: dict[str, Any]) -> ImageParameters:
  """The ImageParameters of a `read_parameters` row: an image re-rendered from its row
  alone (`render(parameters_from_row(row))`) is the image in its file."""
  kwargs_lens = [
      {"theta_E": row["theta_E"], "e1": row["lens_e1"], "e2": row["lens_e2"],
       "center_x": 0.0, "center_y": 0.0},
      {"gamma1": row["shear_gamma1"], "gamma2": row["shear_gamma2"]},
  ]
  if row.get("point_masses"):
    masses, x, y = (np.asarray(c, dtype=np.float64) for c in zip(*row["point_masses"]))
    kwargs_lens += _point_masses(masses, x, y)
  kwargs_source_mag = [{
      "magnitude": row["source_magnitude"], "R_sersic": row["source_R_sersic"],
      "n_sersic": row["source_n_sersic"], "e1": row["source_e1"], "e2": row["source_e2"],
      "center_x": row["source_center_x"], "center_y": row["source_center_y"]}]
  recorded = {k: row.get(k) for k in PARAMS_COLUMNS if k not in ("file", "class", "index")}
  return ImageParameters(row["class"], recorded, kwargs_lens, kwargs_source_mag,
                         row["noise_seed"], row["axion_mass_ev"])


def simulate_image(class_name: str, rng: np.random.Generator, noise: bool = False,
                   variant: str = "model_ii",
                   source_spread: int = 0) -> tuple[np.ndarray, float | None]:
  """Simulates one image of class `class_name` from `rng` (`draw_parameters`, `render`).

  `noise` adds lenstronomy's Euclid background + Poisson noise to a `model_ii`
  image; `hard` images always carry it.

  Returns:
    The image scaled to [0, 1] (float64, (64, 64)) and the axion mass in eV
    (None for no_sub and cdm).

  Raises:
    ValueError: `class_name` is not one of CLASS_NAMES, or an unknown variant.
  """
  params = draw_parameters(class_name, rng, noise=noise, variant=variant,
                           source_spread=source_spread)
  return render(params), params.axion_mass


# --- Files -----------------------------------------------------------------


def _class_index(class_name: str) -> int:
  try:
    return CLASS_NAMES.index(class_name)
  except ValueError:
    raise ValueError(f"unknown class {class_name!r}; expected one of "
                     f"{', '.join(CLASS_NAMES)}") from None


def _check_seed(seed: int) -> int:
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
  return int(seed)


def image_rng(seed: int, class_name: str, index: int) -> np.random.Generator:
  """The generator of image `index` of `class_name` in a run with `seed`."""
  return np.random.default_rng(
      np.random.SeedSequence([_check_seed(seed), _class_index(class_name), index]))


def image_path(out: str | os.PathLike[str], class_name: str, seed: int,
               index: int) -> Path:
  """Where image `index` of `class_name` of a run with `seed` is stored.

  `OUT/<class>/<class>_sim_<N>.npy` as in the released data, with the 128-bit
  N derived deterministically from (seed, class index, index).
  """
  entropy = [_check_seed(seed), _class_index(class_name), int(index), _NAME_STREAM]
  words = np.random.SeedSequence(entropy).generate_state(4, np.uint32)
  number = sum(int(w) << (32 * k) for k, w in enumerate(words))
  return Path(out) / class_name / f"{class_name}_sim_{number}.npy"


def _versions() -> dict[str, str]:
  import astropy  # pylint: disable=import-outside-toplevel
  import lenstronomy  # pylint: disable=import-outside-toplevel
  return {"lenstronomy": lenstronomy.__version__, "numpy": np.__version__,
          "astropy": astropy.__version__}


def _prepare_manifest(out: Path, seed: int, per_class: int, noise: bool,
                      variant: str, source_spread: int = 0) -> dict[str, Any]:
  """Checks `out` holds nothing made with other settings; returns the manifest.

  A manifest without `variant` (written before variants existed) is `model_ii`.

  Raises:
    SimulationMismatchError: `out` was made with another variant, seed, noise
      flag or recipe, or holds .npy files without a simulation.json.
  """
  settings = {"format": MANIFEST_FORMAT, "variant": variant, "seed": seed, "noise": noise,
              "recipe": json.loads(json.dumps(recipe(variant, source_spread)))}
  if variant == "substructure":   # other variants' manifests stay as they were
    settings["source_spread"] = source_spread
  path = out / MANIFEST_NAME
  previous = None
  if path.exists():
    try:
      previous = json.loads(path.read_text())
    except (OSError, ValueError) as e:
      raise SimulationMismatchError(f"{path} is unreadable ({e}); refusing to "
                                    "add images to this folder") from None
    if not isinstance(previous, dict):
      raise SimulationMismatchError(f"{path} is not a simulation manifest; "
                                    "refusing to add images to this folder")
    previous.setdefault("variant", "model_ii")
    diffs = [k for k in settings if previous.get(k) != settings[k]]
    if diffs:
      shown = {k: previous.get(k) for k in diffs if k != "recipe"}
      raise SimulationMismatchError(
          f"{out} holds a dataset simulated with other settings "
          f"(differs in: {', '.join(diffs)}; there: {shown or 'other recipe'}; "
          f"now: variant={variant}, seed={seed}, noise={noise}"
          + (f", source_spread={source_spread}" if variant == "substructure" else "")
          + "). Mixing them would corrupt the "
          "dataset: use another --out folder or the original settings.")
    if previous.get("versions") != _versions():
      warnings.warn(f"{out} was simulated with {previous.get('versions')}, "
                    f"now running {_versions()}; images may differ slightly.")
  else:
    stray = [name for name in CLASS_NAMES if (out / name).is_dir()
             and any(e.endswith(".npy") and not e.startswith(".")
                     for e in os.listdir(out / name))]
    if stray:
      raise SimulationMismatchError(
          f"{out} already holds .npy files ({', '.join(stray)}) but no "
          f"{MANIFEST_NAME}: not made by this simulator; use another --out folder.")
  return {**settings,
          "per_class": max(per_class, int((previous or {}).get("per_class", 0))),
          "class_names": list(CLASS_NAMES),
          "versions": (previous or {}).get("versions", _versions())}


def _simulate_chunk(out: str, seed: int, noise: bool, variant: str, source_spread: int,
                    jobs: Sequence[tuple[str, int]]) -> int:
  """Simulates and atomically writes the listed (class, index) images."""
  for class_name, index in jobs:
    image, axion_mass = simulate_image(class_name, image_rng(seed, class_name, index),
                                       noise=noise, variant=variant,
                                       source_spread=source_spread)
    write_lens_file(image_path(out, class_name, seed, index), image, axion_mass)
  return len(jobs)


def _format_cell(value: Any) -> str:
  """A params.csv cell: repr of floats (exact round trip), JSON of lists, '' for None."""
  if value is None:
    return ""
  if isinstance(value, list):
    return json.dumps(value, separators=(",", ":"))   # floats as repr: exact
  if isinstance(value, float):
    return repr(value)
  return str(value)


def parameters_table(out: str | os.PathLike[str], per_class: int, seed: int = 0,
                     noise: bool = False, variant: str = "model_ii",
                     source_spread: int = 0) -> bytes:
  """The params.csv of a folder of `per_class` images per class (its bytes).

  Rows are re-drawn with `draw_parameters` from each image's generator, so they
  are exactly what the images were made from, in a fixed order (class, index).
  """
  buffer = io.StringIO()
  writer = csv.writer(buffer, lineterminator="\n")
  writer.writerow(PARAMS_COLUMNS)
  for class_name in CLASS_NAMES:
    for index in range(per_class):
      params = draw_parameters(class_name, image_rng(seed, class_name, index), noise=noise,
                               variant=variant, source_spread=source_spread)
      path = image_path(out, class_name, seed, index)
      cells = {"file": f"{class_name}/{path.name}", "class": class_name, "index": index,
               **params.row}
      writer.writerow([_format_cell(cells[c]) for c in PARAMS_COLUMNS])
  return buffer.getvalue().encode()


def read_parameters(out: str | os.PathLike[str]) -> list[dict[str, Any]]:
  """The rows of a folder's params.csv: numbers as int / float, lists from their JSON,
  empty cells as None."""
  ints = ("index", "noise_seed")
  rows = []
  with open(Path(out) / PARAMS_NAME, newline="") as f:
    for raw in csv.DictReader(f):
      row = {}
      for key, text in raw.items():
        if key in ("file", "class"):
          row[key] = text
        elif text == "":
          row[key] = None
        elif key in _JSON_COLUMNS:
          row[key] = json.loads(text)
        else:
          row[key] = int(text) if key in ints else float(text)
      rows.append(row)
  return rows


def generate(out: str | os.PathLike[str], per_class: int, seed: int = 0,
             workers: int | None = None, noise: bool = False,
             progress: bool = True, variant: str = "model_ii",
             source_spread: int = 0) -> dict[str, int]:
  """Simulates `per_class` images per class of `variant` into `out` (DeepLense layout).

  Resumable: only missing files are simulated, each written atomically, so an
  interrupted run is finished by rerunning it, and a larger `per_class` extends
  a folder. Output is identical for a given seed whatever `workers` is.
  Workers are 'spawn'ed processes (safe with JAX/TF loaded in the parent);
  `workers=1` runs in this process. Once every image exists, params.csv
  records each image's parameters (rewritten atomically when images were added
  or the table is missing or has other columns). `hard` and `substructure` images
  always carry noise, so for them `noise` changes nothing.

  Returns:
    How many files were written now, per class.

  Raises:
    SimulationMismatchError: `out` holds a dataset made with other settings
      (another variant, seed or noise flag).
    ValueError: a negative per_class or seed, workers < 1, an unknown variant, or
      a source_spread out of range or given to another variant than substructure.
  """
  if isinstance(per_class, bool) or not isinstance(per_class, (int, np.integer)) \
      or per_class < 0:
    raise ValueError(f"per_class must be a non-negative integer, got {per_class!r}")
  seed = _check_seed(seed)
  variant = _check_variant(variant)
  source_spread = _check_spread(variant, source_spread)
  noise = bool(noise) or variant != "model_ii"
  workers = (os.cpu_count() or 1) if workers is None else int(workers)
  if workers < 1:
    raise ValueError(f"workers must be >= 1, got {workers}")
  out = Path(out)
  out.mkdir(parents=True, exist_ok=True)
  manifest = _prepare_manifest(out, seed, int(per_class), noise, variant, source_spread)
  manifest["complete"] = False
  fileio.write_json_atomic(out / MANIFEST_NAME, manifest)
  for class_name in CLASS_NAMES:
    (out / class_name).mkdir(exist_ok=True)

  # Index-major order keeps the classes balanced if a run is interrupted.
  jobs = [(c, i) for i in range(int(per_class)) for c in CLASS_NAMES
          if not image_path(out, c, seed, i).exists()]
  written = dict.fromkeys(CLASS_NAMES, 0)
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  with tqdm(total=len(jobs), unit="img", file=sys.stderr, disable=not progress or not jobs,
            desc="simulating", dynamic_ncols=True) as bar:
    if workers == 1 or len(jobs) <= 1:
      for job in jobs:
        _simulate_chunk(str(out), seed, noise, variant, source_spread, [job])
        written[job[0]] += 1
        bar.update(1)
    else:
      _run_pool(out, seed, noise, variant, source_spread, jobs, workers, written, bar)
  manifest["complete"] = all(image_path(out, c, seed, i).exists()
                             for i in range(manifest["per_class"]) for c in CLASS_NAMES)
  if manifest["complete"] and (any(written.values()) or not _table_current(out)):
    table = parameters_table(out, manifest["per_class"], seed=seed, noise=noise,
                             variant=variant, source_spread=source_spread)
    fileio.write_atomic(out / PARAMS_NAME, lambda f: f.write(table))
  manifest["parameters"] = PARAMS_NAME if (out / PARAMS_NAME).exists() else None
  fileio.write_json_atomic(out / MANIFEST_NAME, manifest)
  return written


def _ignore_sigint() -> None:
  # Ctrl-C reaches the whole process group: let the parent cancel pending
  # chunks and wait for running ones instead of every worker dying mid-write.
  signal.signal(signal.SIGINT, signal.SIG_IGN)


def _table_current(out: Path) -> bool:
  """Whether `out` has a params.csv with today's columns (older tables lack some)."""
  try:
    with open(out / PARAMS_NAME, newline="") as f:
      return next(csv.reader(f), None) == list(PARAMS_COLUMNS)
  except OSError:
    return False


def _run_pool(out: Path, seed: int, noise: bool, variant: str, source_spread: int,
              jobs: list[tuple[str, int]],
              workers: int, written: dict[str, int], bar) -> None:
  """Runs `jobs` in chunks on a pool of spawned processes, updating `bar`."""
  workers = min(workers, len(jobs))
  # Chunks of a few images amortise IPC yet keep the progress bar smooth.
  size = max(1, min(16, len(jobs) // (workers * 8)))
  chunks = [jobs[k:k + size] for k in range(0, len(jobs), size)]
  context = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(
      workers, mp_context=context, initializer=_ignore_sigint) as pool:
    futures = {pool.submit(_simulate_chunk, str(out), seed, noise, variant, source_spread,
                           chunk): chunk
               for chunk in chunks}
    try:
      for future in concurrent.futures.as_completed(futures):
        future.result()
        for class_name, _ in futures[future]:
          written[class_name] += 1
        bar.update(len(futures[future]))
    except BaseException:
      pool.shutdown(wait=True, cancel_futures=True)
      raise


# --- CLI -------------------------------------------------------------------


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="python -m mae_jax.data.simulate",
      description="Simulate the DeepLense Model II dataset (no_sub/cdm/axion) "
                  "in the DeepLense folder layout. Rerun to resume.")
  parser.add_argument("--variant", choices=VARIANTS, default="model_ii",
                      help="model_ii: the DeepLense recipe (fixed main lens); hard: main "
                           "lens, shear and source drawn per image, Euclid noise always on; "
                           "substructure: hard's lens, shear and noise, the source spread "
                           "set by --source_spread")
  parser.add_argument("--source_spread", type=int, default=0,
                      help=f"substructure only: 0 (the Model II source) to {SOURCE_SPREAD_MAX} "
                           "(hard's source ranges)")
  parser.add_argument("--out", required=True, help="output folder")
  parser.add_argument("--per_class", type=int, required=True,
                      help="images per class")
  parser.add_argument("--seed", type=int, default=0, help="dataset seed (>= 0)")
  parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                      help="worker processes (default: all cores)")
  parser.add_argument("--noise", action="store_true",
                      help="add Euclid background + Poisson noise (the original "
                           "Model II data has none; the hard variant always has it)")
  parser.add_argument("--no_progress", action="store_true",
                      help="hide the progress bar")
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  """Command-line entry point; prints a one-line summary."""
  args = _parse_args(argv)
  start = time.perf_counter()
  try:
    written = generate(args.out, args.per_class, seed=args.seed,
                       workers=args.workers, noise=args.noise,
                       progress=not args.no_progress, variant=args.variant,
                       source_spread=args.source_spread)
  except (SimulationMismatchError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("\ninterrupted; rerun the same command to resume.", file=sys.stderr)
    return 130
  elapsed = time.perf_counter() - start
  total = sum(written.values())
  counts = ", ".join(f"{n} {c}" for c, n in written.items())
  print(f"wrote {total} images ({counts}; {3 * args.per_class - total} already "
        f"present; variant {args.variant}) to {args.out} in {elapsed:.1f} s "
        f"({total / elapsed if elapsed > 0 else 0.0:.1f} images/s, "
        f"{args.workers} workers)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
