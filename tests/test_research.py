"""The research arms (research/arms/*.py, run by research/run.py) stay runnable: every
arm's command names a config file, argument and keys that exist, and what it needs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from mae_jax.stages import launch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "research"))
import run as research_run  # pylint: disable=g-import-not-at-top,wrong-import-position

ARMS_FILES = sorted((ROOT / "research" / "arms").glob("*.py"))


@pytest.mark.parametrize("path", ARMS_FILES, ids=lambda p: p.stem)
def test_every_arm_is_a_valid_main_py_command(path, monkeypatch):
  monkeypatch.chdir(ROOT)
  arms = research_run.load_arms(path)
  assert arms
  for name, run in arms.items():
    argv = ["main.py", *run.command(name, Path("runs/arms"))]
    assert launch.config_file_problems(argv) == [], (name, argv)
    assert all(need in arms for need in run.needs), name
