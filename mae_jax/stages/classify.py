"""The `probe` and `finetune` stages: a classifier on the (pretrained) encoder, trained
on a labelled budget of the train split, its epoch chosen on validation, reported on
the held-out test split with bootstrap intervals.

  python main.py --config=configs/probe.py:demo --workdir=runs/probe_demo
  python main.py --config=configs/finetune.py:demo --workdir=runs/finetune_demo

The two stages differ only in their configs: which params the optimiser freezes,
which optimiser, and which stage they start from. When the encoder is frozen and
nothing is augmented (the probe), the encoder's features are computed once per
split, and only the head trains on them; with `select_features` the block and
pooling of those features are chosen on validation first. The test split is scored
once, after training: for the epoch validation chose and for the final one (its
frozen features and the baseline's test scores are computed earlier, and choose nothing).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from mae_jax.data import feeds
from mae_jax.data import layout
from mae_jax.data import source
from mae_jax.eval import baseline
from mae_jax.eval import features as features_lib
from mae_jax.eval import metrics as metrics_lib
from mae_jax.eval import plots
from mae_jax.models import build
from mae_jax.models import heads
from mae_jax.models import load
from mae_jax.runtime import checkpoint
from mae_jax.runtime import errors
from mae_jax.runtime import fileio
from mae_jax.runtime import parallel
from mae_jax.runtime import workdir as workdir_lib
from mae_jax.stages import common
from mae_jax.stages import registry
from mae_jax.train import loop as loop_lib
from mae_jax.train import optim
from mae_jax.train import steps



def _source_stage(config: ml_collections.ConfigDict) -> str:
  """The command that makes the checkpoint `init_from` points at (for error messages)."""
  return (f"python main.py --config=configs/{config.init_from_stage}.py:{config.preset} "
          f"--workdir={config.init_from}")


def _initial_params(config, model, workdir: Path) -> tuple[Any, Any]:
  """Fresh params, then public weights or the previous stage's: on a fresh run, and on a
  resumed one whose encoder is frozen (its features are computed before the checkpoint
  is restored, and a frozen encoder is the source's, bit for bit)."""
  params, batch_stats = build.init_classifier(
      model, jax.random.fold_in(jax.random.key(config.seed), 0))
  frozen_encoder = all(jax.tree.leaves(optim.match(params, config.optim.frozen)["encoder"]))
  if checkpoint.latest_step(workdir) is None or frozen_encoder:
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
  return params, batch_stats


def _feature_bank(model, params, batch_stats, splits: dict, mesh, config, dtype) -> dict:
  """{split: {candidate feature: (N, D)}} of the frozen encoder, one pass per split."""
  fn = steps.feature_bank_fn(model)
  tree = parallel.replicate({"params": params, "batch_stats": batch_stats}, mesh)
  out = {}
  for name, split in splits.items():
    kind = common.choose_feed(config, split.images.nbytes, f"{name} features")
    feed = feeds.make(kind, split.images, split.labels, mesh, config.seed, dtype)
    feeding = steps.Feeding(source=kind, local_batch=config.eval_batch_size // mesh.devices.size,
                            seed=config.seed, dtype=dtype)
    out[name] = common.Evaluator(fn, mesh, feed, feeding)(tree)
  return out


def _choose_features(config, workdir: Path, bank: dict, train, val) -> str:
  """The candidate feature chosen on validation (kept in feature_choice.json, so a
  resumed run keeps its choice)."""
  path = workdir / workdir_lib.FEATURES_FILE
  if path.exists() and checkpoint.latest_step(workdir) is not None:
    return fileio.read_json(path)["chosen"]
  if config.select_features:
    scores = features_lib.score_candidates(bank["train"], train.labels, bank["validation"],
                                           val.labels)
    chosen = features_lib.choose(scores)
  else:
    scores = {}
    chosen = heads.feature_name(config.model.feature_block, config.model.pool)
  if loop_lib.is_main_process():
    fileio.write_json_atomic(path, {"chosen": chosen, "validation_macro_auc": scores,
                                    "scored_by": "logistic regression on train features"})
  logging.info("frozen features: %s%s", chosen,
               f" (chosen on validation: {scores[chosen]:.4f})" if scores else "")
  return chosen


def _write_figures(workdir: Path, title: str, chosen: dict, test_labels, base: dict,
                   history: list) -> dict:
  roc_png = plots.roc(metrics_lib.roc_curves(chosen["probs"], test_labels),
                      workdir / workdir_lib.PLOTS / "roc.png",
                      title=f"{title}, test split, epoch {chosen['epoch']}",
                      baseline=base["test"]["curves"])
  confusion_png = plots.confusion(
      chosen["metrics"]["confusion_matrix"], layout.CLASS_NAMES,
      workdir / workdir_lib.PLOTS / "confusion.png",
      title=f"{title}, test accuracy {chosen['metrics']['accuracy']:.3f}")
  plots.loss_curves(history, workdir / workdir_lib.PLOTS / "loss_curve.png", title=title,
                    ylabel="cross-entropy")
  return {"roc": plots.image_array(roc_png), "confusion": plots.image_array(confusion_png)}


@registry.register("probe", "finetune")
def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) a probe or fine-tune stage; returns its test evaluation."""
  config = config.copy_and_resolve_references()   # the feature choice is written into it
  workdir = Path(workdir)
  main = loop_lib.is_main_process()
  mesh = parallel.make_mesh()
  parallel.check_batch(config.batch_size)
  parallel.check_batch(config.eval_batch_size, "eval_batch_size")
  local_batch = config.batch_size // mesh.devices.size
  dtype = build.dtype_of(config.model.dtype)
  if main:
    workdir.mkdir(parents=True, exist_ok=True)

  dataset = common.load_dataset(config)
  train = common.labelled_subset(dataset["train"], config.labels_per_class, config.seed)
  val, test = dataset["validation"], dataset["test"]
  common.log_split_sizes(config.stage, {"train (labelled)": train, "validation": val,
                                        "test": test})
  for split in (val, test):
    common.require(split, 1, "labelled", config.data.dir)
  common.require(train, config.batch_size, "labelled", config.data.dir)

  model = build.build_classifier(config.model, len(layout.CLASS_NAMES), parallel.AXIS)
  params, batch_stats = _initial_params(config, model, workdir)
  frozen = optim.match(params, config.optim.frozen)
  frozen_encoder = all(jax.tree.leaves(frozen["encoder"]))
  cached = frozen_encoder and not config.augment
  if config.select_features and not cached:
    raise errors.InsufficientDataError(
        "select_features needs frozen, cached features: a frozen encoder (optim.frozen) and "
        "augment=False")

  # The non-deep baseline, fitted on the same labelled images; scored on val and test.
  profiles = {name: baseline.profiles_of(s.images) for name, s in
              (("train", train), ("validation", val), ("test", test))}
  base = baseline.evaluate_baseline(
      (profiles["train"], train.labels),
      {"validation": (profiles["validation"], val.labels), "test": (profiles["test"], test.labels)},
      intervals_seed=config.seed)
  logging.info("baseline, %s: validation macro AUC %.4f", baseline.DESCRIPTION,
               base["validation"]["metrics"]["macro_auc"])

  inputs = {name: s.images for name, s in (("train", train), ("validation", val), ("test", test))}
  chosen_feature = None
  if cached:   # the frozen encoder's features, once per split; only the head trains
    start = time.time()
    bank = _feature_bank(model, params, batch_stats, {"train": train, "validation": val,
                                                      "test": test}, mesh, config, dtype)
    chosen_feature = _choose_features(config, workdir, bank, train, val)
    block, pool = chosen_feature.removeprefix("block").split("_")
    config.model.feature_block, config.model.pool = int(block), pool
    model = build.build_classifier(config.model, len(layout.CLASS_NAMES), parallel.AXIS)
    inputs = {name: b[chosen_feature] for name, b in bank.items()}
    logging.info("frozen features of every split computed in %.1f s", time.time() - start)

  kind = common.choose_feed(config, inputs["train"].nbytes + inputs["validation"].nbytes,
                            config.stage)
  feed_dtype = np.float32 if cached else dtype
  feed = feeds.make(kind, inputs["train"], train.labels, mesh, config.seed, feed_dtype)
  val_feed = feeds.make(kind, inputs["validation"], val.labels, mesh, config.seed, feed_dtype)
  steps_per_epoch = len(train) // config.batch_size
  steps_per_epoch = min(steps_per_epoch, min(feed.layout.counts) // local_batch)
  total_steps = config.epochs * steps_per_epoch
  tx, peaks = optim.classifier_optimizer(
      params, config.optim, total_steps=total_steps, steps_per_epoch=steps_per_epoch,
      global_batch=config.batch_size, depth=config.model.depth)
  trained = sum(int(np.prod(p.shape)) for p, f in zip(jax.tree.leaves(params),
                                                     jax.tree.leaves(frozen)) if not f)
  logging.info("%s: %s params, %s trained; %d labelled images, %d steps per epoch%s",
               config.stage, f"{optim.count_params(params):,}", f"{trained:,}", len(train),
               steps_per_epoch, " (frozen encoder: cached features, head only)" if cached else "")
  head_lr = max(jax.tree.leaves(peaks))
  schedule = optim.warmup_cosine(head_lr, total_steps,
                                 int(config.optim.warmup_epochs * steps_per_epoch),
                                 min(config.optim.min_lr, head_lr))
  state = parallel.replicate(steps.ClassifierState.create(
      apply_fn=model.apply, params=params, tx=tx, batch_stats=batch_stats), mesh)
  mngr = checkpoint.manager(workdir, config.keep_checkpoints)
  best_mngr = checkpoint.manager(workdir, 1, folder=workdir_lib.BEST_CHECKPOINT)
  writer = common.metric_writer(workdir, config)
  state, step, history, progress = loop_lib.open_run(workdir, config, state, steps_per_epoch,
                                                     mngr, writer)
  for stale in [s for s in best_mngr.all_steps() if s > step]:  # from a run we no longer continue
    best_mngr.delete(stale)

  feeding = steps.Feeding(source=kind, local_batch=local_batch, seed=config.seed, dtype=dtype,
                          images=not cached)
  body = steps.classifier_body(model, frozen_encoder=frozen_encoder,
                               label_smoothing=config.label_smoothing, inputs_are_features=cached)
  chunks = common.Chunks(body, mesh, feed, feeding)
  eval_feeding = dataclasses.replace(feeding,
                                     local_batch=config.eval_batch_size // mesh.devices.size)
  logits_fn = steps.logits_fn(model, inputs_are_features=cached)
  evaluate_val = common.Evaluator(logits_fn, mesh, val_feed, eval_feeding)
  augmentation = source.augmentation(config.data) if config.augment else None
  best = max((h["val_macro_auc"] for h in history if h.get("val_macro_auc") is not None),
             default=-1.0)

  def tree_of(state):
    return {"params": state.params, "batch_stats": state.batch_stats}

  def end_epoch(state, epoch, record):
    nonlocal best
    if (epoch + 1) % config.eval_every_epochs and epoch + 1 != config.epochs:
      return   # validation every `eval_every_epochs` epochs, and after the last
    probs = metrics_lib.softmax(evaluate_val(tree_of(state)))
    m = metrics_lib.classification_metrics(probs, val.labels)
    record.update({"val_accuracy": m["accuracy"], "val_macro_auc": m["macro_auc"],
                   "val_micro_auc": m["micro_auc"]})
    record.update({f"val_auc_{k}": v for k, v in m["auc"].items()})
    if m["macro_auc"] is not None and m["macro_auc"] > best:
      best = m["macro_auc"]
      # Never two managers' saves in flight at once: across processes, the orbax barriers
      # of two concurrent asynchronous saves can meet in different orders and deadlock.
      mngr.wait_until_finished()
      checkpoint.save(best_mngr, record["step"], state)
      best_mngr.wait_until_finished()

  loop = loop_lib.Loop(
      config=config, workdir=workdir, state=state,
      run_chunk=lambda s, e, f, n, k: chunks(s, e, f, n, k, augmentation),
      train_examples=len(train), global_batch=config.batch_size,
      steps_per_epoch=steps_per_epoch, total_epochs=config.epochs, schedule=schedule)
  start = time.time()
  with checkpoint.finishing(mngr, best_mngr):   # saves in flight complete, even on failure
    state = loop_lib.run_epochs(loop, step, history, mngr, writer, end_epoch, progress)

  # The test split, read now and only now: the epoch validation chose, and the last one.
  test_feed = feeds.make(kind, inputs["test"], test.labels, mesh, config.seed, feed_dtype)
  evaluate_test = common.Evaluator(logits_fn, mesh, test_feed, eval_feeding)
  chosen_state, chosen_step, _ = checkpoint.restore_latest(best_mngr, state)
  results = {}
  for name, s, at in (("chosen", chosen_state, chosen_step), ("final", state, int(state.step))):
    probs = metrics_lib.softmax(evaluate_test(tree_of(s)))
    epoch = next((h["epoch"] for h in history if h["step"] == at), None)
    results[name] = {"probs": probs, "epoch": epoch, "step": at,
                     "metrics": metrics_lib.with_intervals(probs, test.labels, seed=config.seed)}
  chosen, final = results["chosen"], results["final"]
  val_best = next(h for h in history if h["step"] == chosen["step"])  # an evaluated epoch
  summary = {
      "split": "test", **chosen["metrics"], "epoch": chosen["epoch"], "step": chosen["step"],
      "chosen_by": "validation macro AUC",
      "validation": {k.removeprefix("val_"): v for k, v in val_best.items()
                     if k.startswith("val_")},
      "final_epoch": {**final["metrics"], "epoch": final["epoch"], "step": final["step"]},
      "baseline": {**base["test"]["metrics"],
                   "validation_macro_auc": base["validation"]["metrics"]["macro_auc"]},
      "margin_over_baseline": baseline.margin(chosen["metrics"], base["test"]["metrics"]),
      "labels_per_class": config.labels_per_class, "train_examples": len(train),
      "validation_examples": len(val), "test_examples": len(test),
      "features": chosen_feature, "feed": kind,
  }
  if main:
    title = f"{config.stage} ({config.preset})"
    images = _write_figures(workdir, title, chosen, test.labels, base, history)
    writer.write_images(int(state.step), images)
    fileio.write_json_atomic(workdir / workdir_lib.EVAL_FILE, summary)
  writer.flush()
  mngr.close()
  best_mngr.close()
  logging.info("%s done in %.1f s; test (epoch %s, chosen on validation): macro AUC %.4f %s, "
               "accuracy %.4f; final epoch: macro AUC %.4f", config.stage, time.time() - start,
               chosen["epoch"], summary["macro_auc"], summary["intervals"]["macro_auc"],
               summary["accuracy"], final["metrics"]["macro_auc"])
  logging.info("%s margin over the radial-profile baseline (test macro AUC %.4f): %s",
               config.stage, base["test"]["metrics"]["macro_auc"], summary["margin_over_baseline"])
  return summary
