"""MAE pretraining: the model from a config, data-parallel steps, the stage loop.

  python main.py --config=configs/pretrain.py:demo --workdir=runs/pretrain_demo
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax import lax

from mae_jax import checkpoint
from mae_jax import convert
from mae_jax import fileio
from mae_jax import losses
from mae_jax import masking
from mae_jax import models
from mae_jax import optim
from mae_jax import parallel
from mae_jax import plots
from mae_jax import train
from mae_jax.data import source


# --- Model and steps ---------------------------------------------------------------


def build_mae(model: ml_collections.ConfigDict) -> models.MAE:
  """The MAE described by a `model` config."""
  masking.num_kept(1, model.mask_ratio)  # validates the ratio
  return models.MAE(
      encoder=train.vit_config(model),
      decoder=models.DecoderConfig(dim=model.decoder_dim, depth=model.decoder_depth,
                                   heads=model.decoder_heads, mlp_ratio=model.mlp_ratio),
      mask_ratio=model.mask_ratio, dtype=train.dtype_of(model.dtype))


def init_mae(mae: models.MAE, key: jax.Array) -> Any:
  """Float32 parameters of `mae` from `key`."""
  enc = mae.encoder
  images = jnp.zeros((1, enc.image_size, enc.image_size, enc.channels), jnp.float32)
  noise = jnp.zeros((1, enc.num_patches), jnp.float32)
  return jax.jit(mae.init)(key, images, noise)["params"]


# --- Steps ----------------------------------------------------------------------


def make_pretrain_step(mae: models.MAE, loss_cfg: ml_collections.ConfigDict,
                       mesh: jax.sharding.Mesh):
  """A jitted data-parallel MAE step: (state, images, key) -> (state, metrics).

  Masking noise is drawn for the whole global batch from `fold_in(key, step)`
  before the per-device split, so masks do not depend on the device count. A
  step whose loss or gradient is non-finite leaves the state unchanged and
  reports `finite=False`.
  """
  patch = mae.encoder.patch

  def per_device(state: train.TrainState, images: jax.Array, noise: jax.Array):
    def loss_fn(params):
      out = mae.apply({"params": params}, images, noise)
      return losses.reconstruction_loss(
          out["logits"], images, out["mask"], patch=patch, loss=loss_cfg.type,
          norm_pix=loss_cfg.norm_pix, masked_only=loss_cfg.masked_only)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    grads = lax.pmean(grads, parallel.AXIS)
    loss = lax.pmean(loss, parallel.AXIS)
    grad_norm = optax.tree.norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new_state = train.keep_if_finite(ok, state.apply_gradients(grads=grads), state)
    return new_state, {"loss": loss, "grad_norm": grad_norm, "finite": ok}

  mapped = parallel.data_parallel(per_device, mesh,
                                  in_specs=(parallel.REPLICATED, parallel.BATCH, parallel.BATCH),
                                  out_specs=(parallel.REPLICATED, parallel.REPLICATED))

  @functools.partial(jax.jit, donate_argnums=0)
  def step(state: train.TrainState, images: jax.Array, key: jax.Array):
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


# --- The stage ---------------------------------------------------------------------


def _phase_of(epoch: int, phase_epochs: tuple[int, ...]) -> int:
  ends = np.cumsum(phase_epochs)
  return int(np.searchsorted(ends, epoch, side="right"))


def pretrain(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) MAE pretraining; returns the final summary."""
  workdir = Path(workdir)
  main = train.is_main_process()
  phase_epochs = tuple(int(e) for e in config.phase_epochs)
  if len(phase_epochs) != len(config.phase_augment) or not phase_epochs or min(phase_epochs) < 0:
    raise ValueError(f"phase_epochs {config.phase_epochs} and phase_augment "
                     f"{config.phase_augment} must be equally long, with epochs >= 0")
  mesh = parallel.make_mesh()
  local_batch = parallel.check_batch(config.batch_size)
  local_eval = parallel.check_batch(config.eval_batch_size, "eval_batch_size")
  mae = build_mae(config.model)
  if config.loss.masked_only and masking.num_kept(mae.encoder.num_patches,
                                                  config.model.mask_ratio) == mae.encoder.num_patches:
    raise ValueError(f"model.mask_ratio={config.model.mask_ratio} removes no patch of "
                     f"{mae.encoder.num_patches}, so loss.masked_only=True has nothing to score; "
                     "raise the ratio or set loss.masked_only=False")
  if main:
    workdir.mkdir(parents=True, exist_ok=True)
  _, train_ip, val_ip = train.input_pipelines(config, config.classes)
  steps_per_epoch = train.agree_min(train_ip.num_examples // local_batch)
  if steps_per_epoch < 1:
    raise ValueError(f"batch_size={config.batch_size} exceeds the {train_ip.num_examples} "
                     f"training images of {list(config.classes)} on this process")
  eval_batches = train.agree_max(-(-val_ip.num_examples // local_eval))
  total_epochs = sum(phase_epochs)
  total_steps = total_epochs * steps_per_epoch

  key = jax.random.key(config.seed)
  init_key, eval_key, plot_key = (jax.random.fold_in(key, i) for i in (0, 2, 3))
  params = init_mae(mae, init_key)
  if config.init_weights and checkpoint.latest_step(workdir) is None:  # a fresh run only
    params = convert.import_weights(config.init_weights, params, mae.encoder.num_patches)
  tx, schedule = optim.adamw(params, config.optim, total_steps, steps_per_epoch)
  state = parallel.replicate(train.TrainState.create(apply_fn=mae.apply, params=params, tx=tx),
                             mesh)
  logging.info("MAE: %s params (encoder %s)", f"{optim.count_params(params):,}",
               f"{optim.count_params(params['encoder']):,}")
  mngr = checkpoint.manager(workdir, config.keep_checkpoints)
  state, step, history, writer, progress = train.open_run(workdir, config, state, steps_per_epoch, mngr)
  eval_step = make_pretrain_eval(mae, config.loss, mesh)
  phase_starts = list(np.cumsum((0,) + phase_epochs[:-1]))
  plot_images = next(val_ip.eval_batches(config.num_reconstructions))["image"]
  augment = source.augment_config(config.data)

  def save_plots(state, record=None):
    if not main:
      return
    # `record`: the epoch just ended, not yet in the history.
    plots.loss_curves(history + ([record] if record else []), workdir / "plots" / "loss_curve.png",
                      phase_starts, title=f"MAE pretraining ({config.loss.type} loss)")
    rows = reconstruction_rows(mae, jax.device_get(state.params), plot_images, plot_key,
                               config.loss)
    png = plots.reconstructions(
        rows, workdir / "plots" / "reconstructions.png",
        title=f"step {int(state.step)}, mask ratio {config.model.mask_ratio}")
    writer.write_images(int(state.step), {"reconstructions": plots.image_array(png)})

  def end_epoch(state, epoch, record):
    total = count = 0.0
    for i, b in enumerate(val_ip.eval_batches(local_eval, eval_batches)):
      g = parallel.global_batch({"image": b["image"], "mask": b["mask"]}, mesh)
      t, c = eval_step(state.params, g["image"], g["mask"], eval_key, i)
      total, count = total + float(t), count + float(c)
    record["phase"] = _phase_of(epoch, phase_epochs) + 1
    record["val_loss"] = total / max(count, 1.0)
    if (config.plot_every_epochs > 0 and (epoch + 1) % config.plot_every_epochs == 0) or \
        epoch + 1 == total_epochs:
      save_plots(state, record)

  loop = train.Loop(
      config=config, workdir=workdir, state=state, step_fn=make_pretrain_step(mae, config.loss, mesh),
      to_global=lambda b: (parallel.global_batch({"image": b["image"]}, mesh)["image"],),
      train=train_ip, local_batch=local_batch, steps_per_epoch=steps_per_epoch,
      total_epochs=total_epochs, schedule=schedule,
      augment=lambda e: augment if config.phase_augment[_phase_of(e, phase_epochs)] else None,
      describe=lambda e: f" (phase {_phase_of(e, phase_epochs) + 1})",
      phase=lambda e: _phase_of(e, phase_epochs) + 1)
  start = time.time()
  state = train.run_epochs(loop, step, history, mngr, writer, end_epoch, progress)
  mngr.wait_until_finished()
  if not history or history[-1]["step"] != int(state.step):  # nothing trained now: still draw
    save_plots(state)
  writer.flush()
  summary = {"steps": int(state.step), "epochs": total_epochs, "steps_per_epoch": steps_per_epoch,
             "final_train_loss": history[-1]["train_loss"] if history else None,
             "final_val_loss": history[-1]["val_loss"] if history else None,
             "wall_seconds_this_run": round(time.time() - start, 1)}
  if main:
    fileio.write_json_atomic(workdir / "pretrain_summary.json", summary)
  logging.info("pretraining done: %s", summary)
  mngr.close()
  return summary
