"""What every training stage shares: train state, host-side checks and the epoch loop.

Data flows one way: tfds -> tf.data numpy batches (per process) -> global
device arrays -> jitted shard_map'ed step -> metrics / checkpoints / figures.
The stages (`pretrain.py`, `classify.py`) supply the step and what happens at
the end of each epoch.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metric_writers
from clu import periodic_actions
from flax.training import train_state
from jax.experimental import multihost_utils
from tqdm import tqdm

from mae_jax import checkpoint
from mae_jax import faults
from mae_jax import fileio
from mae_jax import models
from mae_jax.data import pipeline
from mae_jax.data import source

TrainState = train_state.TrainState
HISTORY_FILE = "history.json"


# A loss or gradient became NaN/inf; the run stops before saving anything bad.
NonFiniteError = checkpoint.NonFiniteError


class ResumeMismatchError(ValueError):
  """The workdir's checkpoint was made with settings that would change the batch order."""


def dtype_of(name: str):
  if name not in ("float32", "bfloat16"):
    raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {name!r}")
  return jnp.dtype(name)


def vit_config(model: ml_collections.ConfigDict) -> models.ViTConfig:
  """The encoder sizes of a `model` config."""
  if model.image_size % model.patch:
    raise ValueError(f"image size {model.image_size} is not divisible by patch {model.patch}")
  return models.ViTConfig(image_size=model.image_size, channels=model.channels,
                          patch=model.patch, dim=model.dim, depth=model.depth,
                          heads=model.heads, mlp_ratio=model.mlp_ratio)


def keep_if_finite(ok: jax.Array, new: Any, old: Any) -> Any:
  """`new` where `ok`, else `old` (a step with non-finite numbers changes nothing)."""
  return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)


# --- Host-side helpers -------------------------------------------------------------


def is_main_process() -> bool:
  return jax.process_index() == 0


def agree_min(value: int) -> int:
  """The minimum of `value` over all processes (the same number everywhere)."""
  if jax.process_count() == 1:
    return int(value)
  return int(np.min(multihost_utils.process_allgather(np.asarray(value))))


def agree_max(value: int) -> int:
  """The maximum of `value` over all processes."""
  if jax.process_count() == 1:
    return int(value)
  return int(np.max(multihost_utils.process_allgather(np.asarray(value))))


def check_finite(metrics: dict, step: int) -> dict[str, float]:
  """Host values of a step's metrics; raises NonFiniteError naming the step and metric."""
  host = {k: float(v) for k, v in jax.device_get(metrics).items()}
  if not host.get("finite", 1.0):
    bad = [f"{k}={v}" for k, v in host.items() if k != "finite" and not np.isfinite(v)]
    raise NonFiniteError(f"non-finite {', '.join(bad) or 'values'} at step {step}; the "
                         "update was not applied and no checkpoint of it was written. "
                         "Lower the learning rate or enable grad_clip_norm.")
  return host


def load_history(workdir: Path, completed_epochs: int) -> list[dict]:
  """Per-epoch records of earlier runs, cut to the epochs the checkpoint completed."""
  path = workdir / HISTORY_FILE
  if not path.exists():
    return []
  return [h for h in json.loads(path.read_text()) if h["epoch"] <= completed_epochs]


def flat_hparams(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config as flat `a.b.c` scalars, for TensorBoard's hparams."""
  out = {}

  def walk(prefix, node):
    for k, v in node.items():
      name = f"{prefix}{k}"
      if isinstance(v, (dict, ml_collections.ConfigDict)):
        walk(name + ".", v)
      else:
        out[name] = v if isinstance(v, (int, float, str, bool)) else str(v)

  walk("", config.to_dict())
  return out


def input_pipelines(config: ml_collections.ConfigDict, classes) -> tuple:
  """(prepared data, train pipeline, validation pipeline) of this process."""
  prepared = source.load(config.data, progress=is_main_process())
  if tuple(prepared.image_shape) != (config.model.image_size,) * 2:
    raise ValueError(f"the data's images are {prepared.image_shape}, but "
                     f"model.image_size={config.model.image_size}")
  read = dict(classes=classes, process_index=jax.process_index(),
              process_count=jax.process_count(), cache=config.data.cache_in_memory)
  pipes = [pipeline.InputPipeline(prepared.builder, split, **read)
           for split in ("train", "validation")]
  for ip in pipes:
    if agree_min(ip.num_examples) == 0:
      raise ValueError(f"the {ip.split} split holds no image of {list(classes)} for some process "
                       f"({config.data.dir}); add images or raise data.validation_fraction")
  return (prepared, *pipes)


# --- The epoch loop ----------------------------------------------------------------


@dataclasses.dataclass
class Loop:
  """A stage's training run: what to step, over which data, for how long."""
  config: ml_collections.ConfigDict   # reads seed, log_every_steps, checkpoint_every_*, keep_checkpoints
  workdir: Path
  state: Any                          # replicated train state with `.step`
  step_fn: Callable                   # (state, *global_inputs, key) -> (state, metrics)
  to_global: Callable[[dict], tuple]  # local numpy batch -> global step inputs
  train: pipeline.InputPipeline
  local_batch: int
  steps_per_epoch: int
  total_epochs: int
  schedule: optax.Schedule
  augment: Callable[[int], pipeline.AugmentConfig | None]   # epoch -> augmentation
  describe: Callable[[int], str] = lambda e: ""             # epoch -> progress-bar suffix
  phase: Callable[[int], int] = lambda e: 1                 # epoch -> phase (1-based)


def open_run(workdir: Path, config: ml_collections.ConfigDict, state: Any,
             steps_per_epoch: int, mngr) -> tuple[Any, int, list[dict], Any, dict | None]:
  """Resumes `state` from this workdir's latest checkpoint if there is one.

  Returns (state, step, history cut to that step, metric writer, the
  checkpoint's progress record or None).
  """
  restored = checkpoint.restore_latest(mngr, state)
  step, progress = 0, None
  if restored is not None:
    state, step, progress = restored
    logging.info("resuming from checkpoint step %d (epoch %d, batch %d of %d)", step,
                 step // steps_per_epoch + 1, step % steps_per_epoch, steps_per_epoch)
  history = load_history(workdir, step // steps_per_epoch)
  writer = metric_writers.create_default_writer(str(workdir), just_logging=not is_main_process(),
                                                asynchronous=True)
  if step == 0:
    writer.write_hparams(flat_hparams(config))
    if is_main_process():
      fileio.write_json_atomic(workdir / "config.json", config.to_dict())
  return state, step, history, writer, progress


def _progress(loop: Loop, step: int, key: jax.Array, losses: list[float]) -> dict[str, Any]:
  """Where a run stands after `step`: enough to continue it exactly (saved with the state).

  `epoch_losses` are the training losses not yet recorded in history.json.
  """
  epoch, batch = divmod(step, loop.steps_per_epoch)
  return {"step": step, "epoch": epoch, "batch_in_epoch": batch,
          "steps_per_epoch": loop.steps_per_epoch,
          "global_batch": loop.local_batch * jax.process_count(),
          "process_count": jax.process_count(), "train_examples": loop.train.num_examples,
          "seed": loop.config.seed, "rng_key": np.asarray(jax.random.key_data(key)).tolist(),
          "phase": loop.phase(min(epoch, loop.total_epochs - 1)), "epoch_losses": list(losses)}


def _resume_key(loop: Loop, step: int, progress: dict | None, key: jax.Array) -> jax.Array:
  """The run's PRNG key from the checkpoint, after checking that the checkpoint's
  data position means the same batches now (else resuming would repeat or skip some)."""
  if progress is None:
    return key
  now = _progress(loop, step, key, [])
  keys = ["step", "steps_per_epoch", "global_batch", "process_count", "seed", "rng_key"]
  if is_main_process():
    keys.append("train_examples")
  diffs = [f"{k} {progress.get(k)} in the checkpoint, {now[k]} now" for k in keys
           if progress.get(k) != now[k]]
  if agree_max(int(bool(diffs))):
    raise ResumeMismatchError(
        f"cannot resume {loop.workdir} at step {step} exactly: "
        f"{'; '.join(diffs) or 'another process differs'}. The batch order would change "
        "(repeating or skipping images); use the original data and batch_size/seed, or a new "
        "--workdir.")
  return jax.random.wrap_key_data(np.asarray(progress["rng_key"], np.uint32))


def run_epochs(loop: Loop, step: int, history: list[dict], mngr, writer,
               end_epoch: Callable[[Any, int, dict], None],
               progress: dict | None = None) -> Any:
  """Trains from `step` to the end, epoch by epoch; returns the final state.

  Each epoch's batches depend only on (seed, epoch, batch index), so a resumed
  run continues with exactly the batch an uninterrupted one would see; the
  checkpoint's `progress` record (position, PRNG key, the epoch's losses so far)
  is checked against this run and continued. Metrics are checked one step late
  (the device stays busy); a non-finite step stops the run before anything is
  saved. `end_epoch(state, epoch, record)` adds evaluation results to the
  epoch's record (and may draw or save); then the record joins `history.json`
  and a checkpoint is saved when due.
  """
  cfg, main = loop.config, is_main_process()
  due = lambda n, every: every > 0 and n % every == 0  # pylint: disable=unnecessary-lambda-assignment
  key = _resume_key(loop, step, progress, jax.random.fold_in(jax.random.key(cfg.seed), 1))
  carried = list((progress or {}).get("epoch_losses", []))
  done = step // loop.steps_per_epoch
  if step and step % loop.steps_per_epoch == 0 and (not history or history[-1]["epoch"] < done):
    # A step checkpoint at an epoch's last step, then a stop before its evaluation: do it now.
    record = {"epoch": done, "step": step,
              "train_loss": float(np.mean(carried)) if carried else None,
              "lr": float(loop.schedule(step - 1)), "seconds": 0.0}
    end_epoch(loop.state, done - 1, record)
    history.append(record)
    if main:
      fileio.write_json_atomic(loop.workdir / HISTORY_FILE, history)
  report = periodic_actions.ReportProgress(
      num_train_steps=loop.total_epochs * loop.steps_per_epoch, writer=writer, every_secs=60)
  state = loop.state
  for epoch in range(step // loop.steps_per_epoch, loop.total_epochs):
    first = step - epoch * loop.steps_per_epoch
    losses = carried if first else []
    pending, last, t0 = None, {}, time.time()

    def flush(step):
      """Checks the pending step's metrics (raising on NaN/inf) and keeps its loss."""
      nonlocal pending, last
      if pending is not None:
        last = check_finite(pending, step)
        losses.append(last["loss"])
        pending = None

    batches = loop.train.train_epoch(loop.local_batch, seed=cfg.seed, epoch=epoch,
                                     start_batch=first, augment=loop.augment(epoch))
    bar = tqdm(total=loop.steps_per_epoch, initial=first, disable=not main, unit="step",
               desc=f"epoch {epoch + 1}/{loop.total_epochs}{loop.describe(epoch)}", leave=False)
    for i, local in zip(range(first, loop.steps_per_epoch), batches):
      state, metrics = loop.step_fn(state, *loop.to_global(local), key)
      flush(step)  # the previous step's, so the device stays busy
      pending, step = metrics, step + 1
      faults.maybe_kill("step", step)
      bar.update(1)
      if losses:
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
      report(step)
      if due(step, cfg.log_every_steps) or i == loop.steps_per_epoch - 1:
        flush(step)
        writer.write_scalars(step, {f"train_{k}": v for k, v in last.items() if k != "finite"}
                             | {"lr": float(loop.schedule(step - 1))})
      if due(step, cfg.checkpoint_every_steps):
        flush(step)
        checkpoint.save(mngr, step, state, _progress(loop, step, key, losses))
    bar.close()
    flush(step)
    record = {"epoch": epoch + 1, "step": step,
              "train_loss": float(np.mean(losses)) if losses else None,
              "lr": float(loop.schedule(step - 1)), "seconds": round(time.time() - t0, 2)}
    end_epoch(state, epoch, record)
    history.append(record)
    writer.write_scalars(step, {k: v for k, v in record.items()
                                if isinstance(v, (int, float)) and k not in ("epoch", "step")})
    logging.info("epoch %d/%d%s: %s", epoch + 1, loop.total_epochs, loop.describe(epoch),
                 ", ".join(f"{k} {v:.5g}" for k, v in record.items()
                           if isinstance(v, float)))
    if main:
      fileio.write_json_atomic(loop.workdir / HISTORY_FILE, history)
    if due(epoch + 1, cfg.checkpoint_every_epochs) or epoch + 1 == loop.total_epochs:
      checkpoint.save(mngr, step, state, _progress(loop, step, key, []))
  return state
