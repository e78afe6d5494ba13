"""tools/accelerator/run.sh end to end at test sizes on this CPU: it simulates,
benchmarks, profiles, runs the whole pipeline and writes its summary."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_accelerator_script_runs_end_to_end_at_tiny_size(tmp_path):
  out = tmp_path / "out"
  env = {**os.environ, "PYTHON": sys.executable, "RUN_DIR": str(tmp_path / "run"), "DATA": str(tmp_path / "sim"),
         "DATA_CACHE": str(tmp_path / "cache"), "MAE_JAX_COMPILATION_CACHE": str(tmp_path / "xla")}
  result = subprocess.run(["bash", str(ROOT / "tools" / "accelerator" / "run.sh"), "tiny",
                           str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=1200)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
  for name in ("summary.md", "report.md", "report.json", "figures.json", "throughput.txt",
               "profile.txt", "profile.json", "epochs.md", "accelerator_run.log"):
    assert (out / name).stat().st_size > 0, name
  summary = (out / "summary.md").read_text()
  assert "| pretrain | device | 8 |" in summary and "| finetune | host | 8 |" in summary
  assert "| finetune |" in summary and "| probe |" in summary
  assert "top operations" in (out / "profile.txt").read_text()
  assert "| pretrain | 1 |" in summary and "): asked blocked; encoder" in summary
  # The radial-profile baseline is fitted once, in the probe: the fine-tune reuses its labels.
  finetune = json.loads((tmp_path / "run" / "finetune" / "eval_metrics.json").read_text())
  probe = json.loads((tmp_path / "run" / "probe" / "eval_metrics.json").read_text())
  assert finetune["baseline"] is None and probe["baseline"]["macro_auc"] is not None
  assert "(radial profile)" in summary


def test_seed_gpu_stops_at_once_without_an_accelerator(tmp_path):
  """On a CPU-only JAX, the seed_gpu commands stop in the environment check, saying why,
  instead of spending a device command's time on a batch-1024 loop."""
  out = tmp_path / "out"
  env = {**os.environ, "PYTHON": sys.executable, "RUN_DIR": str(tmp_path / "run"),
         "DATA": str(tmp_path / "sim"), "JAX_PLATFORMS": "cpu"}
  proc = subprocess.Popen(["bash", str(ROOT / "tools" / "accelerator" / "run.sh"), "seed_gpu",
                           str(out), "bench"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, start_new_session=True)
  try:
    returncode = proc.wait(timeout=120)   # it takes seconds
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)   # the script and the benchmark it went on to start
    proc.wait()
    raise AssertionError("seed_gpu went on past the environment check on a CPU") from None
  log = (out / "accelerator_run.log").read_text()
  assert returncode != 0, log
  assert "seed_gpu needs an accelerator, but JAX sees only the CPU" in log
  assert [f.name for f in out.iterdir()] == ["accelerator_run.log"]
  assert not (tmp_path / "sim").exists()
