"""One command from nothing to a report: data -> MAE pretraining (every phase) ->
linear probe -> fine-tune, each stage in its own sub-workdir, then `report.md` and
`report.html` in the workdir.

  python main.py --config=configs/pipeline.py:demo --workdir=runs/pipeline_demo
  python main.py --config=configs/pipeline.py:seed --workdir=runs/pipeline_seed

Each stage's keys are those of its own config file (`configs/pretrain.py`,
`probe.py`, `finetune.py`), under the stage's name:
`--config.pretrain.phase_epochs='(10, 20)'`, `--config.probe.epochs=5`,
`--config.finetune.optim.layer_decay=0.75`, `--config.pretrain.init_weights=mae.pth`.
The data settings are shared by every stage (`--config.data.dir=...`). The
pipeline sets each stage's `init_from` to its own sub-workdirs (`WORKDIR/pretrain`
for the probe, `WORKDIR/<finetune_from>` for the fine-tune).

Running the command again skips the stages already complete (same config, same
checkpoint), resumes a partial one, and rewrites the report.
"""

import ml_collections

from configs import common
from configs import data as data_config
from configs import finetune as finetune_config
from configs import pretrain as pretrain_config
from configs import probe as probe_config

# Keys the pipeline sets itself in every stage's config.
PIPELINE_KEYS = ("stage", "preset", "data", "init_from", "init_from_stage")


def stage_keys(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A stage's config without the keys a chain (pipeline, study) sets itself."""
  for key in PIPELINE_KEYS:
    if key in config:
      del config[key]
  return config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  preset, _ = common.parse(arg)
  config = ml_collections.ConfigDict()
  config.stage = "pipeline"
  config.preset = preset
  config.data = data_config.get_config(preset).data   # shared by every stage
  # Stages run in this order; leave some out with e.g. --config.stages='("data", "pretrain")'.
  config.stages = ("data", "pretrain", "probe", "finetune")
  # Where the fine-tune starts: 'pretrain' (a new head) or 'probe' (with
  # --config.finetune.dont_load='()' it also keeps the probe's trained head).
  config.finetune_from = "pretrain"
  # The data stage's own keys (configs/data.py): the sample figure, the throughput check.
  config.data_stage = stage_keys(data_config.get_config(preset))
  config.pretrain = stage_keys(pretrain_config.get_config(preset))
  config.probe = stage_keys(probe_config.get_config(preset))
  config.finetune = stage_keys(finetune_config.get_config(preset))
  return config
