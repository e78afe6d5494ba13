"""A stage's workdir: the names of the files stages leave there (spelled here once,
so every reader and writer agrees and existing workdirs resume), one run at a time
(an advisory lock naming its holder), and a check that it can be written before any
work starts."""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
import sys
from pathlib import Path
from typing import Iterator

from mae_jax.runtime import errors

LOCK_FILE = ".mae_jax.lock"
# What a stage leaves in its workdir, read back by resumes, later stages, predict,
# the pipeline, its report and the study.
CONFIG_FILE = "config.json"              # a training stage's config as run
HISTORY_FILE = "history.json"            # a training stage's record per epoch
METRICS_FILE = "metrics.jsonl"           # logged metrics, one JSON object a line
CHECKPOINTS = "checkpoints"              # orbax: the latest states, resumed from
BEST_CHECKPOINT = "best_checkpoint"      # the chosen epoch of runs before the BestN policy
PLOTS = "plots"                          # figures, each with its data in a .json beside it
DATA_SUMMARY = "data_summary.json"       # the data stage's summary
PRETRAIN_SUMMARY = "pretrain_summary.json"  # the pretrain stage's summary
EVAL_FILE = "eval_metrics.json"          # a classifier stage's test evaluation
FEATURES_FILE = "feature_choice.json"    # a probe's frozen feature, chosen on validation
STAGE_RECORD = "pipeline_stage.json"     # a pipeline stage's config, step and runs
DAMAGED_CHECKPOINTS = "damaged_checkpoints"  # checkpoints resume found damaged, set aside
# A Hugging Face model folder written by `stages/export.py`.
HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"


def writable_problem(workdir: str | os.PathLike[str]) -> str | None:
  """Why `workdir` cannot be created or written, or None if it can."""
  path = Path(workdir)
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe = path / f".write_test.{os.getpid()}"
    probe.write_bytes(b"ok")
    probe.unlink()
  except OSError as e:
    return f"workdir {path} cannot be written: {e.strerror or e}"
  return None


def _holder(f) -> str:
  f.seek(0)
  try:
    h = json.loads(f.read() or "{}")
  except json.JSONDecodeError:
    return "another process"
  return (f"pid {h.get('pid')} on host {h.get('host')}, started {h.get('started')}, "
          f"command: {h.get('command')}")


@contextlib.contextmanager
def lock(workdir: str | os.PathLike[str]) -> Iterator[Path]:
  """Holds `<workdir>/.mae_jax.lock` while a run uses the workdir.

  The lock is the kernel's (flock): it ends with the process, even on SIGKILL,
  so a crashed run never leaves a stale lock behind.

  Raises:
    errors.WorkdirBusyError: another live run holds it (its pid, host, start and command).
  """
  path = Path(workdir) / LOCK_FILE
  path.parent.mkdir(parents=True, exist_ok=True)
  f = open(path, "a+", encoding="utf-8")  # pylint: disable=consider-using-with
  try:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise errors.WorkdirBusyError(
          f"workdir {Path(workdir)} is in use by another run ({_holder(f)}). Wait for it "
          "to finish, stop it, or choose another --workdir.") from None
    f.seek(0)
    f.truncate()
    f.write(json.dumps({
        "pid": os.getpid(), "host": socket.gethostname(),
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(sys.argv)}))
    f.flush()
    yield path
  finally:
    f.close()  # releases the lock
