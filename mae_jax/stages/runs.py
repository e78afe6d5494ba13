"""A pipeline stage's run record, `<stage workdir>/pipeline_stage.json`, and what it decides.

The record holds the stage's config as run, the checkpoint step it finished at, the
stage it started from, and the wall time and hardware of each run (a failed one
too). The pipeline and the study run stages through `run_stage` and skip the
complete ones (`incomplete_reason`); the report reads the records back. This module
owns the record; the file names are `runtime.workdir`'s.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable

import jax
import ml_collections

from mae_jax.models import build
from mae_jax.runtime import checkpoint
from mae_jax.runtime import fileio
from mae_jax.runtime import preemption
from mae_jax.runtime import workdir as workdir_lib
from mae_jax.train import loop

# The pipeline's stages in order, and the file each writes last (its output).
STAGES = ("data", "pretrain", "probe", "finetune")
TRAINING = ("pretrain", "probe", "finetune")
OUTPUT = {"data": workdir_lib.DATA_SUMMARY, "pretrain": workdir_lib.PRETRAIN_SUMMARY,
          "probe": workdir_lib.EVAL_FILE, "finetune": workdir_lib.EVAL_FILE}
# Config keys ignored when deciding whether a finished stage's config changed:
# the pipeline derives them from its workdir, which may be given another way.
_DERIVED = ("init_from",)


def read_record(stage_dir: str | os.PathLike[str]) -> dict | None:
  """A stage's `pipeline_stage.json`, or None if it has none."""
  path = Path(stage_dir) / workdir_lib.STAGE_RECORD
  return fileio.read_json(path) if path.exists() else None


def _load() -> float | None:
  """The 1-minute load average (how busy a shared machine is), if the OS tells it."""
  return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def hardware() -> dict[str, Any]:
  """What this process runs on: accelerators, CPU, memory, load, versions."""
  kinds = collections.Counter(d.device_kind for d in jax.devices())
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      cpu = next((line.split(":", 1)[1].strip() for line in f
                  if line.startswith("model name")), cpu)
  except OSError:
    pass
  try:
    memory = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
  except (ValueError, OSError, AttributeError):
    memory = None
  return {
      "backend": jax.default_backend(),
      "devices": ", ".join(f"{n} x {k}" for k, n in kinds.items()),
      "process_count": jax.process_count(),
      "cpu": cpu,
      "cpu_cores": os.cpu_count(),
      "memory_gib": memory,
      "load_average_1m": _load(),
      "host": platform.node(),
      "python": platform.python_version(),
      "jax": jax.__version__,
  }


def _jsonable(config: ml_collections.ConfigDict) -> Any:
  return json.loads(json.dumps(config.to_dict()))


def _comparable(config: dict) -> dict:
  return {k: v for k, v in config.items() if k not in _DERIVED}


def incomplete_reason(name: str, stage_dir: Path, config: ml_collections.ConfigDict,
                      record: dict | None) -> str | None:
  """Why stage `name` must (still) run, or None if it is complete."""
  if record is None:
    return "not run yet"
  if not record.get("complete"):
    return "its last run did not finish"
  if _comparable(record.get("config", {})) != _comparable(_jsonable(config)):
    return "its config changed since it finished (it resumes from its checkpoint)"
  if not (stage_dir / OUTPUT[name]).exists():
    return f"{OUTPUT[name]} is missing"
  if name in TRAINING and checkpoint.latest_step(stage_dir) != record.get("step"):
    return "its latest checkpoint is not the one it finished at"
  return None


def _now() -> str:
  return datetime.datetime.now().isoformat(timespec="seconds")


def run_stage(name: str, fn: Callable, config: ml_collections.ConfigDict, stage_dir: Path,
              record: dict | None) -> None:
  """Runs one stage under its workdir lock and records the run (also a failed one)."""
  if preemption.received() is not None:   # a stop asked for before this stage began
    raise preemption.Preempted(preemption.received())
  main = loop.is_main_process()
  source = None
  if "init_from" in config and config.init_from:
    source = {"stage": config.init_from_stage,
              "step": checkpoint.latest_step(config.init_from)}
  this = {"started": _now(), "seconds": None, "finished": False, "hardware": hardware()}
  if "model" in config and "dtype" in config.model:
    this["compute_dtype"] = build.dtype_of(config.model.dtype).name
  # The lock is taken before anything is recorded: a workdir another process holds
  # raises WorkdirBusyError and leaves its record alone (the study's workers rely on it).
  with workdir_lib.lock(stage_dir) if main else contextlib.nullcontext():
    if main and stage_dir.exists():   # another process may have finished it meanwhile
      record = read_record(stage_dir)
      if incomplete_reason(name, stage_dir, config, record) is None:
        return
    _run_and_record(name, fn, config, stage_dir, source,
                    list((record or {}).get("runs", [])), this)


def _run_and_record(name: str, fn: Callable, config: ml_collections.ConfigDict, stage_dir: Path,
                    source: dict | None, runs: list[dict], this: dict) -> None:
  main = loop.is_main_process()
  start = time.time()
  try:
    fn(config, str(stage_dir))
    this["finished"] = True
  finally:
    this["seconds"] = round(time.time() - start, 1)
    this["load_average_1m_end"] = _load()
    if main:
      stage_dir.mkdir(parents=True, exist_ok=True)
      fileio.write_json_atomic(stage_dir / workdir_lib.STAGE_RECORD, {
          "stage": name, "complete": this["finished"], "config": _jsonable(config),
          "step": checkpoint.latest_step(stage_dir) if name in TRAINING else None,
          "source": source, "runs": runs + [this]})
