"""Checkpoints that survive damage: a step whose files differ from its manifest (truncated,
missing, or changed bytes at the same size), one without the manifest of a finished save,
or one that holds NaN makes resume and `init_from` take the newest one that restores, one
line each, nothing deleted, orbax never reading the damaged step; checkpoints written
before manifests existed are checked by reading them. A failed save stops the run with one
line and leaves the older checkpoints intact."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from mae_jax.runtime import checkpoint
from mae_jax.runtime import errors
from mae_jax.runtime import faults

ROOT = Path(__file__).resolve().parents[1]


def truncate_largest_file(step_dir: Path) -> Path:
  """Cuts the largest file of a checkpoint step in half (a damaged disk, a bad copy)."""
  files = [p for p in (step_dir / checkpoint.STATE).rglob("*") if p.is_file()]
  biggest = max(files, key=lambda p: p.stat().st_size)
  with open(biggest, "r+b") as f:
    f.truncate(biggest.stat().st_size // 2)
  return biggest


def _saved(workdir: Path, steps=(1, 2), legacy: bool = False) -> dict:
  """Checkpoints of `steps`, sealed with manifests; with `legacy`, as mae_jax wrote them
  before manifests existed (none, and no marker)."""
  mngr = checkpoint.manager(workdir, 5)
  state = {"w": jnp.arange(4000.0), "b": jnp.ones(3)}
  for s in steps:
    checkpoint.save(mngr, s, {k: v * s for k, v in state.items()}, {"step": s})
  checkpoint.seal(mngr)
  mngr.close()
  if legacy:
    for path in (workdir / "checkpoints").rglob("manifest*.json"):
      path.unlink()
  return state


def flip_bytes(step_dir: Path) -> Path:
  """Changes bytes of the largest file without changing its size (bit rot, a bad copy)."""
  files = [p for p in (step_dir / checkpoint.STATE).rglob("*") if p.is_file()]
  biggest = max(files, key=lambda p: p.stat().st_size)
  data = bytearray(biggest.read_bytes())
  for i in range(len(data) // 3, len(data) // 3 + 16):
    data[i] ^= 0xFF
  biggest.write_bytes(bytes(data))
  return biggest


def remove_a_file(step_dir: Path) -> Path:
  files = [p for p in (step_dir / checkpoint.STATE).rglob("*") if p.is_file()]
  victim = max(files, key=lambda p: p.stat().st_size)
  victim.unlink()
  return victim


DAMAGE = {"truncated": (truncate_largest_file, "when saved"),
          "missing": (remove_a_file, "is missing"),
          "flipped": (flip_bytes, "changed since it was saved (CRC-32 differs at the same size)")}


@pytest.mark.parametrize("kind", DAMAGE)
def test_the_manifest_finds_the_damage_before_orbax_reads_anything(tmp_path, kind, caplog,
                                                                   monkeypatch):
  state = _saved(tmp_path)
  damage, says = DAMAGE[kind]
  damaged = damage(tmp_path / "checkpoints" / "2")
  read = []
  restore = checkpoint.ocp.CheckpointManager.restore
  monkeypatch.setattr(checkpoint.ocp.CheckpointManager, "restore",
                      lambda self, step, **kw: read.append(step) or restore(self, step, **kw))
  mngr = checkpoint.manager(tmp_path, 5)
  with caplog.at_level("WARNING"):
    restored, step, _ = checkpoint.restore_latest(mngr, state)
  assert step == 1 and read == [1], "orbax read only the step that passed its manifest"
  np.testing.assert_array_equal(restored["w"], state["w"])
  lines = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  assert len(lines) == 1 and "checkpoint step 2 skipped" in lines[0], lines
  assert str(damaged.relative_to(tmp_path / "checkpoints" / "2")) in lines[0]
  assert says in lines[0], lines[0]
  assert (tmp_path / checkpoint.DAMAGED / "checkpoints_2").is_dir()


def test_a_save_killed_before_its_manifest_is_half_written(tmp_path, caplog):
  """A step folder orbax finished but whose manifest was never written (the process died
  between the two) is treated as half-written: skipped, the one before taken."""
  state = _saved(tmp_path, steps=(1, 2, 3))
  (tmp_path / "checkpoints" / "3" / checkpoint.MANIFEST).unlink()
  with caplog.at_level("WARNING"):
    tree, step = checkpoint.restore_latest_on_one_device(tmp_path / "checkpoints")
  assert step == 2 and float(tree["b"][0]) == 2.0
  assert any("no manifest: its save did not finish" in r.getMessage() for r in caplog.records)
  assert checkpoint.restore_latest(checkpoint.manager(tmp_path, 5), state)[1] == 2


def test_checkpoints_written_before_manifests_restore_and_are_checked_the_old_way(tmp_path,
                                                                                  caplog):
  state = _saved(tmp_path, legacy=True)
  mngr = checkpoint.manager(tmp_path, 5)   # marks the folder: steps 1, 2 are older
  assert checkpoint.fileio.read_json(tmp_path / "checkpoints" / checkpoint.MANIFESTED)[
      "older_steps"] == [1, 2]
  assert checkpoint.restore_latest(mngr, state)[1] == 2
  truncate_largest_file(tmp_path / "checkpoints" / "2")
  with caplog.at_level("WARNING"):
    assert checkpoint.restore_latest(mngr, state)[1] == 1
  line = next(r.getMessage() for r in caplog.records if "skipped" in r.getMessage())
  assert "byte range" in line or "OUT_OF_RANGE" in line, line   # orbax's read found it
  checkpoint.save(mngr, 3, state)
  checkpoint.seal(mngr)   # new steps get manifests
  assert (tmp_path / "checkpoints" / "3" / checkpoint.MANIFEST).exists()


def test_restored_values_that_are_not_finite_are_refused(tmp_path, monkeypatch, caplog):
  state = _saved(tmp_path)
  mngr = checkpoint.manager(tmp_path, 5)
  monkeypatch.setattr(checkpoint, "all_finite", lambda tree: True)   # let NaN through a save
  checkpoint.save(mngr, 3, {"w": state["w"] * jnp.nan, "b": state["b"]})
  checkpoint.seal(mngr)
  monkeypatch.undo()
  with caplog.at_level("WARNING"):
    assert checkpoint.restore_latest(mngr, state)[1] == 2
  assert any("it holds NaN or inf values" in r.getMessage() for r in caplog.records)



def test_resume_takes_the_newest_checkpoint_that_restores(tmp_path, caplog):
  state = _saved(tmp_path)
  truncate_largest_file(tmp_path / "checkpoints" / "2")
  mngr = checkpoint.manager(tmp_path, 5)
  with caplog.at_level("WARNING"):
    restored, step, progress = checkpoint.restore_latest(mngr, state)
  assert step == 1 and progress == {"step": 1}
  np.testing.assert_array_equal(restored["w"], state["w"])
  lines = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
  assert len(lines) == 1 and "checkpoint step 2 skipped" in lines[0]
  assert "when saved" in lines[0], lines[0]   # the manifest's verdict, orbax read nothing
  kept = tmp_path / checkpoint.DAMAGED / "checkpoints_2"
  assert kept.is_dir() and any(kept.rglob("*")), "the damaged step is kept, not deleted"
  assert mngr.latest_step() == 1
  checkpoint.save(mngr, 2, state)   # the step can be saved again
  checkpoint.seal(mngr)
  assert mngr.latest_step() == 2 and checkpoint.manifest_problem(
      tmp_path / "checkpoints" / "2") is None


def test_init_from_skips_a_damaged_checkpoint_and_refuses_when_none_restores(tmp_path, caplog):
  _saved(tmp_path)
  truncate_largest_file(tmp_path / "checkpoints" / "2")
  with caplog.at_level("WARNING"):
    tree, step = checkpoint.restore_latest_on_one_device(tmp_path / "checkpoints")
  assert step == 1 and float(tree["b"][0]) == 1.0
  warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  assert len(warnings) == 1 and "checkpoints/2 skipped" in warnings[0], warnings   # one line
  assert (tmp_path / "checkpoints" / "2").is_dir()   # another stage's workdir: left alone
  truncate_largest_file(tmp_path / "checkpoints" / "1")
  with pytest.raises(errors.DamagedCheckpointError, match=r"no checkpoint in .* restores: "
                                                          r"step 2: .*; step 1: "):
    checkpoint.restore_latest_on_one_device(tmp_path / "checkpoints")


# A read that TensorStore finishes after the event loop awaiting it has closed: what the
# abandoned reads of a damaged checkpoint's other arrays do, at any time after the restore.
_LATE_COMPLETION = """
import asyncio, gc, sys, time
from pathlib import Path
import tensorstore as ts
from mae_jax.runtime import checkpoint
if sys.argv[1] == "after_damage":
  tree, step = checkpoint.restore_latest_on_one_device(Path(sys.argv[2]))
  print("restored step", step)
promise, future = ts.Promise.new()
async def waiter():
  await future
loop = asyncio.new_event_loop()
loop.create_task(waiter())
loop.run_until_complete(asyncio.sleep(0.01))
loop.close()
promise.set_result(1)
time.sleep(0.2)
class Unrelated:
  def __del__(self):
    raise ValueError("an unrelated report")
Unrelated()
async def async_deserialize(fails):   # abandoned orbax read tasks of the damaged checkpoint
  if fails:
    raise ValueError("a read of the damaged file")
  await asyncio.sleep(3600)
async def unrelated_task():
  raise ValueError("an unrelated task's error")
loop = asyncio.new_event_loop()
tasks = [loop.create_task(async_deserialize(True)), loop.create_task(async_deserialize(False)),
         loop.create_task(unrelated_task())]
loop.run_until_complete(asyncio.sleep(0.01))
loop.close()
del tasks
gc.collect()
"""


def test_reads_finishing_after_a_damaged_restore_print_nothing(tmp_path):
  """CI once printed a dozen 'Event loop is closed' tracebacks after a damaged restore had
  been reported in one line: reads that finished later; and once asyncio's 'Task exception
  was never retrieved' of an abandoned read task. Both are dropped from the first damaged
  read on, and nothing else is; without one (the control), such reports still print. (A
  checkpoint with a manifest is never read when damaged: this is the older checkpoints'
  path.)"""
  _saved(tmp_path, legacy=True)
  truncate_largest_file(tmp_path / "checkpoints" / "2")
  env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}

  def late(mode: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _LATE_COMPLETION, mode,
                           str(tmp_path / "checkpoints")],
                          capture_output=True, text=True, env=env, timeout=300, check=True)

  control = late("alone")
  assert "Event loop is closed" in control.stderr
  assert "an unrelated report" in control.stderr
  assert re.search(r"Task exception was never retrieved\nfuture: <Task finished name='Task-\d+' "
                   r"coro=<async_deserialize\(\)", control.stderr)
  assert re.search(r"Task was destroyed but it is pending!\ntask: <Task pending name='Task-\d+' "
                   r"coro=<async_deserialize\(\)", control.stderr)
  assert "an unrelated task's error" in control.stderr
  after = late("after_damage")
  assert "restored step 1" in after.stdout
  assert "checkpoints/2 skipped: it is damaged" in after.stderr
  assert "Event loop is closed" not in after.stderr
  assert "async_deserialize" not in after.stderr   # CI: 'Task exception was never retrieved'
  assert "Traceback" in after.stderr               # the unrelated ones still print:
  assert "an unrelated report" in after.stderr   # only the late reads are dropped
  assert "an unrelated task's error" in after.stderr
  assert "coro=<waiter()" in after.stderr       # an unrelated pending task: still reported


def test_a_failed_save_is_one_clear_error_and_the_older_checkpoints_stand(tmp_path, monkeypatch):
  state = _saved(tmp_path)
  monkeypatch.setenv(faults.FAIL_ENV, "3")
  mngr = checkpoint.manager(tmp_path, 5)
  with pytest.raises(errors.CheckpointSaveError) as failed:
    checkpoint.save(mngr, 3, state)
  message = str(failed.value)
  assert "\n" not in message and "saving step 3" in message
  assert "No space left on device" in message and "older checkpoints (1, 2) are intact" in message
  assert "rerun the same command to resume" in message
  assert mngr.latest_step() == 2
  assert checkpoint.restore_latest(mngr, state)[1] == 2


def _main(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, str(ROOT / "main.py"), *args], cwd=ROOT,
                        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})},
                        capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_a_truncated_latest_checkpoint_end_to_end(tmp_path):
  """What a user sees: resume and a probe from the damaged workdir both go on from the
  checkpoint before, each saying so in one line; a failed save stops with one line."""
  data = [f"--config.data.dir={tmp_path / 'sim'}", f"--config.data.cache_dir={tmp_path / 'c'}",
          "--config.data.sim.workers=1"]
  pre = tmp_path / "pre"
  args = ["--config=configs/pretrain.py:tiny", f"--workdir={pre}", *data]
  first = _main(*args)
  assert first.returncode == 0, first.stderr[-3000:]
  steps = sorted(int(p.name) for p in (pre / "checkpoints").iterdir() if p.name.isdigit())
  truncate_largest_file(pre / "checkpoints" / str(steps[-1]))

  probe = _main("--config=configs/probe.py:tiny", f"--workdir={tmp_path / 'probe'}",
                f"--config.init_from={pre}", *data)
  assert probe.returncode == 0, probe.stderr[-3000:]
  assert f"checkpoints/{steps[-1]} skipped: it is damaged" in probe.stderr
  assert f"initialised from {pre} step {steps[-2]}" in probe.stderr

  resumed = _main(*args)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert resumed.stderr.count("skipped") == 1
  assert f"checkpoint step {steps[-1]} skipped" in resumed.stderr
  assert f"resuming from checkpoint step {steps[-2]}" in resumed.stderr
  assert (pre / "damaged_checkpoints" / f"checkpoints_{steps[-1]}").is_dir()
  assert max(int(p.name) for p in (pre / "checkpoints").iterdir() if p.name.isdigit()) == \
      steps[-1]   # retrained and saved again
  assert "Traceback" not in resumed.stderr + probe.stderr

  fresh = tmp_path / "fresh"
  failed = _main("--config=configs/pretrain.py:tiny", f"--workdir={fresh}", *data,
                 env={faults.FAIL_ENV: str(steps[-1])})
  assert failed.returncode != 0 and "Traceback" not in failed.stderr
  error = [l for l in failed.stderr.splitlines() if l.startswith("error:")]
  assert len(error) == 1 and f"saving step {steps[-1]}" in error[0], failed.stderr[-2000:]
  assert "No space left on device" in error[0] and "are intact" in error[0]
  again = _main("--config=configs/pretrain.py:tiny", f"--workdir={fresh}", *data)
  assert again.returncode == 0, again.stderr[-3000:]
  assert f"resuming from checkpoint step {steps[-2]}" in again.stderr
  history = json.loads((fresh / "history.json").read_text())
  assert history[-1]["step"] == steps[-1]


NOISE = ("Traceback", "TensorStore", "tensorstore", "never retrieved", "Task was destroyed",
         "Event loop is closed", "OUT_OF_RANGE", "orbax")


@pytest.mark.slow
def test_export_and_predict_take_the_checkpoint_before_a_damaged_one(tmp_path):
  """Export reads the newest checkpoint that passes its manifest (bytes flipped at the same
  size in the newest one); predict refuses a best checkpoint with a missing file in one
  line. Neither prints anything of orbax, TensorStore or asyncio."""
  data = [f"--config.data.dir={tmp_path / 'sim'}", f"--config.data.cache_dir={tmp_path / 'c'}",
          "--config.data.sim.workers=1"]
  pre, fine = tmp_path / "pre", tmp_path / "fine"
  for args in (["--config=configs/pretrain.py:tiny", f"--workdir={pre}"],
               ["--config=configs/finetune.py:tiny", f"--workdir={fine}",
                f"--config.init_from={pre}"]):
    done = _main(*args, *data)
    assert done.returncode == 0, done.stderr[-3000:]
  steps = sorted(int(p.name) for p in (pre / "checkpoints").iterdir() if p.name.isdigit())
  flip_bytes(pre / "checkpoints" / str(steps[-1]))
  export = subprocess.run([sys.executable, "-m", "mae_jax.stages.export", f"--workdir={pre}",
                           f"--out={tmp_path / 'hf'}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
  assert export.returncode == 0, export.stderr[-3000:]
  skipped = [l for l in export.stderr.splitlines() if "skipped" in l]
  assert len(skipped) == 1 and f"checkpoints/{steps[-1]} skipped: it is damaged" in skipped[0]
  assert "CRC-32 differs at the same size" in skipped[0]
  assert f"checkpoint step {steps[-2]})" in export.stdout
  assert not any(n in export.stderr for n in NOISE), export.stderr[-3000:]

  # The epoch the fine-tune chose, then any earlier best: predict takes the next best.
  ranked = checkpoint.ranked_steps(fine / "checkpoints")
  assert ranked and ranked[0] == json.loads((fine / "eval_metrics.json").read_text())["step"]
  remove_a_file(fine / "checkpoints" / str(ranked[0]))
  predict = _main("--config=configs/predict.py:tiny", f"--workdir={tmp_path / 'predict'}",
                  f"--config.input={tmp_path / 'sim'}", f"--config.model_dir={fine}")
  skipped = [l for l in predict.stderr.splitlines() if "skipped" in l]
  assert len(skipped) == 1 and f"checkpoints/{ranked[0]} skipped" in skipped[0]
  assert "is missing" in skipped[0] and "trying the next best" in skipped[0]
  if len(ranked) > 1:
    assert predict.returncode == 0, predict.stderr[-3000:]
    assert f"step {ranked[1]}" in predict.stderr
  else:   # no other epoch was ever the best: refused in one line
    errors_ = [l for l in predict.stderr.splitlines() if l.startswith("error:")]
    assert predict.returncode != 0 and len(errors_) == 1 and "restores: step" in errors_[0]
  assert not any(n in predict.stderr for n in NOISE), predict.stderr[-3000:]
