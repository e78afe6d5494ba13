"""Exact resume: runs SIGKILLed between steps, mid-epoch and inside checkpoint saves
finish bit-identical to uninterrupted ones; bad numbers never reach a checkpoint."""

from __future__ import annotations

import hashlib
import json
import re
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from mae_jax.runtime import checkpoint
from mae_jax.runtime import faults
from mae_jax.data import simulate

ROOT = Path(__file__).resolve().parents[1]


def _main(*args: str, kill_at: str = "") -> subprocess.CompletedProcess:
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", faults.ENV: kill_at}
  return subprocess.run([sys.executable, str(ROOT / "main.py"), *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> list[str]:
  root = tmp_path_factory.mktemp("resume_data")
  simulate.generate(root / "sim", per_class=24, workers=1, progress=False)
  return ["--config.data.source=deeplense", f"--config.data.dir={root / 'sim'}",
          f"--config.data.cache_dir={root / 'cache'}"]


def _final_state(run: Path) -> tuple[int, dict]:
  ckpts = run / "checkpoints"
  step = max(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
  return step, checkpoint.restore_on_one_device(ckpts / str(step) / "state")


def _assert_identical(a: Path, b: Path) -> None:
  (step_a, state_a), (step_b, state_b) = _final_state(a), _final_state(b)
  assert step_a == step_b
  flat_a = jax.tree_util.tree_leaves_with_path(state_a)
  flat_b = jax.tree_util.tree_leaves_with_path(state_b)
  assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
  for (path, x), (_, y) in zip(flat_a, flat_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))
  # Wall time and the host's syncs (a resumed epoch restores and re-fetches) may differ.
  strip = lambda h: [{k: v for k, v in r.items() if k != "host_syncs" and not k.endswith("seconds")}  # pylint: disable=unnecessary-lambda-assignment
                     for r in h]
  assert strip(json.loads((a / "history.json").read_text())) == \
      strip(json.loads((b / "history.json").read_text()))


def _killed(result: subprocess.CompletedProcess) -> None:
  assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]


def _half_written(folder: Path) -> bool:
  return any("tmp" in p.name for p in folder.iterdir())


@pytest.mark.slow
def test_pretrain_killed_anywhere_resumes_bit_identical(tmp_path, data):
  args = ["--config=configs/pretrain.py:tiny", "--config.phase_epochs=(2, 2)",
          "--config.classes=('no_sub',)",   # a pool of 13 images: 3 steps per epoch
          "--config.batch_size=4", "--config.eval_batch_size=4",
          "--config.checkpoint_every_steps=4", "--config.plot_every_epochs=0", *data]
  whole, cut = tmp_path / "whole", tmp_path / "cut"
  result = _main(*args, f"--workdir={whole}")
  assert result.returncode == 0, result.stderr[-3000:]
  steps_per_epoch = json.loads((whole / "history.json").read_text())[0]["step"]
  assert steps_per_epoch == 3  # the kill points below assume 12 steps in 4 epochs

  # After step 5, before its checkpoint: resumes from the step checkpoint 4 (mid-epoch).
  _killed(_main(*args, f"--workdir={cut}", kill_at="step:5"))
  # Inside the save of step 6 (epoch 2's end, the phase boundary; history.json already
  # lists epoch 2): the half-written step 6 is ignored, the run resumes at 4 again.
  _killed(_main(*args, f"--workdir={cut}", kill_at="save:6"))
  assert _half_written(cut / "checkpoints")
  # Mid-epoch in phase 2, after step 10: resumes from the epoch checkpoint 9.
  resumed = _main(*args, f"--workdir={cut}", kill_at="step:10")
  _killed(resumed)
  assert "resuming from checkpoint step 4 (epoch 2, batch 1 of 3)" in resumed.stderr
  last = _main(*args, f"--workdir={cut}")
  assert last.returncode == 0, last.stderr[-3000:]
  assert "resuming from checkpoint step 9 (epoch 4, batch 0 of 3)" in last.stderr
  _assert_identical(whole, cut)
  assert not _half_written(cut / "checkpoints")

  # The checkpoint says where the run stood and with which key.
  with checkpoint.manager(cut) as mngr:
    _, step, progress = checkpoint.restore_latest(mngr, _final_state(cut)[1])
  assert step == 12 and progress["step"] == 12 and progress["phase"] == 2
  assert progress["steps_per_epoch"] == 3 and progress["global_batch"] == 4
  assert progress["rng_key"] == np.asarray(
      jax.random.key_data(jax.random.fold_in(jax.random.key(0), 1))).tolist()

  # Resuming with settings that change the batch order is refused, not approximated.
  other = _main(*args, f"--workdir={cut}", "--config.batch_size=2", "--config.eval_batch_size=2")
  assert other.returncode != 0 and "Traceback" not in other.stderr
  assert "cannot resume" in other.stderr and "steps_per_epoch 3 in the checkpoint" in other.stderr


@pytest.mark.slow
@pytest.mark.parametrize("feed, per_call", [("device", 3), ("host", 1)])
def test_finetune_killed_inside_saves_resumes_bit_identical(tmp_path, data, feed, per_call):
  """With either feed, one step or three per dispatch (chunks end at checkpoints)."""
  pre = tmp_path / "pre"
  result = _main("--config=configs/pretrain.py:tiny", f"--workdir={pre}", *data)
  assert result.returncode == 0, result.stderr[-3000:]
  args = ["--config=configs/finetune.py:tiny", f"--config.init_from={pre}",
          "--config.checkpoint_every_steps=3", f"--config.data.feed={feed}",
          f"--config.steps_per_call={per_call}", *data]
  whole, cut = tmp_path / "whole", tmp_path / "cut"
  result = _main(*args, f"--workdir={whole}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"feed for finetune: {feed}" in result.stderr
  history = json.loads((whole / "history.json").read_text())
  assert history[0]["step"] == 5 and len(history) == 2

  # Inside the save at epoch 1's end (step 5, a new best: saved with its metrics), so the
  # run resumes from step 3.
  _killed(_main(*args, f"--workdir={cut}", kill_at="save:5"))
  assert _half_written(cut / "checkpoints")
  # Inside the step checkpoint of step 9.
  _killed(_main(*args, f"--workdir={cut}", kill_at="save:9"))
  assert _half_written(cut / "checkpoints")
  last = _main(*args, f"--workdir={cut}")
  assert last.returncode == 0, last.stderr[-3000:]
  assert "resuming from checkpoint step 6" in last.stderr
  _assert_identical(whole, cut)
  metrics = [json.loads((r / "eval_metrics.json").read_text()) for r in (whole, cut)]
  assert metrics[0] == metrics[1]


@pytest.mark.slow
def test_probe_killed_mid_run_resumes_on_the_pretrained_features(tmp_path, data):
  """The probe computes its frozen features before restoring its checkpoint: a resumed
  run must compute them from the pretrained encoder, not from a fresh init."""
  pre = tmp_path / "pre"
  result = _main("--config=configs/pretrain.py:tiny", f"--workdir={pre}", *data)
  assert result.returncode == 0, result.stderr[-3000:]
  args = ["--config=configs/probe.py:tiny", f"--config.init_from={pre}", "--config.epochs=3",
          "--config.checkpoint_every_steps=2", *data]
  whole, cut = tmp_path / "whole", tmp_path / "cut"
  result = _main(*args, f"--workdir={whole}")
  assert result.returncode == 0, result.stderr[-3000:]
  _killed(_main(*args, f"--workdir={cut}", kill_at="step:3"))
  last = _main(*args, f"--workdir={cut}")
  assert last.returncode == 0, last.stderr[-3000:]
  assert "resuming from checkpoint step 2" in last.stderr
  _assert_identical(whole, cut)
  metrics = [json.loads((r / "eval_metrics.json").read_text()) for r in (whole, cut)]
  assert metrics[0] == metrics[1]


def _tree_digest(folder: Path) -> str:
  h = hashlib.sha256()
  for p in sorted(folder.rglob("*")):
    if p.is_file():
      h.update(str(p.relative_to(folder)).encode() + p.read_bytes())
  return h.hexdigest()


@pytest.mark.slow
def test_divergence_names_step_and_metric_and_keeps_the_good_checkpoint(tmp_path, data):
  run = tmp_path / "run"
  base = ["--config=configs/pretrain.py:tiny", f"--workdir={run}", "--config.batch_size=4",
          "--config.eval_batch_size=4", *data]
  result = _main(*base, "--config.phase_epochs=(1, 0)")
  assert result.returncode == 0, result.stderr[-3000:]
  ckpts = run / "checkpoints"
  good = sorted(p.name for p in ckpts.iterdir())
  before = _tree_digest(ckpts)

  diverged = _main(*base, "--config.phase_epochs=(1, 2)", "--config.optim.lr=1e30",
                   "--config.optim.warmup_epochs=0")
  assert diverged.returncode != 0 and "Traceback" not in diverged.stderr
  assert "error: non-finite loss=" in diverged.stderr or "error: non-finite grad_norm=" in \
      diverged.stderr
  failed_at = re.search(r"non-finite .* at step (\d+);", diverged.stderr)
  assert failed_at and int(failed_at.group(1)) > 3  # after the good checkpoint (step 3)
  assert sorted(p.name for p in ckpts.iterdir()) == good
  assert _tree_digest(ckpts) == before
