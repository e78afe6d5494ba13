"""The `pretrain` stage: MAE pretraining in phases (seed: 100 epochs without, then 250
with augmentation), data-parallel, checkpointed, resumable, with figures.

  python main.py --config=configs/pretrain.py:demo --workdir=runs/pretrain_demo
"""

from __future__ import annotations

import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
from absl import logging

from mae_jax.data import source
from mae_jax.eval import plots
from mae_jax.models import build
from mae_jax.models import load
from mae_jax.runtime import checkpoint
from mae_jax.runtime import fileio
from mae_jax.runtime import parallel
from mae_jax.stages import common
from mae_jax.stages import registry
from mae_jax.train import loop as loop_lib
from mae_jax.train import losses
from mae_jax.train import optim
from mae_jax.train import steps

SUMMARY_FILE = "pretrain_summary.json"


def _phase_of(epoch: int, phase_epochs: tuple[int, ...]) -> int:
  ends = np.cumsum(phase_epochs)
  return int(np.searchsorted(ends, epoch, side="right"))


@registry.register("pretrain")
def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) MAE pretraining; returns the final summary."""
  workdir = Path(workdir)
  main = loop_lib.is_main_process()
  phase_epochs = tuple(int(e) for e in config.phase_epochs)
  mesh = parallel.make_mesh()
  local_batch = parallel.check_batch(config.batch_size)
  local_eval = parallel.check_batch(config.eval_batch_size, "eval_batch_size")
  mae = build.build_mae(config.model)
  loss = losses.Reconstruction.from_config(config.loss)
  if main:
    workdir.mkdir(parents=True, exist_ok=True)
  _, train_ip, val_ip = common.input_pipelines(config, config.classes)
  steps_per_epoch = loop_lib.agree_min(train_ip.num_examples // local_batch)
  if steps_per_epoch < 1:
    raise ValueError(f"batch_size={config.batch_size} exceeds the {train_ip.num_examples} "
                     f"training images of {list(config.classes)} on this process")
  eval_batches = loop_lib.agree_max(-(-val_ip.num_examples // local_eval))
  total_epochs = sum(phase_epochs)
  total_steps = total_epochs * steps_per_epoch

  key = jax.random.key(config.seed)
  init_key, eval_key, plot_key = (jax.random.fold_in(key, i) for i in (0, 2, 3))
  params = build.init_mae(mae, init_key)
  if config.init_weights and checkpoint.latest_step(workdir) is None:  # a fresh run only
    params = load.import_weights(config.init_weights, params, mae.encoder.num_patches)
  tx, schedule = optim.adamw(params, config.optim, total_steps, steps_per_epoch)
  state = parallel.replicate(steps.TrainState.create(apply_fn=mae.apply, params=params, tx=tx),
                             mesh)
  logging.info("MAE: %s params (encoder %s)", f"{optim.count_params(params):,}",
               f"{optim.count_params(params['encoder']):,}")
  mngr = checkpoint.manager(workdir, config.keep_checkpoints)
  writer = common.metric_writer(workdir)
  state, step, history, progress = loop_lib.open_run(workdir, config, state, steps_per_epoch,
                                                     mngr, writer)
  eval_step = steps.make_pretrain_eval(mae, loss, mesh)
  reconstruct = steps.make_reconstruct(mae, loss)
  phase_starts = list(np.cumsum((0,) + phase_epochs[:-1]))
  plot_images = next(val_ip.eval_batches(config.num_reconstructions))["image"]
  augment = source.augment_config(config.data)

  def save_plots(state, record=None):
    if not main:
      return
    # `record`: the epoch just ended, not yet in the history.
    plots.loss_curves(history + ([record] if record else []), workdir / "plots" / "loss_curve.png",
                      phase_starts, title=f"MAE pretraining ({config.loss.type} loss)")
    rows = jax.device_get(reconstruct(jax.device_get(state.params), plot_images, plot_key))
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

  def batches(epoch, first):
    augmented = config.phase_augment[_phase_of(epoch, phase_epochs)]
    return train_ip.train_epoch(local_batch, seed=config.seed, epoch=epoch, start_batch=first,
                                augment=augment if augmented else None)

  loop = loop_lib.Loop(
      config=config, workdir=workdir, state=state,
      step_fn=steps.make_pretrain_step(mae, loss, mesh),
      to_global=lambda b: (parallel.global_batch({"image": b["image"]}, mesh)["image"],),
      batches=batches, train_examples=train_ip.num_examples, local_batch=local_batch,
      steps_per_epoch=steps_per_epoch, total_epochs=total_epochs, schedule=schedule,
      describe=lambda e: f" (phase {_phase_of(e, phase_epochs) + 1})",
      phase=lambda e: _phase_of(e, phase_epochs) + 1)
  start = time.time()
  state = loop_lib.run_epochs(loop, step, history, mngr, writer, end_epoch, progress)
  mngr.wait_until_finished()
  if not history or history[-1]["step"] != int(state.step):  # nothing trained now: still draw
    save_plots(state)
  writer.flush()
  summary = {"steps": int(state.step), "epochs": total_epochs, "steps_per_epoch": steps_per_epoch,
             "final_train_loss": history[-1]["train_loss"] if history else None,
             "final_val_loss": history[-1]["val_loss"] if history else None,
             "wall_seconds_this_run": round(time.time() - start, 1)}
  if main:
    fileio.write_json_atomic(workdir / SUMMARY_FILE, summary)
  logging.info("pretraining done: %s", summary)
  mngr.close()
  return summary
