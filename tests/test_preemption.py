"""Runs a cluster can stop: on SIGTERM, SIGINT or the configured signal a training loop
saves a checkpoint at the step it is at and exits with `preemption.EXIT_STATUS`, saying
so in one line; the rerun continues exactly. On many hosts every host stops at the same
step."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mae_jax.runtime import checkpoint
from mae_jax.runtime import preemption
from tests import test_multihost

ROOT = Path(__file__).resolve().parents[1]
GRACE_SECONDS = 60   # from the signal to the exit, on a loaded 2-core CI machine


def test_a_signal_sets_the_flag_in_training_and_stops_at_once_outside():
  before = signal.getsignal(signal.SIGTERM)
  with preemption.watching("SIGUSR1"):
    with preemption.training():
      preemption.send_to_self("SIGUSR1")
      assert preemption.received() == "SIGUSR1"
      assert preemption.stop_requested() == "SIGUSR1"   # one process: its own flag
    with pytest.raises(preemption.Preempted, match="stopped on SIGTERM .outside training"):
      preemption.send_to_self("SIGTERM")
  assert signal.getsignal(signal.SIGTERM) == before and preemption.received() is None
  with pytest.raises(ValueError, match="stop_signal='SIGNOPE'"):
    preemption.signal_names("SIGNOPE")
  assert preemption.signal_names("") == ("SIGTERM", "SIGINT")


def _pretrain(workdir: Path, data: Path, env: dict[str, str] | None = None
              ) -> tuple[subprocess.CompletedProcess, float]:
  args = [sys.executable, str(ROOT / "main.py"), "--config=configs/pretrain.py:tiny",
          f"--workdir={workdir}", f"--config.data.dir={data / 'sim'}",
          f"--config.data.cache_dir={data / 'cache'}", "--config.data.sim.workers=1",
          "--config.plot_every_epochs=0"]
  start = time.time()
  result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})})
  return result, time.time() - start


def _history(workdir: Path) -> list[dict]:
  return [{k: v for k, v in h.items() if k != "host_syncs" and not k.endswith("seconds")}
          for h in json.loads((workdir / "history.json").read_text())]


def _steps(workdir: Path) -> set[int]:
  return {int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()}


@pytest.mark.slow
def test_a_signal_mid_chunk_in_a_save_or_in_an_evaluation_saves_that_step(tmp_path):
  """The tiny pretraining (2 epochs of 5 steps, a chunk per step) stopped by SIGTERM after
  step 3, by SIGUSR1 while the save of step 5 is written, and by SIGTERM during epoch 1's
  evaluation: each exits within the grace period with status 75 and one line, a
  checkpoint at the step it stopped at exists, and the rerun's history equals an
  uninterrupted run's."""
  whole, _ = _pretrain(tmp_path / "whole", tmp_path)
  assert whole.returncode == 0, whole.stderr[-3000:]
  want = _history(tmp_path / "whole")
  spe = want[0]["step"]
  for name, point, signal_name, stop in (("mid", "step:3", "SIGTERM", 3),
                                         ("save", f"save:{spe}", "SIGUSR1", spe),
                                         ("eval", "eval:1", "SIGTERM", spe)):
    run = tmp_path / name
    stopped, _ = _pretrain(run, tmp_path, {"MAE_JAX_SIGNAL_AT": point,
                                           "MAE_JAX_SIGNAL": signal_name})
    assert stopped.returncode == preemption.EXIT_STATUS, stopped.stderr[-3000:]
    lines = [l for l in stopped.stderr.splitlines() if "stopped on" in l]
    assert lines == [f"stopped on {signal_name} at step {stop} with the checkpoint saved in "
                     f"{run.absolute() / 'checkpoints' / str(stop)}; resume with: "
                     f"{Path(sys.executable).name} {ROOT / 'main.py'} "
                     f"--config=configs/pretrain.py:tiny --workdir={run} "
                     f"--config.data.dir={tmp_path / 'sim'} "
                     f"--config.data.cache_dir={tmp_path / 'cache'} "
                     "--config.data.sim.workers=1 --config.plot_every_epochs=0"], name
    assert "Traceback" not in stopped.stderr
    assert max(_steps(run)) == stop, name
    resumed, _ = _pretrain(run, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from checkpoint step {stop}" in resumed.stderr
    assert _history(run) == want, name


@pytest.mark.slow
def test_a_signal_stops_a_run_within_the_grace_period(tmp_path):
  """SIGTERM sent from outside while the tiny pretraining trains: it stops within the
  grace period with a checkpoint where it stopped."""
  args = [sys.executable, str(ROOT / "main.py"), "--config=configs/pretrain.py:tiny",
          f"--workdir={tmp_path / 'run'}", f"--config.data.dir={tmp_path / 'sim'}",
          f"--config.data.cache_dir={tmp_path / 'cache'}", "--config.data.sim.workers=1",
          "--config.plot_every_epochs=0", "--config.phase_epochs=(20, 20)"]
  proc = subprocess.Popen(args, cwd=ROOT, stderr=subprocess.PIPE, text=True,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
  seen = []
  for line in proc.stderr:   # wait for training to start (the first epoch's progress)
    seen.append(line)
    if "steps per epoch" in line:
      break
  time.sleep(3)
  sent = time.time()
  proc.send_signal(signal.SIGTERM)
  rest = proc.stderr.read()
  status = proc.wait(timeout=GRACE_SECONDS)
  assert time.time() - sent < GRACE_SECONDS
  assert status == preemption.EXIT_STATUS, "".join(seen)[-2000:] + rest[-2000:]
  stop = int(rest.split("stopped on SIGTERM at step ")[1].split()[0])
  assert stop in _steps(tmp_path / "run")


@pytest.mark.slow
def test_two_hosts_stop_at_the_same_step_when_one_gets_the_signal(tmp_path):
  """Two processes joined by jax.distributed; only process 1 gets SIGTERM (after step 3):
  both save step 3, together, and exit with status 75."""
  port = str(test_multihost._free_port())  # pylint: disable=protected-access
  flags = ["--config=configs/pretrain.py:tiny", f"--workdir={tmp_path}/runs/pre",
           "--config.plot_every_epochs=0", f"--config.data.dir={tmp_path / 'sim'}",
           f"--config.data.cache_dir={tmp_path / 'cache'}", "--config.data.sim.workers=1"]
  procs = []
  for i in range(2):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    if i == 1:
      env["MAE_JAX_SIGNAL_AT"] = "step:3"
    procs.append(subprocess.Popen(
        [sys.executable, test_multihost.DRIVER, "multi", str(i), port, str(tmp_path), "pretrain",
         *flags], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True))
  outs = [p.communicate(timeout=900) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == preemption.EXIT_STATUS, err[-3000:]
  assert "stopped on SIGTERM at step 3 with the checkpoint saved" in outs[0][1]
  assert max(_steps(tmp_path / "runs" / "pre")) == 3


@pytest.mark.slow
def test_a_classifier_stopped_before_an_epochs_evaluation_ranks_that_step_when_resumed(
    tmp_path):
  """A fine-tune stopped at epoch 1's last step, before its evaluation: the resumed run
  evaluates epoch 1 first and, that epoch being a new best, saves the step again with its
  metrics; the chosen epoch and every test number equal an uninterrupted run's."""
  def finetune(workdir: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    args = [sys.executable, str(ROOT / "main.py"), "--config=configs/finetune.py:tiny,arch=cnn",
            f"--workdir={workdir}", f"--config.data.dir={tmp_path / 'sim'}",
            f"--config.data.cache_dir={tmp_path / 'cache'}", "--config.data.sim.workers=1"]
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})})

  whole = finetune(tmp_path / "whole")
  assert whole.returncode == 0, whole.stderr[-3000:]
  spe = _history(tmp_path / "whole")[0]["step"]
  run = tmp_path / "cut"
  stopped = finetune(run, {"MAE_JAX_SIGNAL_AT": f"step:{spe}", "MAE_JAX_SIGNAL": "SIGTERM"})
  assert stopped.returncode == preemption.EXIT_STATUS, stopped.stderr[-3000:]
  assert not (run / "history.json").exists() or not json.loads((run / "history.json").read_text())
  assert checkpoint.ranked_steps(run / "checkpoints") == []   # saved before its evaluation
  resumed = finetune(run)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"resuming from checkpoint step {spe}" in resumed.stderr
  if (run / "checkpoints" / str(spe)).is_dir():   # kept: the best, or among the latest
    assert spe in checkpoint.ranked_steps(run / "checkpoints")   # epoch 1 was a new best
  assert _history(run) == _history(tmp_path / "whole")
  metrics = [json.loads((r / "eval_metrics.json").read_text()) for r in (tmp_path / "whole", run)]
  assert metrics[0] == metrics[1]
