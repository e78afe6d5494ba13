"""The `pretrain` stage: MAE pretraining in phases (seed: 100 epochs without, then 250
with augmentation), data-parallel, checkpointed, resumable, with figures.

It reads an unlabelled pool: the train split's images of `classes` (the seed:
`no_sub` only), subsampled to `pool_size` if set. Labels are never read, and the
test split is never touched.

`run` is three phases on one `_Run`, as in classify.py: `_setup` (the model, the pool,
the feeds), `_fit` (the starting state, resumable training, validation loss, figures)
and `_close` (pretrain_summary.json).

  python main.py --config=configs/pretrain.py:demo --workdir=runs/pretrain_demo
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from absl import logging

from mae_jax import objectives
from mae_jax.data import feeds
from mae_jax.data import source
from mae_jax.eval import online_probe
from mae_jax.eval import plots
from mae_jax.models import build
from mae_jax.models import load
from mae_jax.runtime import checkpoint
from mae_jax.runtime import errors
from mae_jax.runtime import fileio
from mae_jax.runtime import parallel
from mae_jax.runtime import syncs
from mae_jax.runtime import workdir as workdir_lib
from mae_jax.stages import common
from mae_jax.stages import registry
from mae_jax.train import batching
from mae_jax.train import loop as loop_lib
from mae_jax.train import optim
from mae_jax.train import steps



def _phase_of(epoch: int, phase_epochs: tuple[int, ...]) -> int:
  ends = np.cumsum(phase_epochs)
  return int(np.searchsorted(ends, epoch, side="right"))


def _pool(config: ml_collections.ConfigDict, data: source.DataSettings
          ) -> tuple[list[str], Any, Any, Any]:
  """(classes, pool, validation, probe): the unlabelled pool is the train split's images
  of `classes`, subsampled to `pool_size`; validation images of the same classes give the
  validation loss; `probe` (None when off) is the online probe's labelled images, its
  few shots then its validation images (mae_jax/eval/online_probe.py). Test is never read."""
  classes = common.class_names_of(config.classes)
  dataset = common.load_dataset(data, config.model.image_size)
  pool = common.pool_subset(dataset["train"].of_classes(classes), config.pool_size, config.seed)
  val = dataset["validation"].of_classes(classes)
  common.log_split_sizes("pretraining images", {"pool": pool, "validation": val})
  common.require(pool, config.batch_size, "/".join(classes), data.dir)
  common.require(val, 1, "/".join(classes), data.dir)
  probe, probing = None, online_probe.Settings.from_config(config)
  if probing.enabled:
    try:
      shots, scored = online_probe.labelled_sets(dataset["train"], dataset["validation"],
                                                 probing, config.seed)
    except errors.InsufficientDataError as e:   # the pretraining itself needs no labels
      logging.warning("online probe off: %s (probe_every_epochs=0 turns it off quietly)", e)
      return classes, pool, val, None
    probe = _Probe(images=np.concatenate([shots.images, scored.images]),
                   labels=np.concatenate([shots.labels, scored.labels]), num_shots=len(shots))
    logging.info("online probe: %d labelled training and %d validation images, every %d epochs",
                 len(shots), len(scored), config.probe_every_epochs)
  return classes, pool, val, probe


@dataclasses.dataclass(frozen=True)
class _Probe:
  """The online probe's images: its labelled shots, then the validation images it scores."""
  images: np.ndarray
  labels: np.ndarray
  num_shots: int


def _prober(run: "_Run", feeding: steps.Feeding) -> Callable | None:
  """probe(state) -> the online probe's record entries (None when it is off): the frozen
  encoder's candidate features of the probe images in one pass, scored on the host."""
  if run.probe is None:
    return None
  feed = run.feeds["probe"]
  bank = common.Evaluator(steps.feature_bank_fn(build.build_encoder_features(run.config.model)),
                          run.mesh, feed,
                          dataclasses.replace(feeding, source=feed.source,
                                              local_batch=run.local_eval))

  def probe(state) -> dict[str, Any]:
    start = time.time()
    out = online_probe.score(
        bank({"params": {"encoder": state.params["encoder"]}, "batch_stats": {}}),
        run.probe.labels, run.probe.num_shots)
    logging.vlog(1, "online probe: validation macro AUC %.4f (%s) in %.1f s",
                 out[online_probe.SCORE], out[online_probe.FEATURE], time.time() - start)
    return {**out, "probe_seconds": round(time.time() - start, 2)}

  return probe


def _initial_state(config: ml_collections.ConfigDict, mae, workdir: Path, mesh,
                   steps_per_epoch: int, total_steps: int, init_key: jax.Array
                   ) -> tuple[Any, Any]:
  """The replicated train state (fresh params, or public weights on a fresh run) and the
  learning-rate schedule."""
  params = build.init_mae(mae, init_key)
  if config.init_weights and checkpoint.latest_step(workdir) is None:  # a fresh run only
    params = load.import_weights(config.init_weights, params, mae.encoder.num_patches)
  tx, schedule = optim.adamw(params, optim.AdamWSettings.from_config(config.optim),
                             total_steps, steps_per_epoch)
  state = parallel.replicate(steps.TrainState.create(apply_fn=mae.apply, params=params, tx=tx),
                             mesh)
  logging.info("MAE: %s params (encoder %s); %d steps per epoch of %d images",
               f"{optim.count_params(params):,}", f"{optim.count_params(params['encoder']):,}",
               steps_per_epoch, config.batch_size)
  return state, schedule


def _plotter(config: ml_collections.ConfigDict, workdir: Path, mae, objective, val, history: list,
             writer, plot_key: jax.Array) -> Callable:
  """save_plots(state, record=None): the loss curves and reconstructions of validation
  images, on the main process (`record`: the epoch just ended, not yet in the history)."""
  phase_starts = list(np.cumsum((0,) + tuple(int(e) for e in config.phase_epochs)[:-1]))
  plot_images = np.asarray(batching.normalize(val.images[:config.num_reconstructions]))[..., None]
  reconstruct = steps.FallbackJit(lambda: steps.make_reconstruct(mae, objective),
                                  "reconstruction figure")

  def save_plots(state, record=None):
    if not loop_lib.is_main_process():
      return
    plots.loss_curves(history + ([record] if record else []),
                      workdir / workdir_lib.PLOTS / "loss_curve.png", phase_starts,
                      title=f"MAE pretraining: {objective.describe()}")
    records = history + ([record] if record else [])
    if any(h.get(online_probe.SCORE) is not None for h in records):
      plots.online_probe(records, workdir / workdir_lib.PLOTS / "online_probe.png", phase_starts,
                         title="Frozen features during pretraining: few-shot probe")
    rows = syncs.fetch(reconstruct(syncs.fetch(state.params, "figure"), plot_images, plot_key),
                       "figure")
    rows = {k: rows[k] for k in steps.RECONSTRUCTION_ROWS}   # device_get sorts dict keys
    png = plots.reconstructions(
        rows, workdir / workdir_lib.PLOTS / "reconstructions.png",
        title=f"step {int(state.step)}, mask ratio {config.model.mask_ratio}")
    writer.write_images(int(state.step), {"reconstructions": plots.image_array(png)})

  return save_plots


def _chunk_runner(config: ml_collections.ConfigDict, augmentation: batching.Augment,
                  chunks: common.Chunks) -> Callable:
  """The loop's run_chunk: augmentation in the phases `phase_augment` turns it on for."""
  phase_epochs = tuple(int(e) for e in config.phase_epochs)

  def run_chunk(state, epoch, first, num, key):
    augmented = config.phase_augment[_phase_of(epoch, phase_epochs)]
    return chunks(state, epoch, first, num, key,
                  augmentation if augmented and augmentation.enabled else None)

  return run_chunk


def _epoch_end(config: ml_collections.ConfigDict, evaluate: common.Evaluator,
               save_plots: Callable, probe: Callable | None) -> Callable:
  """The end of an epoch: its phase joins its record; the online probe's score every
  `probe_every_epochs` epochs; the validation loss every `eval_every_epochs` epochs
  (short accelerator epochs would otherwise wait on it each time); the figures every
  `plot_every_epochs` epochs; each also after the last epoch."""
  phase_epochs = tuple(int(e) for e in config.phase_epochs)
  total_epochs = sum(phase_epochs)
  probing = online_probe.Settings.from_config(config)

  def end_epoch(state, epoch, record):
    record["phase"] = _phase_of(epoch, phase_epochs) + 1
    if probe is not None and probing.due(epoch, total_epochs):
      record.update(probe(state))
    if (epoch + 1) % config.eval_every_epochs and epoch + 1 != total_epochs:
      return
    out = evaluate(state.params)
    record["val_loss"] = float(out["loss"].sum() / max(out["count"].sum(), 1.0))
    if (config.plot_every_epochs > 0 and (epoch + 1) % config.plot_every_epochs == 0) or \
        epoch + 1 == total_epochs:
      save_plots(state, record)

  return end_epoch


@dataclasses.dataclass
class _Run:
  """What the phases of one pretraining run share. `_setup` fills the first fields; `_fit`
  opens the checkpoint manager and the writer (and `_close` closes them)."""
  config: ml_collections.ConfigDict
  data: source.DataSettings        # the config's `data`
  workdir: Path
  mesh: jax.sharding.Mesh
  mae: Any
  objective: objectives.Objective
  classes: tuple[str, ...]
  pool: Any                        # the unlabelled training images (an arrays.Split)
  val: Any                         # validation images of the same classes
  probe: _Probe | None             # the online probe's images (None: off)
  kind: str                        # the feed: "device" or "host"
  feeds: dict[str, Any]            # "pool", "validation" and (probing) "probe"
  local_batch: int                 # this process's share of batch_size
  local_eval: int                  # ... and of eval_batch_size
  steps_per_epoch: int
  mngr: Any = None
  writer: Any = None
  save_plots: Callable | None = None   # save_plots(state, record=None): `_plotter`
  started: float = 0.0             # when training started (time.time())

  @property
  def phase_epochs(self) -> tuple[int, ...]:
    return tuple(int(e) for e in self.config.phase_epochs)

  @property
  def total_epochs(self) -> int:
    return sum(self.phase_epochs)

  def phase(self, epoch: int) -> int:
    """The 1-based phase of `epoch`."""
    return _phase_of(epoch, self.phase_epochs) + 1


def _setup(config: ml_collections.ConfigDict, workdir: Path) -> _Run:
  """Checks, the model and its loss, the unlabelled pool and validation images, their feeds."""
  mesh = parallel.make_mesh()
  local_batch = parallel.check_batch(config.batch_size) // jax.local_device_count()
  local_eval = parallel.check_batch(config.eval_batch_size, "eval_batch_size") // \
      jax.local_device_count()
  mae = build.build_mae(config.model)
  objective = objectives.from_config(config.loss)
  logging.info("pretrain: %s; compute dtype %s", objective.describe(),
               build.describe_dtype(config.model.dtype))
  if loop_lib.is_main_process():
    workdir.mkdir(parents=True, exist_ok=True)
  data = source.DataSettings.from_config(config.data)
  classes, pool, val, probe = _pool(config, data)
  kind = common.choose_feed(data, pool.images.nbytes + val.images.nbytes, "pretraining")
  # Raw images stay float32 in the feed: the step normalises them, then casts to the
  # compute dtype (bfloat16 raw pixels would quantise the reconstruction targets).
  made = {name: feeds.make(kind, s.images, s.labels, mesh, config.seed, np.float32)
          for name, s in (("pool", pool), ("validation", val))}
  if probe is not None:   # its own feed: turning the probe on never changes training's
    made["probe"] = feeds.make(common.choose_feed(data, probe.images.nbytes, "online probe"),
                               probe.images, probe.labels, mesh, config.seed, np.float32)
  steps_per_epoch = batching.steps_per_epoch(len(pool), mesh.devices.size, local_batch)
  if steps_per_epoch < 1:
    raise errors.InsufficientDataError(
        f"batch_size={config.batch_size} exceeds the {len(pool)} pretraining images of "
        f"{list(classes)} ({len(pool) // mesh.devices.size} per device)")
  return _Run(config=config, data=data, workdir=workdir, mesh=mesh, mae=mae, objective=objective,
              classes=tuple(classes), pool=pool, val=val, probe=probe, kind=kind, feeds=made,
              local_batch=local_batch, local_eval=local_eval, steps_per_epoch=steps_per_epoch)


def _fit(run: _Run) -> tuple[Any, list[dict]]:
  """Trains (or resumes) the MAE; returns the final state and the history."""
  config, spe = run.config, run.steps_per_epoch
  key = jax.random.key(config.seed)
  init_key, eval_key, plot_key = (jax.random.fold_in(key, i) for i in (0, 2, 3))
  state, schedule = _initial_state(config, run.mae, run.workdir, run.mesh, spe,
                                   run.total_epochs * spe, init_key)
  run.mngr = checkpoint.manager(run.workdir, config.keep_checkpoints)
  run.writer = common.metric_writer(run.workdir, config)
  state, step, history, progress = loop_lib.open_run(run.workdir, config.to_dict(), state, spe,
                                                     run.mngr, run.writer)
  feeding = steps.Feeding(source=run.kind, local_batch=run.local_batch, seed=config.seed,
                          dtype=build.dtype_of(config.model.dtype))
  micro = steps.backend_micro_batch(**config.micro_batch)
  chunks = common.Chunks(steps.pretrain_body(run.mae, run.objective, config.batch_size, micro), run.mesh,
                         run.feeds["pool"], feeding)
  evaluate = common.Evaluator(steps.pretrain_eval_fn(run.mae, run.objective, eval_key), run.mesh,
                              run.feeds["validation"],
                              dataclasses.replace(feeding, local_batch=run.local_eval))
  run.save_plots = _plotter(config, run.workdir, run.mae, run.objective, run.val, history, run.writer,
                            plot_key)
  loop = loop_lib.Loop(
      settings=loop_lib.LoopSettings.from_config(config), workdir=run.workdir, state=state,
      run_chunk=_chunk_runner(config, run.data.augment, chunks), train_examples=len(run.pool),
      global_batch=config.batch_size, steps_per_epoch=spe, total_epochs=run.total_epochs,
      schedule=schedule, describe=lambda e: f" (phase {run.phase(e)})", phase=run.phase,
      name="pretrain", watch=("val_loss", online_probe.SCORE))
  end_epoch = _epoch_end(config, evaluate, run.save_plots, _prober(run, feeding))
  run.started = time.time()
  with checkpoint.finishing(run.mngr):   # saves in flight complete, even when training fails
    state = loop_lib.run_epochs(loop, step, history, run.mngr, run.writer, end_epoch, progress)
  return state, history


def _close(run: _Run, state, history: list[dict]) -> dict:
  """The figures (also when no epoch ended in this run), pretrain_summary.json; closes the run."""
  if not history or history[-1]["step"] != int(state.step):  # nothing trained now: still draw
    run.save_plots(state)
  run.writer.flush()
  summary = {"steps": int(state.step), "epochs": run.total_epochs,
             "steps_per_epoch": run.steps_per_epoch,
             "pool": {"classes": list(run.classes), "images": len(run.pool),
                      "validation_images": len(run.val)},
             "feed": run.kind,
             "final_train_loss": history[-1]["train_loss"] if history else None,
             "final_val_loss": history[-1].get("val_loss") if history else None,
             "final_probe_auc": history[-1].get(online_probe.SCORE) if history else None,
             "wall_seconds_this_run": round(time.time() - run.started, 1)}
  if loop_lib.is_main_process():
    fileio.write_json_atomic(run.workdir / workdir_lib.PRETRAIN_SUMMARY, summary)
  probed = summary["final_probe_auc"]
  logging.info("pretraining done: %d steps, final train loss %.4g, validation loss %s%s (%s)",
               summary["steps"], summary["final_train_loss"] or float("nan"),
               "none" if summary["final_val_loss"] is None else f"{summary['final_val_loss']:.4g}",
               "" if probed is None else f", few-shot probe macro AUC {probed:.4f}",
               run.workdir / workdir_lib.PRETRAIN_SUMMARY)
  run.mngr.close()
  return summary


@registry.register("pretrain")
def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) MAE pretraining; returns the final summary."""
  run_ = _setup(config, Path(workdir))
  state, history = _fit(run_)
  return _close(run_, state, history)
