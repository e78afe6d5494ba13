"""The `probe` and `finetune` stages: a classifier on the (pretrained) encoder, trained
data-parallel, evaluated every epoch, the best epoch kept.

  python main.py --config=configs/probe.py:demo --workdir=runs/probe_demo
  python main.py --config=configs/finetune.py:demo --workdir=runs/finetune_demo

The two stages differ only in their configs: which params the optimiser
freezes (the probe freezes the encoder with `optax.set_to_zero`, and its step
then computes features outside the differentiated function, so the encoder's
backward pass is never built), which optimiser, and which stage they start from.
"""

from __future__ import annotations

import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from mae_jax.data import layout
from mae_jax.data import source
from mae_jax.eval import baseline
from mae_jax.eval import metrics as metrics_lib
from mae_jax.eval import plots
from mae_jax.models import build
from mae_jax.models import load
from mae_jax.runtime import checkpoint
from mae_jax.runtime import fileio
from mae_jax.runtime import parallel
from mae_jax.stages import common
from mae_jax.stages import registry
from mae_jax.train import loop as loop_lib
from mae_jax.train import optim
from mae_jax.train import steps

EVAL_FILE = "eval_metrics.json"


def _gather(x: jax.Array) -> np.ndarray:
  if jax.process_count() == 1:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def predict_split(predict, state: steps.ClassifierState, ip, local_batch: int, num_batches: int,
                  mesh) -> tuple[np.ndarray, np.ndarray]:
  """(probabilities, labels) of every example of a split exactly once (padding dropped)."""
  probs, labels = [], []
  for b in ip.eval_batches(local_batch, num_batches):
    g = parallel.global_batch(b, mesh)
    logits = _gather(predict(state.params, state.batch_stats, g["image"]))
    keep = _gather(g["mask"]).astype(bool)
    probs.append(metrics_lib.softmax(logits.astype(np.float64))[keep])
    labels.append(_gather(g["label"])[keep])
  return np.concatenate(probs), np.concatenate(labels)


def _source_stage(config: ml_collections.ConfigDict) -> str:
  """The command that makes the checkpoint `init_from` points at (for error messages)."""
  return (f"python main.py --config=configs/{config.init_from_stage}.py:{config.preset} "
          f"--workdir={config.init_from}")


@registry.register("probe", "finetune")
def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) a probe or fine-tune stage; returns the best evaluation."""
  workdir = Path(workdir)
  main = loop_lib.is_main_process()
  mesh = parallel.make_mesh()
  local_batch = parallel.check_batch(config.batch_size)
  local_eval = parallel.check_batch(config.eval_batch_size, "eval_batch_size")
  model = build.build_classifier(config.model, len(layout.CLASS_NAMES), parallel.AXIS)
  if main:
    workdir.mkdir(parents=True, exist_ok=True)

  params, batch_stats = build.init_classifier(
      model, jax.random.fold_in(jax.random.key(config.seed), 0))
  if checkpoint.latest_step(workdir) is None:  # a fresh run: public weights or the previous stage
    if config.init_weights:
      params = load.import_weights(config.init_weights, params, model.vit.num_patches)
    elif config.init_from:
      params, batch_stats, src_step, fresh = load.restore_from_stage(
          config.init_from, params, batch_stats, dont_load=list(config.dont_load),
          make_it=_source_stage(config), model=config.model.to_dict())
      logging.info("initialised from %s step %d; fresh: %s", config.init_from, src_step,
                   ", ".join(sorted({n.rsplit("/", 2)[0] for n in fresh})) or "none")
    else:
      logging.warning("init_from is empty: training the encoder from scratch")

  _, train_ip, val_ip = common.input_pipelines(config, layout.CLASS_NAMES)
  steps_per_epoch = loop_lib.agree_min(train_ip.num_examples // local_batch)
  if steps_per_epoch < 1:
    raise ValueError(f"batch_size={config.batch_size} exceeds the {train_ip.num_examples} "
                     "training images on this process")
  eval_batches = loop_lib.agree_max(-(-val_ip.num_examples // local_eval))
  # The non-deep baseline (mae_jax/baseline.py), once per run: it depends only on the data.
  base = baseline.evaluate_baseline(*(
      baseline.pipeline_profiles(ip, local_eval, gather=_gather, agree_max=loop_lib.agree_max)
      for ip in (train_ip, val_ip)))
  logging.info("baseline, %s: validation macro AUC %s, accuracy %.4f", baseline.DESCRIPTION,
               base["metrics"]["macro_auc"], base["metrics"]["accuracy"])
  total_steps = config.epochs * steps_per_epoch
  tx, peaks = optim.classifier_optimizer(
      params, config.optim, total_steps=total_steps, steps_per_epoch=steps_per_epoch,
      global_batch=config.batch_size, depth=config.model.depth)
  frozen = optim.match(params, config.optim.frozen)
  frozen_encoder = all(jax.tree.leaves(frozen["encoder"]))
  logging.info("%s: %s params, %s trained%s", config.stage,
               f"{optim.count_params(params):,}",
               f"{sum(int(np.prod(p.shape)) for p, f in zip(jax.tree.leaves(params), jax.tree.leaves(frozen)) if not f):,}",
               " (encoder frozen: features only, no encoder backward)" if frozen_encoder else "")
  head_lr = max(jax.tree.leaves(peaks))
  schedule = optim.warmup_cosine(head_lr, total_steps,
                                 int(config.optim.warmup_epochs * steps_per_epoch),
                                 min(config.optim.min_lr, head_lr))
  state = parallel.replicate(steps.ClassifierState.create(
      apply_fn=model.apply, params=params, tx=tx, batch_stats=batch_stats), mesh)
  mngr = checkpoint.manager(workdir, config.keep_checkpoints)
  best_mngr = checkpoint.manager(workdir, 1, folder="best_checkpoint")
  writer = common.metric_writer(workdir)
  state, step, history, progress = loop_lib.open_run(workdir, config, state, steps_per_epoch,
                                                     mngr, writer)
  for stale in [s for s in best_mngr.all_steps() if s > step]:  # from a run we no longer continue
    best_mngr.delete(stale)
  predict = steps.make_predict(model, mesh)
  best = max((h["val_macro_auc"] for h in history if h.get("val_macro_auc") is not None),
             default=-1.0)
  title = f"{config.stage} ({config.preset})"

  def end_epoch(state, epoch, record):
    nonlocal best
    probs, labels = predict_split(predict, state, val_ip, local_eval, eval_batches, mesh)
    metrics = metrics_lib.classification_metrics(probs, labels)
    record.update({"val_accuracy": metrics["accuracy"], "val_macro_auc": metrics["macro_auc"],
                   "val_micro_auc": metrics["micro_auc"]})
    record.update({f"val_auc_{k}": v for k, v in metrics["auc"].items()})
    if metrics["macro_auc"] is not None and metrics["macro_auc"] > best:
      best = metrics["macro_auc"]
      checkpoint.save(best_mngr, record["step"], state)
      if main:
        fileio.write_json_atomic(workdir / EVAL_FILE, {
            **metrics, "step": record["step"], "epoch": epoch + 1, "split": "validation",
            "baseline": base["metrics"],
            "margin_over_baseline": baseline.margin(metrics, base["metrics"])})
        roc_png = plots.roc(metrics_lib.roc_curves(probs, labels), workdir / "plots" / "roc.png",
                            title=f"{title}, epoch {epoch + 1}", baseline=base["curves"])
        confusion_png = plots.confusion(metrics["confusion_matrix"], layout.CLASS_NAMES,
                                        workdir / "plots" / "confusion.png",
                                        title=f"{title}, accuracy {metrics['accuracy']:.3f}")
        writer.write_images(record["step"], {"roc": plots.image_array(roc_png),
                                             "confusion": plots.image_array(confusion_png)})

  augment = source.augment_config(config.data) if config.augment else None
  loop = loop_lib.Loop(
      config=config, workdir=workdir, state=state,
      step_fn=steps.make_classifier_step(model, mesh, frozen_encoder=frozen_encoder,
                                         label_smoothing=config.label_smoothing),
      to_global=lambda b: tuple(parallel.global_batch(
          {"image": b["image"], "label": b["label"]}, mesh).values()),
      batches=lambda epoch, first: train_ip.train_epoch(
          local_batch, seed=config.seed, epoch=epoch, start_batch=first, augment=augment),
      train_examples=train_ip.num_examples, local_batch=local_batch,
      steps_per_epoch=steps_per_epoch, total_epochs=config.epochs, schedule=schedule)
  start = time.time()
  loop_lib.run_epochs(loop, step, history, mngr, writer, end_epoch, progress)
  mngr.wait_until_finished()
  best_mngr.wait_until_finished()
  if main:
    plots.loss_curves(history, workdir / "plots" / "loss_curve.png", title=title,
                      ylabel="cross-entropy")
  writer.flush()
  mngr.close()
  best_mngr.close()
  result = fileio.read_json(workdir / EVAL_FILE) if (workdir / EVAL_FILE).exists() else {}
  logging.info("%s done in %.1f s; best validation: macro AUC %s, micro AUC %s, accuracy %s",
               config.stage, time.time() - start, result.get("macro_auc"),
               result.get("micro_auc"), result.get("accuracy"))
  logging.info("%s margin over the radial-profile baseline (macro AUC %s): %s", config.stage,
               base["metrics"]["macro_auc"], result.get("margin_over_baseline"))
  return result
