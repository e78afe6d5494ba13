"""The `pipeline` stage: data, pretraining, probe and fine-tune in order, each in
its own sub-workdir, then the report.

  python main.py --config=configs/pipeline.py:demo --workdir=runs/pipeline_demo

`WORKDIR/<stage>/` holds what `main.py --config=configs/<stage>.py` would write
there, plus `pipeline_stage.json`, the stage's run record (`stages/runs.py`). A
stage is complete when that record says it finished with the config it is given
now and its latest checkpoint is still the one it finished at; a complete stage is
skipped without reading data or compiling anything. Any other stage runs, and
resumes from its own latest checkpoint, so a second invocation of a finished
pipeline only rewrites the report, and an interrupted one picks up where it stopped.
"""

from __future__ import annotations

import os
from pathlib import Path

import ml_collections
from absl import logging

from mae_jax.stages import classify  # pylint: disable=unused-import (registers probe, finetune)
from mae_jax.stages import data  # pylint: disable=unused-import (registers data)
from mae_jax.stages import pretrain  # pylint: disable=unused-import (registers pretrain)
from mae_jax.stages import registry
from mae_jax.stages import report
from mae_jax.stages import runs as runs_lib
from mae_jax.stages import validate
from mae_jax.train import loop


def stage_configs(config: ml_collections.ConfigDict,
                  workdir: str | os.PathLike[str]) -> dict[str, ml_collections.ConfigDict]:
  """Each stage's full config as it will run: its sub-config, the shared data
  settings, the preset, and (probe, fine-tune) `init_from` in this pipeline.

  Raises:
    ValueError: an unknown stage or `finetune_from`.
  """
  workdir = Path(workdir)
  unknown = [s for s in config.stages if s not in runs_lib.STAGES]
  if unknown or not config.stages:
    raise ValueError(f"stages={tuple(config.stages)}: choose among {', '.join(runs_lib.STAGES)}")
  if config.finetune_from not in ("pretrain", "probe"):
    raise ValueError(f"finetune_from={config.finetune_from!r} must be 'pretrain' or 'probe'")
  sources = {"probe": "pretrain", "finetune": config.finetune_from}
  out = {}
  for name in sorted(set(config.stages), key=runs_lib.STAGES.index):
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
    record = runs_lib.read_record(stage_dir)
    why = runs_lib.incomplete_reason(name, stage_dir, stage, record)
    if why is None:
      logging.info("stage %s: complete in %s, skipped", name, stage_dir)
      skipped.append(name)
      continue
    logging.info("stage %s: %s; running it in %s", name, why, stage_dir)
    runs_lib.run_stage(name, registry.get(name), stage, stage_dir, record)
    ran.append(name)
  paths = {}
  if loop.is_main_process():
    paths = report.write(workdir, config, stages)
    logging.info("report: %s (and %s)", paths["markdown"], paths["html"])
  return {"ran": ran, "skipped": skipped, "report": str(paths.get("markdown", ""))}
