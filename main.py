"""mae_jax entry point: one stage per config.

  python main.py --config=configs/data.py:demo --workdir=runs/data_demo
  python main.py --config=configs/pretrain.py:demo --workdir=runs/pretrain_demo
  python main.py --config=configs/probe.py:demo --workdir=runs/probe_demo
  python main.py --config=configs/finetune.py:demo --workdir=runs/finetune_demo

The config file's `stage` key picks what runs; the logic lives in `mae_jax/`.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Stage config file, e.g. configs/data.py:demo.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for this stage's outputs.")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(logging.logging.Filter):
  """Drops the INFO chatter of orbax and tfds (warnings and errors still pass)."""

  def filter(self, record):
    noisy = ("/orbax/", "/tensorflow_datasets/", "/jax/_src/")
    return record.levelno > logging.logging.INFO or not any(n in record.pathname for n in noisy)


def _stages():
  from mae_jax import data_stage  # pylint: disable=g-import-not-at-top
  from mae_jax import classify  # pylint: disable=g-import-not-at-top
  from mae_jax import pretrain  # pylint: disable=g-import-not-at-top
  return {"data": data_stage.run, "pretrain": pretrain.pretrain, "probe": classify.classify,
          "finetune": classify.classify}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  config = _CONFIG.value
  stages = _stages()
  if config.stage not in stages:
    raise app.UsageError(f"unknown stage {config.stage!r}; known: {', '.join(stages)}")
  logging.info("stage %s, workdir %s, config:\n%s", config.stage, _WORKDIR.value, config)
  from mae_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from mae_jax import train  # pylint: disable=g-import-not-at-top
  from mae_jax.data import builder, layout  # pylint: disable=g-import-not-at-top
  try:
    stages[config.stage](config, _WORKDIR.value)
  except (layout.LayoutError, builder.BadDataError, train.NonFiniteError,
          checkpoint.MissingCheckpointError, checkpoint.IncompatibleCheckpointError) as e:
    # Problems with the user's data or a diverging run: one clear message, no traceback.
    raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
  app.run(main)
