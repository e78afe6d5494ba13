"""The GPU machine's run, rehearsed here (docs/accelerator.md): the wheel set that travels
there (tools/accelerator/wheels.py) builds, is complete and small enough, installs without pip,
and the tiny accelerator run's two device commands, (A) `bench` and (B) `short`, pass
where TensorFlow, tfds, clu and torch cannot be imported and ml_collections, lenstronomy
and astropy come only from the unzipped wheels:

- under this environment's jax (the project's pin, the newest jax for this Python): (B), and
- under the device's own versions: a fresh Python 3.12 environment of
  tests/device_env/requirements.txt alone (jax 0.11.2), the wheel set beside it.

They need the package registry (to build the wheels and the Python 3.12 environment)
and are skipped, saying so, only where it cannot be reached.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow   # builds a Python 3.12 environment and runs the device commands

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools" / "accelerator"))

import wheels  # pylint: disable=g-import-not-at-top,wrong-import-position

HIDE = "tensorflow,tensorflow_datasets,clu,torch"
ONLY_FROM_WHEELS = "ml_collections,lenstronomy,astropy,erfa,astropy_iers_data"


def _fake_wheel(folder: Path, name: str, version: str, files: dict[str, str]) -> Path:
  path = folder / f"{name}-{version}-py3-none-any.whl"
  with zipfile.ZipFile(path, "w") as z:
    for arcname, text in files.items():
      z.writestr(arcname, text)
  return path


def test_install_unzips_wheels_without_pip(tmp_path):
  src = tmp_path / "whl"
  src.mkdir()
  _fake_wheel(src, "alpha", "1.0", {"alpha/__init__.py": "X = 1\n",
                                    "alpha-1.0.dist-info/METADATA": "Name: alpha\n",
                                    "alpha-1.0.data/purelib/alpha_extra.py": "Y = 2\n",
                                    "alpha-1.0.data/scripts/alpha": "#!/bin/sh\n"})
  target = tmp_path / "site"
  assert wheels.install(src, target) == ["alpha"]
  assert (target / "alpha" / "__init__.py").read_text() == "X = 1\n"
  assert (target / "alpha_extra.py").exists() and not (target / "alpha-1.0.data").exists()
  out = subprocess.run([sys.executable, "-c", "import alpha, alpha_extra; print(alpha.X)"],
                       env={**os.environ, "PYTHONPATH": str(target)}, capture_output=True,
                       text=True, check=True)
  assert out.stdout.strip() == "1"


def test_check_names_what_is_missing_extra_or_too_large(tmp_path):
  _fake_wheel(tmp_path, "alpha", "1.0", {"alpha/__init__.py": ""})
  _fake_wheel(tmp_path, "beta", "2.0", {"beta/__init__.py": ""})
  assert len(wheels.check(tmp_path, {"alpha": "1.0", "beta": "2.0"})) == 2
  with pytest.raises(SystemExit, match="gamma: want one wheel of 3.0, found none"):
    wheels.check(tmp_path, {"alpha": "1.0", "beta": "2.0", "gamma": "3.0"})
  with pytest.raises(SystemExit, match=r"wheels not in the set: \['beta'\]"):
    wheels.check(tmp_path, {"alpha": "1.0"})
  with pytest.raises(SystemExit, match="over the 1e-06 MiB limit"):
    wheels.check(tmp_path, {"alpha": "1.0", "beta": "2.0"}, limit_mb=1e-6)


def _registry_or_skip(tmp_path: Path) -> None:
  """Skips the test only when the package registry cannot be reached."""
  probe = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d",
                          str(tmp_path / "probe"), "ml-collections==" + wheels.WHEELS["ml-collections"]],
                         capture_output=True, text=True, timeout=300, check=False)
  if probe.returncode:
    pytest.skip("the package registry cannot be reached: " + probe.stderr.strip()[-300:])


@pytest.fixture(scope="module")
def wheel_site(tmp_path_factory):
  """The device's wheel set (Python 3.12, manylinux x86-64), built, checked and unzipped
  into a clean target."""
  tmp = tmp_path_factory.mktemp("wheels")
  _registry_or_skip(tmp)
  start = time.time()
  files = wheels.build(tmp / "whl", "3.12")
  names = {wheels.wheel_name(f)[0] for f in files}
  assert names == {wheels._norm(n) for n in wheels.WHEELS}   # pylint: disable=protected-access
  assert sum(f.stat().st_size for f in files) <= wheels.LIMIT_MB * 2**20
  site = tmp / "site"
  wheels.install(tmp / "whl", site)
  print(f"wheel set built and installed in {time.time() - start:.1f} s")
  return site


def _device_env(python: str, site: Path, tmp_path: Path) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "OUT", "PART")}
  return {**env, "PYTHON": python, "PYTHONPATH": f"{ROOT / 'tests' / 'device_env'}:{site}",
          "MAE_JAX_HIDE": HIDE, "MAE_JAX_ONLY_FROM": str(site),
          "MAE_JAX_HIDE_OUTSIDE": ONLY_FROM_WHEELS, "WHEEL_SITE": str(site),
          "DATA": str(tmp_path / "sim"), "DATA_CACHE": str(tmp_path / "cache"),
          "MAE_JAX_COMPILATION_CACHE": str(tmp_path / "xla"), "TF_CPP_MIN_LOG_LEVEL": "3",
          "SHORT_PER_CLASS": str(SHORT_PER_CLASS)}


# (B)'s smaller simulated set, below the tiny preset's 24 per class: the pipeline must read
# that folder as simulated, not extend it to the preset's size.
SHORT_PER_CLASS = 18

PARTS = {"bench": ("throughput.txt", "summary.md"),
         "short": ("summary.md", "epochs.md", "profile.txt", "profile.json", "report.md",
                   "report.json")}


def _run_parts(python: str, site: Path, tmp_path: Path, parts=tuple(PARTS)) -> None:
  """(A) bench and (B) short at tiny size, as docs/accelerator.md runs them there."""
  env = _device_env(python, site, tmp_path)
  check = subprocess.run([python, "-c", "import importlib.util as u; print([n for n in "
                          "('tensorflow', 'tensorflow_datasets', 'clu', 'torch') if u.find_spec(n)], "
                          "u.find_spec('ml_collections').origin, u.find_spec('lenstronomy').origin)"],
                         env=env, capture_output=True, text=True, check=True)
  hidden, *origins = check.stdout.split()
  assert hidden == "[]", check.stdout
  assert all(o.startswith(str(site)) for o in origins), check.stdout
  for part in parts:
    files = PARTS[part]
    out = tmp_path / f"out_{part}"
    start = time.time()
    result = subprocess.run(["bash", str(ROOT / "tools" / "accelerator" / "run.sh"), "tiny",
                             str(out), part], cwd=ROOT, capture_output=True, text=True,
                            env={**env, "RUN_DIR": str(tmp_path / f"run_{part}")}, timeout=1200)
    log = (out / "accelerator_run.log").read_text() if (out / "accelerator_run.log").exists() else ""
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:] + log[-3000:]
    print(f"{part}: {time.time() - start:.0f} s")
    for name in files + ("accelerator_run.log",):
      assert (out / name).stat().st_size > 0, (part, name)
    assert len(list(out.iterdir())) <= 8   # what the device tool brings back from $OUT
    assert "tensorflow: absent" in log and "torch: absent" in log, log[:1000]
    assert "ml_collections: present" in log and "lenstronomy: present" in log, log[:1000]
    summary = (out / "summary.md").read_text()
    if part == "bench":
      assert "| pretrain | device | 8 |" in summary and "| finetune | device | 8 |" in summary
      assert "attention (real loop): asked" in summary, summary
      assert "host" not in summary   # the device feed alone
    else:
      assert "| pretrain | 1 |" in (out / "epochs.md").read_text()
      assert "| probe |" in summary and "| finetune |" in summary
      assert "top operations" in (out / "profile.txt").read_text()
      assert len(list((tmp_path / "sim").rglob("*.npy"))) == 3 * SHORT_PER_CLASS


def test_device_style_run_under_this_jax(wheel_site, tmp_path):
  """This environment (the project's jax pin, the newest jax for this Python), with
  TensorFlow, tfds, clu and torch hidden and the wheel set as the only source of what
  the device lacks: (B), every stage (the benchmark's code runs here in
  test_accelerator_run.py, and as (A) under jax 0.11 below)."""
  _run_parts(sys.executable, wheel_site, tmp_path, parts=("short",))


def _python312() -> str | None:
  candidates = [os.environ.get("MAE_JAX_PYTHON312", ""), shutil.which("python3.12") or ""]
  candidates += sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.12*/bin/python3.12")))
  candidates += sorted(glob.glob("/root/.pyenv/versions/3.12*/bin/python3.12"))
  for c in candidates:
    if c and subprocess.run([c, "-c", "import sys; assert sys.version_info[:2] == (3, 12)"],
                            capture_output=True, check=False).returncode == 0:
      return c
  return None


def test_device_style_run_under_jax_0_11_on_python_3_12(wheel_site, tmp_path):
  """The device's versions: Python 3.12, jax 0.11.2 (tests/device_env/requirements.txt),
  nothing else installed, the wheel set unzipped beside it."""
  python = _python312()
  if python is None:
    pytest.skip("no Python 3.12 interpreter here (jax 0.11 needs Python >= 3.12)")
  venv = tmp_path / "py312"
  start = time.time()
  subprocess.run([python, "-m", "venv", str(venv)], check=True, capture_output=True)
  pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "-r",
                        str(ROOT / "tests" / "device_env" / "requirements.txt")],
                       capture_output=True, text=True, timeout=1200, check=False)
  if pip.returncode:
    if "Could not fetch" in pip.stderr or "connection" in pip.stderr.lower():
      pytest.skip("the package registry cannot be reached: " + pip.stderr.strip()[-300:])
    raise AssertionError(pip.stderr[-3000:])
  print(f"Python 3.12 environment made in {time.time() - start:.0f} s")
  version = subprocess.run([str(venv / "bin" / "python"), "-c", "import jax; print(jax.__version__)"],
                           capture_output=True, text=True, check=True).stdout.strip()
  assert version.startswith("0.11."), version
  _run_parts(str(venv / "bin" / "python"), wheel_site, tmp_path)
