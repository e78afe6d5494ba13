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

`run` is three phases on one `_Run`: `_setup` (data, model, starting params, the
baseline, the cached features), `_fit` (optimiser, resumable training, validation)
and `_close` (the test split, figures, eval_metrics.json). A probe's chosen feature
is a `heads.FeatureChoice`, kept in feature_choice.json and read by `predict`.
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

from mae_jax.data import feeds
from mae_jax.data import layout
from mae_jax.data import source
from mae_jax.eval import baseline
from mae_jax.eval import evaluators
from mae_jax.eval import features as features_lib
from mae_jax.eval import metrics as metrics_lib
from mae_jax.eval import plots
from mae_jax.eval import results
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
from mae_jax.stages import validate
from mae_jax.train import loop as loop_lib
from mae_jax.train import optim
from mae_jax.train import steps



def _source_stage(config: ml_collections.ConfigDict) -> str:
  """The command that makes the checkpoint `init_from` points at (for error messages)."""
  return (f"python main.py --config=configs/{config.init_from_stage}.py:{config.preset} "
          f"--workdir={config.init_from}")


def _initial_params(config, opt: optim.ClassifierOptimSettings, model,
                    workdir: Path) -> tuple[Any, Any]:
  """Fresh params, then public weights or the previous stage's: on a fresh run, and on a
  resumed one whose encoder is frozen (its features are computed before the checkpoint
  is restored, and a frozen encoder is the source's, bit for bit)."""
  params, batch_stats = build.init_classifier(
      model, jax.random.fold_in(jax.random.key(config.seed), 0))
  frozen_encoder = all(jax.tree.leaves(optim.match(params, opt.frozen)["encoder"]))
  if checkpoint.latest_step(workdir) is None or frozen_encoder:
    if config.get("init_weights"):
      params = load.import_weights(config.init_weights, params, model.vit.num_patches)
    elif config.get("init_from"):
      validate.check_source_encoder(config)
      params, batch_stats, src_step, fresh = load.restore_from_stage(
          config.init_from, params, batch_stats, dont_load=list(config.dont_load),
          make_it=_source_stage(config))
      logging.info("initialised from %s step %d; fresh: %s", config.init_from, src_step,
                   ", ".join(sorted({n.rsplit("/", 2)[0] for n in fresh})) or "none")
    elif "init_from" in config:
      logging.warning("init_from is empty: training the encoder from scratch")
  return params, batch_stats


@dataclasses.dataclass
class _Run:
  """What the phases of one probe or fine-tune run share. `_setup` fills the first
  fields; `_fit` opens the checkpoint managers and the writer, and `_close` closes them."""
  config: ml_collections.ConfigDict
  data: source.DataSettings            # the config's `data`
  opt: optim.ClassifierOptimSettings   # the config's `optim`
  workdir: Path
  mesh: jax.sharding.Mesh
  splits: dict[str, Any]          # "train" (the labelled budget), "validation", "test"
  model: Any
  params: Any
  batch_stats: Any
  frozen: Any                     # per param: does the optimiser freeze it
  base: baseline.Fitted | None    # the radial-profile baseline on validation and test
  inputs: dict[str, np.ndarray]   # per split: its images, or its cached features
  feature: heads.FeatureChoice | None = None
  kind: str = ""                  # the feed: "device" or "host"
  mngr: Any = None
  writer: Any = None

  @property
  def frozen_encoder(self) -> bool:
    return all(jax.tree.leaves(self.frozen["encoder"]))

  @property
  def cached(self) -> bool:
    """A frozen encoder without augmentation: its features are computed once per split
    and only the head trains on them."""
    return self.frozen_encoder and not self.config.augment

  @property
  def dtype(self) -> Any:
    return build.dtype_of(self.config.model.dtype)

  @property
  def feed_dtype(self) -> Any:
    """Raw images (and cached features) stay float32 in the feed; the step casts to the
    compute dtype after normalising."""
    return np.float32

  def feeding(self, batch_size: int) -> steps.Feeding:
    return steps.Feeding(source=self.kind, local_batch=batch_size // self.mesh.devices.size,
                         seed=self.config.seed, dtype=self.dtype, images=not self.cached)

  def feed(self, split: str) -> feeds.DeviceFeed | feeds.HostFeed:
    return feeds.make(self.kind, self.inputs[split], self.splits[split].labels, self.mesh,
                      self.config.seed, self.feed_dtype)


def read_feature_choice(workdir: str | Path) -> heads.FeatureChoice | None:
  """The frozen feature a probe in `workdir` trained on (feature_choice.json), or None
  where the run cached no features (a fine-tune). Workdirs written before the file held
  `block` and `pool` kept the choice in their config.json's model."""
  workdir = Path(workdir)
  path = workdir / workdir_lib.FEATURES_FILE
  if not path.exists():
    return None
  saved = fileio.read_json(path)
  if "block" not in saved:
    model = fileio.read_json(workdir / workdir_lib.CONFIG_FILE)["model"]
    return heads.FeatureChoice(model.get("feature_block", -1), model["pool"])
  return heads.FeatureChoice(int(saved["block"]), saved["pool"])


def _labelled_splits(config: ml_collections.ConfigDict,
                     data: source.DataSettings) -> dict[str, Any]:
  """The labelled budget of the train split, validation and test, checked for size."""
  dataset = common.load_dataset(data, config.model.image_size)
  splits = {"train": common.labelled_subset(dataset["train"], config.labels_per_class,
                                            config.seed),
            "validation": dataset["validation"], "test": dataset["test"]}
  common.log_split_sizes(config.stage, {"train (labelled)": splits["train"],
                                        "validation": splits["validation"],
                                        "test": splits["test"]})
  for name in ("validation", "test"):
    common.require(splits[name], 1, "labelled", data.dir)
  common.require(splits["train"], config.batch_size, "labelled", data.dir)
  return splits


def _baseline(config: ml_collections.ConfigDict, splits: dict[str, Any]) -> baseline.Fitted:
  """The non-deep baseline, fitted on the same labelled images; scored on val and test."""
  profiles = {name: baseline.profiles_of(s.images) for name, s in splits.items()}
  base = baseline.evaluate_baseline(
      (profiles["train"], splits["train"].labels),
      {name: (profiles[name], splits[name].labels) for name in ("validation", "test")},
      tuple(config.evals), intervals_seed=config.seed)
  logging.info("baseline, %s: validation %s %.4f", baseline.DESCRIPTION, config.select_by,
               base.scores["validation"].get(config.select_by))
  return base


def _feature_bank(run: _Run) -> dict:
  """{split: {candidate feature: (N, D)}} of the frozen encoder, one pass per split."""
  fn = steps.feature_bank_fn(run.model)
  tree = parallel.replicate({"params": run.params, "batch_stats": run.batch_stats}, run.mesh)
  out = {}
  for name, split in run.splits.items():
    kind = common.choose_feed(run.data, split.images.nbytes, f"{name} features")
    feed = feeds.make(kind, split.images, split.labels, run.mesh, run.config.seed, np.float32)
    feeding = steps.Feeding(source=kind, local_batch=run.config.eval_batch_size //
                            run.mesh.devices.size, seed=run.config.seed, dtype=run.dtype)
    out[name] = common.Evaluator(fn, run.mesh, feed, feeding)(tree)
  return out


def _choose_features(run: _Run, bank: dict) -> heads.FeatureChoice:
  """The candidate feature chosen on validation, or the configured one (kept in
  feature_choice.json, so a resumed run keeps its choice)."""
  config = run.config
  if (run.workdir / workdir_lib.FEATURES_FILE).exists() and \
      checkpoint.latest_step(run.workdir) is not None:
    return read_feature_choice(run.workdir)
  scores = {}
  chosen = heads.FeatureChoice(config.model.feature_block, config.model.pool)
  if config.get("select_features"):
    scores = features_lib.score_candidates(bank["train"], run.splits["train"].labels,
                                           bank["validation"], run.splits["validation"].labels)
    candidates = {c.name: c for c in heads.feature_candidates(config.model.depth)}
    chosen = candidates[features_lib.choose(scores)]
  if loop_lib.is_main_process():
    fileio.write_json_atomic(run.workdir / workdir_lib.FEATURES_FILE, {
        "chosen": chosen.name, **dataclasses.asdict(chosen), "validation_macro_auc": scores,
        "scored_by": "logistic regression on train features"})
  logging.info("frozen features: %s%s", chosen.name,
               f" (chosen on validation: {scores[chosen.name]:.4f})" if scores else "")
  return chosen


def _cache_features(run: _Run) -> None:
  """The frozen encoder's features of every split, computed once; the classifier is
  rebuilt to read the chosen one, and trains its head on them."""
  start = time.time()
  bank = _feature_bank(run)
  run.feature = _choose_features(run, bank)
  run.model = build.build_classifier(run.config.model, len(layout.CLASS_NAMES), parallel.AXIS,
                                     feature=run.feature)
  run.inputs = {name: b[run.feature.name] for name, b in bank.items()}
  logging.info("frozen features of every split computed in %.1f s", time.time() - start)


def _setup(config: ml_collections.ConfigDict, workdir: Path) -> _Run:
  """Checks, data, the model and its starting params, the baseline, and (a frozen
  encoder without augmentation) the cached features of every split."""
  mesh = parallel.make_mesh()
  parallel.check_batch(config.batch_size)
  parallel.check_batch(config.eval_batch_size, "eval_batch_size")
  if loop_lib.is_main_process():
    workdir.mkdir(parents=True, exist_ok=True)
  data = source.DataSettings.from_config(config.data)
  splits = _labelled_splits(config, data)
  trainable = config.get("trainable_blocks", -1)
  depth = config.model.get("depth", 0)   # the ViT's; the CNN has no blocks to freeze
  frozen_blocks = depth - trainable if trainable >= 0 else 0
  model = build.build_classifier(config.model, len(layout.CLASS_NAMES), parallel.AXIS,
                                 frozen_blocks=frozen_blocks)
  logging.info("%s: compute dtype %s", config.stage, build.describe_dtype(config.model.dtype))
  opt = optim.ClassifierOptimSettings.from_config(config.optim)
  opt = dataclasses.replace(opt, frozen=opt.frozen + optim.frozen_below(depth, trainable))
  params, batch_stats = _initial_params(config, opt, model, workdir)
  run = _Run(config=config, data=data, opt=opt, workdir=workdir, mesh=mesh, splits=splits,
             model=model, params=params, batch_stats=batch_stats,
             frozen=optim.match(params, opt.frozen), base=None, inputs={})
  run.base = _baseline(config, splits) if config.get("fit_baseline", True) else None
  run.inputs = {name: s.images for name, s in splits.items()}
  if run.cached:
    _cache_features(run)
  run.kind = common.choose_feed(data, run.inputs["train"].nbytes +
                                run.inputs["validation"].nbytes, config.stage)
  return run


def _optimizer(run: _Run, steps_per_epoch: int) -> tuple[Any, Any]:
  """The optimiser of the trained params and the head's learning-rate schedule."""
  config = run.config
  total_steps = config.epochs * steps_per_epoch
  tx, peaks = optim.classifier_optimizer(
      run.params, run.opt, total_steps=total_steps, steps_per_epoch=steps_per_epoch,
      global_batch=config.batch_size, depth=config.model.get("depth", 0))
  trained = sum(int(np.prod(p.shape)) for p, f in zip(jax.tree.leaves(run.params),
                                                     jax.tree.leaves(run.frozen)) if not f)
  logging.info("%s: %s params, %s trained; %d labelled images, %d steps per epoch%s",
               config.stage, f"{optim.count_params(run.params):,}", f"{trained:,}",
               len(run.splits["train"]), steps_per_epoch,
               " (frozen encoder: cached features, head only)" if run.cached else "")
  head_lr = max(jax.tree.leaves(peaks))
  schedule = optim.warmup_cosine(head_lr, total_steps,
                                 int(run.opt.warmup_epochs * steps_per_epoch),
                                 min(run.opt.min_lr, head_lr))
  return tx, schedule


def _tree(state) -> dict:
  return {"params": state.params, "batch_stats": state.batch_stats}


def _validation_numbers(scores: results.Scores) -> dict[str, Any]:
  """A history record's validation numbers: `val_<name>` for each scalar the evaluators
  yield, `val_<name>_<class>` for each per-class one."""
  out = {}
  for name, value in scores.values.items():
    if isinstance(value, dict):
      out.update({f"val_{name}_{c}": v for c, v in value.items()})
    elif not isinstance(value, list):
      out[f"val_{name}"] = value
  return out


def _validation(run: _Run, evaluate: common.Evaluator, history: list[dict]) -> Callable:
  """The end of an epoch: every `eval_every_epochs` epochs (and after the last) the
  validation numbers of the `evals` join its record (the loop saves a new best
  `select_by`, `Loop.keep_best`)."""
  config = run.config

  def end_epoch(state, epoch, record):
    if (epoch + 1) % config.eval_every_epochs and epoch + 1 != config.epochs:
      return
    probs = metrics_lib.softmax(evaluate(_tree(state)))
    record.update(_validation_numbers(evaluators.evaluate(
        probs, run.splits["validation"].labels, tuple(config.evals))))

  return end_epoch


def _fit(run: _Run) -> tuple[Any, list[dict]]:
  """Trains (or resumes) the classifier; returns the final state and the history."""
  config = run.config
  feed = run.feed("train")
  steps_per_epoch = min(len(run.splits["train"]) // config.batch_size,
                        min(feed.layout.counts) // (config.batch_size // run.mesh.devices.size))
  tx, schedule = _optimizer(run, steps_per_epoch)
  state = parallel.replicate(steps.ClassifierState.create(
      apply_fn=run.model.apply, params=run.params, tx=tx, batch_stats=run.batch_stats), run.mesh)
  # The latest `keep_checkpoints` and the epoch chosen on validation (orbax's BestN).
  run.mngr = checkpoint.manager(run.workdir, config.keep_checkpoints, keep_best=True)
  run.writer = common.metric_writer(run.workdir, config)
  state, step, history, progress = loop_lib.open_run(
      run.workdir, config.to_dict(), state, steps_per_epoch, run.mngr, run.writer)
  body = steps.classifier_body(run.model, frozen_encoder=run.frozen_encoder,
                               label_smoothing=config.label_smoothing,
                               inputs_are_features=run.cached)
  chunks = common.Chunks(body, run.mesh, feed, run.feeding(config.batch_size))
  evaluate_val = common.Evaluator(steps.logits_fn(run.model, inputs_are_features=run.cached),
                                  run.mesh, run.feed("validation"),
                                  run.feeding(config.eval_batch_size))
  augmentation = run.data.augment if config.augment else None
  loop = loop_lib.Loop(
      settings=loop_lib.LoopSettings.from_config(config), workdir=run.workdir, state=state,
      run_chunk=lambda s, e, f, n, k: chunks(s, e, f, n, k, augmentation),
      train_examples=len(run.splits["train"]), global_batch=config.batch_size,
      steps_per_epoch=steps_per_epoch, total_epochs=config.epochs, schedule=schedule,
      name=config.stage, watch=(f"val_{config.select_by}",),
      keep_best=(f"val_{config.select_by}", evaluators.lower_is_better(config.select_by)))
  end_epoch = _validation(run, evaluate_val, history)
  with checkpoint.finishing(run.mngr):   # saves in flight complete, even on failure
    state = loop_lib.run_epochs(loop, step, history, run.mngr, run.writer, end_epoch, progress)
  return state, history


def _test(run: _Run, state, history: list[dict]) -> dict[str, tuple[np.ndarray, results.Epoch]]:
  """The test split, read now and only now: scored for the epoch validation chose
  ("chosen") and for the last one ("final"); (probabilities, scores) of each."""
  config = run.config
  evaluate = common.Evaluator(steps.logits_fn(run.model, inputs_are_features=run.cached),
                              run.mesh, run.feed("test"), run.feeding(config.eval_batch_size))
  chosen = checkpoint.restore_best(run.mngr, state)
  legacy = run.workdir / workdir_lib.BEST_CHECKPOINT
  if chosen is None and legacy.is_dir():   # begun before the BestN policy: its best is there
    with checkpoint.manager(run.workdir, 1, folder=workdir_lib.BEST_CHECKPOINT) as old:
      chosen = checkpoint.restore_latest(old, state)
  if chosen is None:
    raise errors.NonFiniteError(
        f"no epoch of {run.workdir} had a finite validation {config.select_by} to be chosen by; "
        "the final epoch's numbers are in history.json")
  chosen_state, chosen_step, _ = chosen
  out = {}
  for name, s, at in (("chosen", chosen_state, chosen_step), ("final", state, int(state.step))):
    probs = metrics_lib.softmax(evaluate(_tree(s)))
    epoch = next((h["epoch"] for h in history if h["step"] == at), None)
    scores = evaluators.evaluate(probs, run.splits["test"].labels, tuple(config.evals),
                                 seed=config.seed)
    out[name] = (probs, results.Epoch(scores, epoch, at))
  return out


def _record(run: _Run, tested: dict[str, tuple], history: list[dict]) -> results.EvalRecord:
  """eval_metrics.json: the chosen epoch's test numbers, its validation record, the final
  epoch, the baseline."""
  chosen = tested["chosen"][1]
  val_best = next(h for h in history if h["step"] == chosen.step)  # an evaluated epoch
  return results.EvalRecord(
      stage=run.config.stage, split="test", chosen=chosen, final=tested["final"][1],
      select_by=run.config.select_by,
      validation={k.removeprefix("val_"): v for k, v in val_best.items() if k.startswith("val_")},
      baseline=run.base.record() if run.base else None,
      labels_per_class=run.config.labels_per_class, train_examples=len(run.splits["train"]),
      validation_examples=len(run.splits["validation"]), test_examples=len(run.splits["test"]),
      features=run.feature.name if run.feature else None, feed=run.kind)


def _close(run: _Run, state, history: list[dict], seconds: float) -> dict:
  """Scores the test split, writes the figures and eval_metrics.json, closes the run."""
  config = run.config
  tested = _test(run, state, history)
  record = _record(run, tested, history)
  if loop_lib.is_main_process():
    title = f"{config.stage} ({config.preset})"
    images = _write_figures(run, title, tested["chosen"][0], record, history)
    run.writer.write_images(int(state.step), images)
    record.write(run.workdir)
  run.writer.flush()
  run.mngr.close()
  logging.info("%s done in %.1f s: %s; every number in %s", config.stage, seconds,
               _headline(record), run.workdir / workdir_lib.EVAL_FILE)
  return record.to_json()


def _number(value: float | None, interval: list[float] | None = None) -> str:
  if value is None:
    return "n/a"
  return f"{value:.4f}" + (f" [{interval[0]:.4f}, {interval[1]:.4f}]" if interval else "")


def _headline(record: results.EvalRecord) -> str:
  """The stage's result in one line: the test number that matters (`select_by`) of the
  epoch validation chose, the final epoch's, and the baseline's."""
  select, test = record.select_by, record.test
  line = (f"test {select} {_number(test.get(select), test.interval(select))} (epoch "
          f"{record.chosen.epoch}, chosen on validation)")
  if record.final and record.final.epoch != record.chosen.epoch:
    line += f"; last epoch {_number(record.final.scores.get(select))}"
  if record.baseline:
    line += f"; radial baseline {_number(record.baseline.scores.get(select))}"
  return line


def _write_figures(run: _Run, title: str, probs: np.ndarray, record: results.EvalRecord,
                   history: list) -> dict:
  """The test split's ROC curves (with the baseline's), confusion matrix and each
  evaluator's own figure, and the loss curves."""
  folder, labels, test = run.workdir / workdir_lib.PLOTS, run.splits["test"].labels, record.test
  roc_png = plots.roc(metrics_lib.roc_curves(probs, labels), folder / "roc.png",
                      title=f"{title}, test split, epoch {record.chosen.epoch}",
                      baseline=run.base.curves["test"] if run.base else None)
  images = {"roc": plots.image_array(roc_png)}
  if "confusion_matrix" in test.values:
    accuracy = test.get("accuracy")
    images["confusion"] = plots.image_array(plots.confusion(
        test["confusion_matrix"], layout.CLASS_NAMES, folder / "confusion.png",
        title=title + (f", test accuracy {accuracy:.3f}" if accuracy is not None else "")))
  for name, png in evaluators.figures(probs, labels, tuple(run.config.evals), folder,
                                      f"{title}, test split").items():
    images[name] = plots.image_array(png)
  plots.loss_curves(history, folder / "loss_curve.png", title=title, ylabel="cross-entropy")
  return images


@registry.register("probe", "finetune")
def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) a probe or fine-tune stage; returns its test evaluation."""
  run_ = _setup(config, Path(workdir))
  start = time.time()
  state, history = _fit(run_)
  return _close(run_, state, history, time.time() - start)
