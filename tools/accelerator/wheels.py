"""The wheel set a bare GPU machine needs, built and checked here; installed there without pip.

  python tools/accelerator/wheels.py build [--dest .whl] [--python-version 3.12]
  python tools/accelerator/wheels.py check [--dest .whl]
  python tools/accelerator/wheels.py install [--dest .whl] --target /tmp/mae_jax_site

The device machine (docs/accelerator.md) has Python 3.12 with JAX, flax, optax, orbax,
numpy, scipy, matplotlib, scikit-learn, scikit-image, h5py, numba, mpmath, tensorboard,
tqdm, absl-py and PyYAML, but no network and none of WHEELS below: the configs need
ml_collections, and the simulator (`mae_jax.data.simulate`) lenstronomy and astropy.

`build` fetches binary wheels for the target's Python and platform with `pip download`
(`--only-binary=:all:`), and turns a package published only as a source archive
(lenstronomy) into a wheel with `pip wheel --no-deps`; `check` then requires exactly one
wheel per entry of WHEELS, at that version, and a total under LIMIT_MB (the device tool
carries at most 64 MiB of working tree). `install` needs no pip: a wheel is a zip file, so
it unzips each into `--target` (put that on PYTHONPATH); that is what pip's `--no-deps
--target` does for these pure or prebuilt wheels, less the entry-point scripts, which
nothing here runs.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

# name -> version: what the device lacks and the accelerator run imports there. Each
# version exists on PyPI (astropy-iers-data's are dated; pick one that was published).
WHEELS = {
    "ml-collections": "1.1.0",         # configs/*.py (absl-py, PyYAML are there)
    "lenstronomy": "1.14.2",           # the simulator; a source archive only: pip wheel
    "astropy": "8.0.2",                # the simulator's cosmology and constants
    "pyerfa": "2.0.1.5",               # astropy's
    "astropy-iers-data": "0.2026.11.2.0.34.55",   # astropy's
}
SOURCE_ONLY = ("lenstronomy",)
LIMIT_MB = 48                          # of the 64 MiB the device tool carries
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")


def _norm(name: str) -> str:
  return re.sub(r"[-_.]+", "_", name).lower()


def wheel_name(path: Path) -> tuple[str, str]:
  """(normalised distribution name, version) of a wheel file."""
  name, version = path.name.split("-")[:2]
  return _norm(name), version


def _pip(python: str, *args: str) -> None:
  cmd = [python, "-m", "pip", *args]
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if proc.returncode:
    raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}")


def build(dest: Path, python_version: str, python: str = sys.executable,
          wheels: dict[str, str] | None = None) -> list[Path]:
  """Fills `dest` with the wheels of `wheels` (default WHEELS) for CPython
  `python_version` on manylinux x86-64, then checks it. Returns the wheel files."""
  wheels = WHEELS if wheels is None else wheels
  dest.mkdir(parents=True, exist_ok=True)
  for old in dest.glob("*.whl"):   # one version of each: two would stop an install
    if wheel_name(old)[0] in {_norm(n) for n in wheels}:
      old.unlink()
  binary = [f"{n}=={v}" for n, v in wheels.items() if n not in SOURCE_ONLY]
  source = [f"{n}=={v}" for n, v in wheels.items() if n in SOURCE_ONLY]
  if binary:
    platforms = [a for p in PLATFORMS for a in ("--platform", p)]
    _pip(python, "download", "--no-deps", "--only-binary=:all:", "--python-version",
         python_version, "--implementation", "cp", *platforms, "-d", str(dest), *binary)
  if source:   # pure Python from a source archive: a py3-none-any wheel serves any Python
    with tempfile.TemporaryDirectory() as tmp:
      _pip(python, "wheel", "--no-deps", "--no-binary", ",".join(SOURCE_ONLY), "-w", tmp,
           *source)
      for built in Path(tmp).glob("*.whl"):
        if not built.name.endswith("-none-any.whl"):
          raise SystemExit(f"{built.name} is not pure Python: it would not run there")
        built.replace(dest / built.name)
  return check(dest, wheels)


def check(dest: Path, wheels: dict[str, str] | None = None,
          limit_mb: float = LIMIT_MB) -> list[Path]:
  """Exactly one wheel per entry, at its version, each a readable zip, all under the limit."""
  wheels = WHEELS if wheels is None else wheels
  files = sorted(dest.glob("*.whl"))
  found: dict[str, list[str]] = {}
  for f in files:
    name, version = wheel_name(f)
    found.setdefault(name, []).append(version)
    if zipfile.ZipFile(f).testzip() is not None:
      raise SystemExit(f"{f.name}: a damaged zip")
  problems = []
  for n, v in wheels.items():
    have = found.get(_norm(n), [])
    if have != [v]:
      problems.append(f"{n}: want one wheel of {v}, found {have or 'none'}")
  extra = sorted(set(found) - {_norm(n) for n in wheels})
  if extra:
    problems.append(f"wheels not in the set: {extra}")
  total = sum(f.stat().st_size for f in files) / 2**20
  if total > limit_mb:
    problems.append(f"{total:.1f} MiB of wheels, over the {limit_mb} MiB limit")
  if problems:
    raise SystemExit(f"{dest}: " + "; ".join(problems))
  return files


def install(wheels: list[Path] | Path, target: Path) -> list[str]:
  """Unzips each wheel into `target` (no pip needed); returns the names installed.
  `.data/purelib` and `.data/platlib` parts go into `target` as pip puts them."""
  files = sorted(wheels.glob("*.whl")) if isinstance(wheels, Path) else list(wheels)
  target.mkdir(parents=True, exist_ok=True)
  names = []
  for f in files:
    with zipfile.ZipFile(f) as z:
      for info in z.infolist():
        parts = info.filename.split("/")
        if len(parts) > 2 and parts[0].endswith(".data"):
          if parts[1] not in ("purelib", "platlib"):
            continue            # scripts, headers, data: nothing here uses them
          parts = parts[2:]
        if info.is_dir() or ".." in parts:
          continue
        out = target.joinpath(*parts)
        out.parent.mkdir(parents=True, exist_ok=True)
        with z.open(info) as src, open(out, "wb") as dst:
          dst.write(src.read())
        mode = info.external_attr >> 16
        if mode & 0o111:
          os.chmod(out, 0o755)
    names.append(wheel_name(f)[0])
  return names


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("action", choices=("build", "check", "install"))
  parser.add_argument("--dest", default=str(Path(__file__).resolve().parents[2] / ".whl"),
                      help="the wheel folder (default: .whl at the repository root)")
  parser.add_argument("--python-version", default="3.12", help="the device's Python")
  parser.add_argument("--target", help="install: the folder to unzip into")
  args = parser.parse_args(argv)
  dest = Path(args.dest)
  if args.action == "install":
    if not args.target:
      parser.error("install needs --target")
    names = install(dest, Path(args.target))
    print(f"installed {len(names)} wheels into {args.target}: {', '.join(names)}")
    return
  files = build(dest, args.python_version) if args.action == "build" else check(dest)
  total = sum(f.stat().st_size for f in files) / 2**20
  for f in files:
    print(f"{f.stat().st_size / 2**20:7.2f} MiB  {f.name}")
  print(f"{total:7.2f} MiB  in {len(files)} wheels in {dest}")


if __name__ == "__main__":
  main()
