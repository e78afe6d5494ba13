"""mae_jax entry point: one stage per config.

  python main.py --config=configs/pipeline.py:demo --workdir=runs/pipeline_demo   # all stages + report
  python main.py --config=configs/predict.py --workdir=runs/predict --config.input=FOLDER
  python main.py --config=configs/data.py:demo --workdir=runs/data_demo
  python main.py --config=configs/pretrain.py:demo --workdir=runs/pretrain_demo
  python main.py --config=configs/probe.py:demo --workdir=runs/probe_demo
  python main.py --config=configs/finetune.py:demo --workdir=runs/finetune_demo

The config file's `stage` key picks what runs (`mae_jax/stages/`). Intentionally
short: flags, joining a multi-process run, then `launch.run`.
"""

import os
import shlex
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # pylint: disable=g-import-not-at-top
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from mae_jax.runtime import distributed
from mae_jax.runtime import errors
from mae_jax.runtime import preemption
from mae_jax.stages import launch

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
_CACHE = flags.DEFINE_string(
    "compilation_cache", os.environ.get("MAE_JAX_COMPILATION_CACHE", "~/.cache/mae_jax/xla"),
    "Folder of XLA's compiled steps, reused by later runs and stages ('' turns it off).")
_STOP_SIGNAL = flags.DEFINE_string(
    "stop_signal", preemption.DEFAULT_SIGNAL,
    "Besides SIGTERM and SIGINT, the signal on which a run saves a checkpoint at the step it "
    "is at and stops (Slurm: --signal=USR1@120); '' for none.")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(logging.logging.Filter):
  """Drops the INFO chatter of orbax, tfds and JAX, and below INFO (`-v 1`) every
  library's debug lines but mae_jax's own (warnings and errors always pass)."""

  def filter(self, record):
    if record.levelno < logging.logging.INFO:
      return "/mae_jax/" in record.pathname or record.pathname == __file__
    noisy = ("/orbax/", "/tensorflow_datasets/", "/jax/_src/")
    return record.levelno > logging.logging.INFO or not any(n in record.pathname for n in noisy)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  distributed.initialize(_DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value,
                         _PROCESS_ID.value)  # before anything touches a device
  launch.enable_compilation_cache(_CACHE.value)
  if jax.process_index() > 0:  # process 0 speaks for the run
    logging.set_verbosity(logging.WARNING)
  try:
    preemption.signal_names(_STOP_SIGNAL.value)
  except ValueError as e:
    raise SystemExit(f"error: --{e}") from None
  try:
    logging.info("stage %s in %s: %s", _CONFIG.value.stage, _WORKDIR.value,
                 launch.describe_config(_CONFIG.value))
    with preemption.watching(_STOP_SIGNAL.value):
      launch.run(_CONFIG.value, _WORKDIR.value)
  except preemption.Preempted as e:
    # A cluster's stop: one line, then the status a requeueing job script tests for.
    if jax.process_index() == 0:
      command = shlex.join([os.path.basename(sys.executable), *sys.argv])
      print(f"{e}; resume with: {command}", file=sys.stderr, flush=True)
    sys.exit(preemption.EXIT_STATUS)
  except errors.UserError as e:
    # Problems with the user's config, data or workdir, or a diverging run: one clear
    # message, no traceback.
    raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
  app.run(main, flags_parser=launch.parse_flags)
