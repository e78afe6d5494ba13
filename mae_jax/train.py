"""Train state, data-parallel pretraining steps and the pretraining stage loop.

Data flows one way: tfds -> tf.data numpy batches (per process) -> global
device arrays -> jitted shard_map'ed step -> metrics / checkpoints / figures.
"""

from __future__ import annotations

import functools
import json
import os
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metric_writers
from clu import periodic_actions
from flax.training import train_state
from jax import lax
from jax.experimental import multihost_utils
from tqdm import tqdm

from mae_jax import checkpoint
from mae_jax import losses
from mae_jax import masking
from mae_jax import models
from mae_jax import optim
from mae_jax import parallel
from mae_jax import plots
from mae_jax.data import pipeline
from mae_jax.data import source

TrainState = train_state.TrainState
HISTORY_FILE = "history.json"


class NonFiniteError(FloatingPointError):
  """A loss or gradient became NaN/inf; the run stops before saving anything bad."""


# --- Model construction -------------------------------------------------------


def dtype_of(name: str):
  if name not in ("float32", "bfloat16"):
    raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {name!r}")
  return jnp.dtype(name)


def vit_config(model: ml_collections.ConfigDict) -> models.ViTConfig:
  if model.image_size % model.patch:
    raise ValueError(f"image size {model.image_size} is not divisible by patch {model.patch}")
  return models.ViTConfig(image_size=model.image_size, channels=model.channels,
                          patch=model.patch, dim=model.dim, depth=model.depth,
                          heads=model.heads, mlp_ratio=model.mlp_ratio)


def build_mae(model: ml_collections.ConfigDict) -> models.MAE:
  """The MAE described by a `model` config."""
  masking.num_kept(1, model.mask_ratio)  # validates the ratio
  return models.MAE(
      encoder=vit_config(model),
      decoder=models.DecoderConfig(dim=model.decoder_dim, depth=model.decoder_depth,
                                   heads=model.decoder_heads, mlp_ratio=model.mlp_ratio),
      mask_ratio=model.mask_ratio, dtype=dtype_of(model.dtype))


def init_mae(mae: models.MAE, key: jax.Array) -> Any:
  """Float32 parameters of `mae` from `key`."""
  enc = mae.encoder
  images = jnp.zeros((1, enc.image_size, enc.image_size, enc.channels), jnp.float32)
  noise = jnp.zeros((1, enc.num_patches), jnp.float32)
  return jax.jit(mae.init)(key, images, noise)["params"]


# --- Steps ----------------------------------------------------------------------


def _keep_if_finite(ok: jax.Array, new: Any, old: Any) -> Any:
  return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)


def make_pretrain_step(mae: models.MAE, loss_cfg: ml_collections.ConfigDict,
                       mesh: jax.sharding.Mesh):
  """A jitted data-parallel MAE step: (state, images, key) -> (state, metrics).

  Masking noise is drawn for the whole global batch from `fold_in(key, step)`
  before the per-device split, so masks do not depend on the device count. A
  step whose loss or gradient is non-finite leaves the state unchanged and
  reports `finite=False`.
  """
  patch = mae.encoder.patch

  def per_device(state: TrainState, images: jax.Array, noise: jax.Array):
    def loss_fn(params):
      out = mae.apply({"params": params}, images, noise)
      return losses.reconstruction_loss(
          out["logits"], images, out["mask"], patch=patch, loss=loss_cfg.type,
          norm_pix=loss_cfg.norm_pix, masked_only=loss_cfg.masked_only)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    grads = lax.pmean(grads, parallel.AXIS)
    loss = lax.pmean(loss, parallel.AXIS)
    grad_norm = optax.global_norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new_state = _keep_if_finite(ok, state.apply_gradients(grads=grads), state)
    return new_state, {"loss": loss, "grad_norm": grad_norm, "finite": ok}

  mapped = parallel.data_parallel(per_device, mesh,
                                  in_specs=(parallel.REPLICATED, parallel.BATCH, parallel.BATCH),
                                  out_specs=(parallel.REPLICATED, parallel.REPLICATED))

  @functools.partial(jax.jit, donate_argnums=0)
  def step(state: TrainState, images: jax.Array, key: jax.Array):
    noise = masking.masking_noise(jax.random.fold_in(key, state.step), images.shape[0],
                                  mae.encoder.num_patches)
    return mapped(state, images, noise)

  return step


def make_pretrain_eval(mae: models.MAE, loss_cfg: ml_collections.ConfigDict,
                       mesh: jax.sharding.Mesh):
  """A jitted data-parallel evaluation: (params, images, example mask, key, index) ->
  (loss sum, count), summed over devices; masks are fixed by (key, batch index)."""
  patch = mae.encoder.patch

  def per_device(params, images, example_mask, noise):
    out = mae.apply({"params": params}, images, noise)
    total, count = losses.reconstruction_loss_terms(
        out["logits"], images, out["mask"], patch=patch, loss=loss_cfg.type,
        norm_pix=loss_cfg.norm_pix, masked_only=loss_cfg.masked_only,
        example_mask=example_mask)
    return lax.psum(total, parallel.AXIS), lax.psum(count, parallel.AXIS)

  mapped = parallel.data_parallel(
      per_device, mesh,
      in_specs=(parallel.REPLICATED, parallel.BATCH, parallel.BATCH, parallel.BATCH),
      out_specs=(parallel.REPLICATED, parallel.REPLICATED))

  @jax.jit
  def evaluate(params, images, example_mask, key, index):
    noise = masking.masking_noise(jax.random.fold_in(key, index), images.shape[0],
                                  mae.encoder.num_patches)
    return mapped(params, images, example_mask, noise)

  return evaluate


# --- Host-side helpers -------------------------------------------------------------


def is_main_process() -> bool:
  return jax.process_index() == 0


def agree_min(value: int) -> int:
  """The minimum of `value` over all processes (the same number everywhere)."""
  if jax.process_count() == 1:
    return int(value)
  return int(np.min(multihost_utils.process_allgather(np.asarray(value))))


def agree_max(value: int) -> int:
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


def write_json_atomic(path: Path, obj: Any) -> None:
  tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
  tmp.write_text(json.dumps(obj, indent=1))
  os.replace(tmp, path)


def load_history(workdir: Path, completed_epochs: int) -> list[dict]:
  """Per-epoch records of earlier runs, cut to the epochs the checkpoint completed."""
  path = workdir / HISTORY_FILE
  if not path.exists():
    return []
  return [h for h in json.loads(path.read_text()) if h["epoch"] <= completed_epochs]


def flat_hparams(config: ml_collections.ConfigDict) -> dict[str, Any]:
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


# --- Figures ---------------------------------------------------------------------


def reconstruction_rows(mae: models.MAE, params: Any, images: np.ndarray, key: jax.Array,
                        loss_cfg: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """Input, masked input, reconstruction, and reconstruction with visible patches pasted."""
  enc = mae.encoder
  noise = masking.masking_noise(key, images.shape[0], enc.num_patches)
  out = jax.jit(mae.apply)({"params": params}, jnp.asarray(images), noise)
  pred = losses.predicted_images(out["logits"], loss_cfg.type)
  target = masking.patchify(jnp.asarray(images), enc.patch)
  if loss_cfg.norm_pix:  # back to pixel units with each patch's own statistics
    mean = target.mean(-1, keepdims=True)
    var = target.var(-1, keepdims=True, ddof=1)
    pred = pred * (var + 1e-6) ** 0.5 + mean
  mask = out["mask"][:, :, None]
  unp = functools.partial(masking.unpatchify, patch=enc.patch, grid=enc.grid,
                          channels=enc.channels)
  masked = unp(jnp.where(mask > 0, jnp.nan, target))
  return {
      "input": np.asarray(images),
      "masked input": np.asarray(masked),
      "reconstruction": np.clip(np.asarray(unp(pred)), 0, 1),
      "+ visible": np.clip(np.asarray(unp(jnp.where(mask > 0, pred, target))), 0, 1),
  }


# --- The pretraining stage -------------------------------------------------------------


def _phase_of(epoch: int, phase_epochs: tuple[int, ...]) -> int:
  ends = np.cumsum(phase_epochs)
  return int(np.searchsorted(ends, epoch, side="right"))


def pretrain(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) MAE pretraining; returns the final summary."""
  workdir = Path(workdir)
  main = is_main_process()
  phase_epochs = tuple(int(e) for e in config.phase_epochs)
  if len(phase_epochs) != len(config.phase_augment) or not phase_epochs or min(phase_epochs) < 0:
    raise ValueError(f"phase_epochs {config.phase_epochs} and phase_augment "
                     f"{config.phase_augment} must be equally long, with epochs >= 0")
  mesh = parallel.make_mesh()
  local_batch = parallel.check_batch(config.batch_size)
  local_eval = parallel.check_batch(config.eval_batch_size, "eval_batch_size")
  mae = build_mae(config.model)
  if main:
    workdir.mkdir(parents=True, exist_ok=True)

  prepared = source.load(config.data, progress=main)
  if tuple(prepared.image_shape) != (config.model.image_size,) * 2:
    raise ValueError(f"the data's images are {prepared.image_shape}, but "
                     f"model.image_size={config.model.image_size}")
  read = dict(classes=config.classes, process_index=jax.process_index(),
              process_count=jax.process_count(), cache=config.data.cache_in_memory)
  train_ip = pipeline.InputPipeline(prepared.builder, "train", **read)
  val_ip = pipeline.InputPipeline(prepared.builder, "validation", **read)
  steps_per_epoch = agree_min(train_ip.num_examples // local_batch)
  if steps_per_epoch < 1:
    raise ValueError(f"batch_size={config.batch_size} exceeds the {train_ip.num_examples} "
                     f"training images of {list(config.classes)} on this process")
  eval_batches = agree_max(-(-val_ip.num_examples // local_eval))
  total_epochs = sum(phase_epochs)
  total_steps = total_epochs * steps_per_epoch

  key = jax.random.key(config.seed)
  init_key, train_key, eval_key, plot_key = jax.random.split(key, 4)
  params = init_mae(mae, init_key)
  tx, schedule = optim.adamw(params, config.optim, total_steps, steps_per_epoch)
  state = parallel.replicate(TrainState.create(apply_fn=mae.apply, params=params, tx=tx), mesh)
  logging.info("MAE: %s encoder + decoder params (encoder %s)",
               f"{optim.count_params(params):,}", f"{optim.count_params(params['encoder']):,}")

  mngr = checkpoint.manager(workdir, config.keep_checkpoints)
  restored = checkpoint.restore_latest(mngr, state)
  step = 0
  if restored is not None:
    state, step = restored
    logging.info("resuming from checkpoint step %d (epoch %d, batch %d of %d)", step,
                 step // steps_per_epoch + 1, step % steps_per_epoch, steps_per_epoch)
  history = load_history(workdir, step // steps_per_epoch)
  writer = metric_writers.create_default_writer(str(workdir), just_logging=not main,
                                                asynchronous=True)
  if step == 0:
    writer.write_hparams(flat_hparams(config))
    if main:
      write_json_atomic(workdir / "config.json", config.to_dict())
  report = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer,
                                           every_secs=60)
  train_step = make_pretrain_step(mae, config.loss, mesh)
  eval_step = make_pretrain_eval(mae, config.loss, mesh)
  phase_starts = list(np.cumsum((0,) + phase_epochs[:-1]))
  plot_images = next(val_ip.eval_batches(config.num_reconstructions))["image"]

  def save_plots():
    if not main:
      return
    plots.loss_curves(history, workdir / "plots" / "loss_curve.png", phase_starts,
                      title=f"MAE pretraining ({config.loss.type} loss)")
    rows = reconstruction_rows(mae, jax.device_get(state.params), plot_images, plot_key,
                               config.loss)
    plots.reconstructions(rows, workdir / "plots" / "reconstructions.png",
                          title=f"step {int(state.step)}, mask ratio {config.model.mask_ratio}")

  def evaluate() -> float:
    total = count = 0.0
    for i, b in enumerate(val_ip.eval_batches(local_eval, eval_batches)):
      g = parallel.global_batch({"image": b["image"], "mask": b["mask"]}, mesh)
      t, c = eval_step(state.params, g["image"], g["mask"], eval_key, i)
      total, count = total + float(t), count + float(c)
    return total / max(count, 1.0)

  start_time = time.time()
  for epoch in range(step // steps_per_epoch, total_epochs):
    phase = _phase_of(epoch, phase_epochs)
    augment = source.augment_config(config.data) if config.phase_augment[phase] else None
    first = step - epoch * steps_per_epoch
    epoch_losses, pending, t0 = [], None, time.time()
    batches = train_ip.train_epoch(local_batch, seed=config.seed, epoch=epoch,
                                   start_batch=first, augment=augment)
    bar = tqdm(total=steps_per_epoch, initial=first, disable=not main, unit="step",
               desc=f"epoch {epoch + 1}/{total_epochs} (phase {phase + 1})", leave=False)
    for i, local in zip(range(first, steps_per_epoch), batches):
      images = parallel.global_batch({"image": local["image"]}, mesh)["image"]
      state, metrics = train_step(state, images, train_key)
      if pending is not None:  # checked one step late, so the device stays busy
        epoch_losses.append(check_finite(pending, step)["loss"])
        bar.set_postfix(loss=f"{epoch_losses[-1]:.4f}")
      pending, step = metrics, step + 1
      bar.update(1)
      report(step)
      if step % config.log_every_steps == 0 or i == steps_per_epoch - 1:
        host = check_finite(pending, step)
        writer.write_scalars(step, {"train_loss": host["loss"], "grad_norm": host["grad_norm"],
                                    "lr": float(schedule(step - 1))})
      if config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0:
        check_finite(pending, step)
        checkpoint.save(mngr, step, state)
    bar.close()
    if pending is not None:
      epoch_losses.append(check_finite(pending, step)["loss"])
    val_loss = evaluate()
    record = {"epoch": epoch + 1, "phase": phase + 1, "step": step,
              "train_loss": float(np.mean(epoch_losses)) if epoch_losses else None,
              "val_loss": val_loss, "lr": float(schedule(step - 1)),
              "seconds": round(time.time() - t0, 2)}
    history.append(record)
    writer.write_scalars(step, {"val_loss": val_loss, "epoch_train_loss": record["train_loss"]})
    logging.info("epoch %d/%d (phase %d): train %.5f, val %.5f, %.1f s", epoch + 1,
                 total_epochs, phase + 1, record["train_loss"] or float("nan"), val_loss,
                 record["seconds"])
    if main:
      write_json_atomic(workdir / HISTORY_FILE, history)
    last = epoch + 1 == total_epochs
    if (epoch + 1) % config.checkpoint_every_epochs == 0 or last:
      checkpoint.save(mngr, step, state)
    if (epoch + 1) % config.plot_every_epochs == 0 or last:
      save_plots()

  mngr.wait_until_finished()
  if not history or history[-1]["step"] != step:  # nothing trained now: still draw
    save_plots()
  writer.flush()
  summary = {"steps": step, "epochs": total_epochs, "steps_per_epoch": steps_per_epoch,
             "final_train_loss": history[-1]["train_loss"] if history else None,
             "final_val_loss": history[-1]["val_loss"] if history else None,
             "wall_seconds_this_run": round(time.time() - start_time, 1)}
  if main:
    write_json_atomic(workdir / "pretrain_summary.json", summary)
  logging.info("pretraining done: %s", summary)
  mngr.close()
  return summary
