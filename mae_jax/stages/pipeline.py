"""The `pipeline` stage: data, pretraining, probe and fine-tune in order, each in
its own sub-workdir, then the report.

  python main.py --config=configs/pipeline.py:demo --workdir=runs/pipeline_demo

`WORKDIR/<stage>/` holds what `main.py --config=configs/<stage>.py` would write
there, plus `pipeline_stage.json`: the stage's config as run, the checkpoint step
it finished at, and the wall time and hardware of each run. A stage is complete
when that record says it finished with the config it is given now and its latest
checkpoint is still the one it finished at; a complete stage is skipped without
reading data or compiling anything. Any other stage runs, and resumes from its
own latest checkpoint, so a second invocation of a finished pipeline only
rewrites the report, and an interrupted one picks up where it stopped.
"""

from __future__ import annotations

import collections
import datetime
import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable

import jax
import ml_collections
from absl import logging

from mae_jax.runtime import checkpoint
from mae_jax.runtime import fileio
from mae_jax.runtime import workdir as workdir_lib
from mae_jax.stages import classify  # pylint: disable=unused-import (registers probe, finetune)
from mae_jax.stages import data  # pylint: disable=unused-import (registers data)
from mae_jax.stages import pretrain  # pylint: disable=unused-import (registers pretrain)
from mae_jax.stages import registry
from mae_jax.stages import report
from mae_jax.stages import validate
from mae_jax.train import loop

STAGES, STAGE_FILE, OUTPUT = report.STAGES, report.STAGE_FILE, report.OUTPUT
TRAINING = ("pretrain", "probe", "finetune")
# Config keys ignored when deciding whether a finished stage's config changed:
# the pipeline derives them from its workdir, which may be given another way.
_DERIVED = ("init_from",)


def stage_configs(config: ml_collections.ConfigDict,
                  workdir: str | os.PathLike[str]) -> dict[str, ml_collections.ConfigDict]:
  """Each stage's full config as it will run: its sub-config, the shared data
  settings, the preset, and (probe, fine-tune) `init_from` in this pipeline.

  Raises:
    ValueError: an unknown stage or `finetune_from`.
  """
  workdir = Path(workdir)
  unknown = [s for s in config.stages if s not in STAGES]
  if unknown or not config.stages:
    raise ValueError(f"stages={tuple(config.stages)}: choose among {', '.join(STAGES)}")
  if config.finetune_from not in ("pretrain", "probe"):
    raise ValueError(f"finetune_from={config.finetune_from!r} must be 'pretrain' or 'probe'")
  sources = {"probe": "pretrain", "finetune": config.finetune_from}
  out = {}
  for name in sorted(set(config.stages), key=STAGES.index):
    sub = config.data_stage if name == "data" else config[name]
    stage = sub.copy_and_resolve_references()
    stage.unlock()
    stage.stage = name
    stage.preset = config.preset
    stage.data = config.data.copy_and_resolve_references()
    if name in sources:
      stage.init_from = str(workdir / sources[name])
      stage.init_from_stage = sources[name]
    stage.lock()
    out[name] = stage
  return out


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
  main = loop.is_main_process()
  source = None
  if "init_from" in config and config.init_from:
    source = {"stage": config.init_from_stage,
              "step": checkpoint.latest_step(config.init_from)}
  runs = list((record or {}).get("runs", []))
  this = {"started": _now(), "seconds": None, "finished": False, "hardware": hardware()}
  start = time.time()
  try:
    if main:
      with workdir_lib.lock(stage_dir):
        fn(config, str(stage_dir))
    else:
      fn(config, str(stage_dir))
    this["finished"] = True
  finally:
    this["seconds"] = round(time.time() - start, 1)
    this["load_average_1m_end"] = _load()
    if main:
      stage_dir.mkdir(parents=True, exist_ok=True)
      fileio.write_json_atomic(stage_dir / STAGE_FILE, {
          "stage": name, "complete": this["finished"], "config": _jsonable(config),
          "step": checkpoint.latest_step(stage_dir) if name in TRAINING else None,
          "source": source, "runs": runs + [this]})


@registry.register("pipeline")
def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs every incomplete stage of `config.stages` in order, then writes the report.

  Returns:
    {"ran": stages run now, "skipped": stages found complete, "report": report.md path}.
  """
  workdir = Path(workdir)
  stages = stage_configs(config, workdir)
  validate.check_chain(stages, workdir)
  ran, skipped = [], []
  for name, stage in stages.items():
    stage_dir = workdir / name
    record = report.read_record(stage_dir)
    why = incomplete_reason(name, stage_dir, stage, record)
    if why is None:
      logging.info("stage %s: complete in %s, skipped", name, stage_dir)
      skipped.append(name)
      continue
    logging.info("stage %s: %s; running it in %s", name, why, stage_dir)
    run_stage(name, registry.get(name), stage, stage_dir, record)
    ran.append(name)
  paths = {}
  if loop.is_main_process():
    paths = report.write(workdir, config, stages)
    logging.info("report: %s (and %s)", paths["markdown"], paths["html"])
  return {"ran": ran, "skipped": skipped, "report": str(paths.get("markdown", ""))}
