"""mae_jax entry point: one stage per config.

  python main.py --config=configs/pipeline.py:demo --workdir=runs/pipeline_demo   # all stages + report
  python main.py --config=configs/predict.py --workdir=runs/predict --config.input=FOLDER
  python main.py --config=configs/data.py:demo --workdir=runs/data_demo
  python main.py --config=configs/pretrain.py:demo --workdir=runs/pretrain_demo
  python main.py --config=configs/probe.py:demo --workdir=runs/probe_demo
  python main.py --config=configs/finetune.py:demo --workdir=runs/finetune_demo

The config file's `stage` key picks what runs; the logic lives in `mae_jax/`.
"""

import contextlib
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Stage config file, e.g. configs/data.py:demo.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for this stage's outputs.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"],
    "Join a multi-process run: 'auto' when the flags below are given or a SLURM, Open MPI or "
    "Cloud TPU pod environment is detected; 'on' always (JAX detects the cluster); 'off' never.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, for a multi-process run.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in the run.")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(logging.logging.Filter):
  """Drops the INFO chatter of orbax and tfds (warnings and errors still pass)."""

  def filter(self, record):
    noisy = ("/orbax/", "/tensorflow_datasets/", "/jax/_src/")
    return record.levelno > logging.logging.INFO or not any(n in record.pathname for n in noisy)


def _stages():
  from mae_jax import data_stage  # pylint: disable=g-import-not-at-top
  from mae_jax import classify  # pylint: disable=g-import-not-at-top
  from mae_jax import pipeline  # pylint: disable=g-import-not-at-top
  from mae_jax import predict  # pylint: disable=g-import-not-at-top
  from mae_jax import pretrain  # pylint: disable=g-import-not-at-top
  return {"data": data_stage.run, "pretrain": pretrain.pretrain, "probe": classify.classify,
          "finetune": classify.classify, "pipeline": pipeline.run, "predict": predict.predict}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  from mae_jax import distributed  # pylint: disable=g-import-not-at-top
  distributed.initialize(_DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value,
                         _PROCESS_ID.value)  # before anything touches a device
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() > 0:  # process 0 speaks for the run
    logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  stages = _stages()
  if config.stage not in stages:
    raise app.UsageError(f"unknown stage {config.stage!r}; known: {', '.join(stages)}")
  logging.info("stage %s, workdir %s, config:\n%s", config.stage, _WORKDIR.value, config)
  from mae_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from mae_jax import train  # pylint: disable=g-import-not-at-top
  from mae_jax import validate  # pylint: disable=g-import-not-at-top
  from mae_jax import workdir  # pylint: disable=g-import-not-at-top
  from mae_jax.data import builder, layout  # pylint: disable=g-import-not-at-top
  try:
    validate.check(config, _WORKDIR.value)  # before any data is read or anything compiled
    # Process 0 holds the lock for the run (a shared filesystem may not share flocks).
    with workdir.lock(_WORKDIR.value) if jax.process_index() == 0 else contextlib.nullcontext():
      stages[config.stage](config, _WORKDIR.value)
  except (validate.ConfigError, workdir.WorkdirBusyError, layout.LayoutError,
          builder.BadDataError, train.NonFiniteError, train.ResumeMismatchError,
          checkpoint.MissingCheckpointError, checkpoint.IncompatibleCheckpointError) as e:
    # Problems with the user's config, data or workdir, or a diverging run: one clear
    # message, no traceback.
    raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
  app.run(main)
