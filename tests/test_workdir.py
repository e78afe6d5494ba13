"""Concurrent use: one run per workdir (the lock names its holder), and two runs
preparing the same dataset at once leave one good copy."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mae_jax.runtime import errors
from mae_jax.runtime import workdir
from mae_jax.data import arrays
from mae_jax.data import builder
from mae_jax.data import splits
from tests import conftest

ROOT = Path(__file__).resolve().parents[1]

_HOLD = """
import sys, time
from mae_jax.runtime import errors
from mae_jax.runtime import workdir
with workdir.lock(sys.argv[1]):
  print("locked", flush=True)
  time.sleep(600)
"""


def _hold(path: Path) -> subprocess.Popen:
  holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(path)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
  assert holder.stdout.readline().strip() == "locked"
  return holder


@pytest.mark.slow
def test_second_run_on_a_workdir_is_refused_with_the_holder(tmp_path):
  run = tmp_path / "run"
  holder = _hold(run)
  try:
    with pytest.raises(errors.WorkdirBusyError, match=f"pid {holder.pid} on host"):
      with workdir.lock(run):
        pass
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "main.py"), "--config=configs/pretrain.py:tiny",
         f"--workdir={run}", f"--config.data.dir={tmp_path / 'sim'}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"error: workdir {run} is in use by another run (pid {holder.pid}" in result.stderr
    assert not (tmp_path / "sim").exists()
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  with workdir.lock(run):  # a killed holder leaves no stale lock
    pass


def _prepare(args: tuple[str, str, str]) -> tuple[str, int]:
  source, cache, reader = args
  if reader == "tfds":
    prepared = builder.prepare(source, cache, progress=False)
    return str(prepared.cache_dir), sum(s.num_examples
                                        for s in prepared.builder.info.splits.values())
  dataset = arrays.prepare(source, cache, progress=False)
  return str(dataset.cache_dir), sum(len(dataset[s]) for s in splits.SPLITS)


@pytest.mark.parametrize("reader", ["files", "tfds"])
def test_concurrent_prepare_leaves_one_good_copy(tmp_path, reader):
  conftest.write_folder(tmp_path / "src", per_class=30)
  cache = tmp_path / "cache"
  with multiprocessing.get_context("spawn").Pool(2) as pool:
    results = pool.map(_prepare, [(str(tmp_path / "src"), str(cache), reader)] * 2)
  assert results[0] == results[1] and results[0][1] == 90
  copies = [p for p in cache.iterdir() if p.is_dir()]
  assert len(copies) == 1 and not list(cache.rglob("*incomplete*"))
  assert not list(cache.rglob(".*.tmp*"))
  assert _prepare((str(tmp_path / "src"), str(cache), reader)) == results[0]
