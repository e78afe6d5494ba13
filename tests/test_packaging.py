"""The install files agree with each other: one pin per package, every module packaged."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import setuptools

ROOT = Path(__file__).resolve().parents[1]


def _pins(name: str) -> dict[str, str]:
  """package (extras dropped, lower case) -> pinned version, from a requirements file."""
  pins = {}
  for line in (ROOT / name).read_text().splitlines():
    line = line.split("#", 1)[0].strip()
    m = re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?==([\w.+-]+)", line)
    if m:
      pins[m.group(1).lower().replace("_", "-")] = m.group(3)
    else:
      assert not line or line.startswith("-r "), f"{name}: unpinned line {line!r}"
  return pins


def test_every_requirement_is_pinned_once_across_the_files():
  files = ["requirements.txt", "requirements-test.txt", "requirements-torch.txt",
           "requirements-cuda.txt", "requirements-tpu.txt"]
  seen: dict[str, tuple[str, str]] = {}
  for name in files:
    for package, version in _pins(name).items():
      if package in seen:
        assert seen[package][1] == version, (package, seen[package], (name, version))
      seen[package] = (name, version)
  assert _pins("requirements-cuda.txt")["jax"] == _pins("requirements.txt")["jax"]
  assert _pins("requirements-tpu.txt")["jax"] == _pins("requirements.txt")["jax"]


def test_pyproject_reads_the_requirement_files_and_packages_every_module():
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())
  dynamic = project["tool"]["setuptools"]["dynamic"]
  files = [dynamic["dependencies"]["file"]] + [
      v["file"] for v in dynamic["optional-dependencies"].values()]
  assert all((ROOT / f).exists() for group in files for f in group)
  assert set(dynamic["optional-dependencies"]) == {"cuda", "tpu", "torch", "test"}
  include = project["tool"]["setuptools"]["packages"]["find"]["include"]
  packaged = set(setuptools.find_packages(str(ROOT), include=include))
  folders = {".".join(p.parent.relative_to(ROOT).parts)
             for p in (ROOT / "mae_jax").rglob("*.py")} | {"configs"}
  assert folders <= packaged, folders - packaged
  assert (ROOT / "requirements-dev.txt").read_text().count("-r ") == 2
