"""The `study` stage: does the pretraining pay off? A label-efficiency study.

  python main.py --config=configs/study.py:demo --workdir=runs/study_demo

For each simulator variant: prepare the data, pretrain one MAE on the unlabelled
pool, then for each label budget (images per class from the train split) and each
seed, run the arms:

- `mae_finetune`: the fine-tune stage from the MAE;
- `scratch_finetune`: the same fine-tune from a random encoder, at its own learning
  rate, chosen on validation from `scratch_lrs` (with the first seed of each budget;
  the other seeds reuse it);
- `mae_partial`: the fine-tune stage from the MAE training only the encoder's last
  `partial_blocks` blocks (and its final norm) with the head (`trainable_blocks`);
- `mae_probe`: the probe stage on the MAE's frozen features, block and pooling
  chosen on validation;
- `radial`: the radial-profile logistic regression, fitted on the same labelled
  images (read from the fine-tune's `eval_metrics.json`);
- `supervised` / `supervised_cnn`: the ceiling, once per seed: the same ViT, and the
  small CNN (`models/cnn.py`), trained from scratch on every label of the train split
  for `supervised_steps` steps at their `supervised_lrs` (with the radial baseline on
  all labels beside them). Where `supervised` runs on the scratch fine-tune's schedule,
  it is also the scratch ViT on every label: the `all` budget does not train
  `scratch_finetune` again (`budget_arms`).

Each run takes about `finetune_steps` (`probe_steps`) optimiser steps, or its budget's
own count in `finetune_budget_steps` (`probe_budget_steps`): a few labels need few
steps, every label thousands.

For simulated variants the study also measures how far above the noise the
substructure lies (`simulate.substructure_snr` on `snr_images` images per class), so
every AUC is read against what is reachable, and checks its goals (`goals`).

Every run is an ordinary stage in its own sub-workdir
(`WORKDIR/<variant>/<budget>/<arm>/...`), skipped when complete and resumed when
not, so the command can be stopped and run again. Any number of processes (one per
GPU, a Slurm job array) may run the same command on one shared workdir: each run is
claimed by one of them (its workdir lock), a worker skips the runs others hold and
those that wait for them (the MAE, the scratch rate chosen with the first seed), and
comes back to them every `poll_seconds`; a dead worker's claim ends with it and the
run is taken over, resuming from its checkpoint. Each worker writes the tables once
every run is complete, as a plain rerun does. Every number comes from a run's
`eval_metrics.json` (test split, epoch chosen on validation, bootstrap interval);
the study writes `study.json` (rows, summary, ceilings, goals), `study.md`,
`report.md` / `report.html` (the same tables, rendered from the same rows) and
`label_efficiency.png`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from absl import logging

from mae_jax.data import layout
from mae_jax.data import simulate
from mae_jax.eval import plots
from mae_jax.eval import results
from mae_jax.runtime import errors
from mae_jax.runtime import fileio
from mae_jax.runtime import workdir as workdir_lib
from mae_jax.stages import classify  # pylint: disable=unused-import (registers probe, finetune)
from mae_jax.stages import data as data_stage  # pylint: disable=unused-import (registers data)
from mae_jax.stages import registry
from mae_jax.stages import report
from mae_jax.stages import runs as runs_lib
from mae_jax.stages import validate
from mae_jax.train import loop

ARMS = ("mae_finetune", "mae_partial", "scratch_finetune", "mae_probe", "radial", "supervised",
        "supervised_cnn")
ARM_TITLES = {"mae_finetune": "MAE fine-tune", "mae_partial": "MAE partial fine-tune",
              "scratch_finetune": "scratch fine-tune",
              "mae_probe": "MAE probe", "radial": "radial-profile baseline",
              "supervised": "supervised ViT (all labels)",
              "supervised_cnn": "supervised CNN (all labels)"}
# The ceiling arms: a network from scratch on every label, with its model overrides.
# The ceiling arms: a network from scratch on every label, with its config-argument options.
SUPERVISED = {"supervised": {}, "supervised_cnn": {"arch": "cnn"}}
# The arms that read the variant's MAE (its pretraining).
MAE_ARMS = ("mae_finetune", "mae_partial", "mae_probe")
RESULTS_FILE, TABLE_FILE, FIGURE_FILE = "study.json", "study.md", "label_efficiency.png"
SNR_FILE = "substructure_snr.json"   # per variant folder: the measured SNR, kept


def budget_name(labels_per_class: int) -> str:
  return "all" if labels_per_class <= 0 else f"{labels_per_class}_per_class"


def budget_steps(config: ml_collections.ConfigDict, stage: str, labels: int) -> int:
  """About how many optimiser steps a `stage` ('finetune' or 'probe') run takes on
  `labels` per class (0 or less: every label): the budget's own count in
  `<stage>_budget_steps`, else `<stage>_steps`."""
  return int(dict(config[f"{stage}_budget_steps"]).get(max(labels, 0), config[f"{stage}_steps"]))


def budget_arms(config: ml_collections.ConfigDict, arms: tuple[str, ...],
                labels: int) -> tuple[str, ...]:
  """The arms a budget runs. On every label the scratch fine-tune is not run where the
  `supervised` ViT is an arm on the same schedule (its steps equal the budget's, its
  rate one of `scratch_lrs`): that run is the scratch ViT on every label."""
  same = (budget_steps(config, "finetune", 0) == config.supervised_steps
          and config.supervised_lrs.supervised in tuple(config.scratch_lrs))
  if labels <= 0 and "supervised" in arms and same:
    return tuple(a for a in arms if a != "scratch_finetune")
  return arms


def _stage(sub: ml_collections.ConfigDict, name: str, config: ml_collections.ConfigDict,
           data: ml_collections.ConfigDict, **overrides) -> ml_collections.ConfigDict:
  stage = sub.copy_and_resolve_references()
  stage.unlock()
  stage.stage = name
  stage.preset = config.preset
  stage.data = data.copy_and_resolve_references()
  if "init_from" in stage:
    stage.init_from, stage.init_from_stage = "", "pretrain"
  for key, value in overrides.items():
    node = stage
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  stage.lock()
  return stage


def _budget_schedule(sub: ml_collections.ConfigDict, labels: int, train_size: int,
                     devices: int, steps: int, evaluations: int) -> dict[str, Any]:
  """Batch size and epochs of a run on `labels` images per class (0: the whole train
  split of `train_size`): the configured batch, shrunk to at most half the labelled
  images (a multiple of the device count), enough epochs for about `steps` steps, and
  about `evaluations` validation passes (and as many checkpoints). The warmup is at most
  a tenth of the run (a stage's warmup in epochs would otherwise fill a run whose epochs
  are few and long)."""
  n = len(layout.CLASS_NAMES) * labels if labels > 0 else train_size
  batch = min(sub.batch_size, max(devices, (n // 2) // devices * devices))
  per_epoch = max(n // batch, 1)
  epochs = max(1, -(-steps // per_epoch))
  every = max(1, epochs // evaluations)
  return {"batch_size": batch, "epochs": epochs, "eval_every_epochs": every,
          "checkpoint_every_epochs": every,
          "optim.warmup_epochs": min(sub.optim.warmup_epochs, epochs / 10)}


class Deferred(Exception):
  """A run another worker holds (its workdir lock), or one waiting for such a run."""


class _Pass:
  """One pass over the study's runs in their fixed order: the runs it could not do now
  because another worker holds them, or they wait for one that does."""

  def __init__(self):
    self.deferred: list[str] = []

  def attempt(self, fn: Callable, *args, **kwargs) -> tuple[bool, Any]:
    """(True, fn(...)), or (False, None) where the run (or one it needs) is deferred."""
    try:
      return True, fn(*args, **kwargs)
    except Deferred as e:
      self.deferred.append(str(e))
      return False, None

  def wait_for(self, what: str) -> tuple[bool, None]:
    self.deferred.append(what)
    return False, None


def _ensure(name: str, config: ml_collections.ConfigDict,
            stage_dir: Path) -> results.EvalRecord | None:
  """Runs stage `name` in `stage_dir` unless complete; returns its results record (None
  for a stage that writes none).

  Raises:
    Deferred: another worker holds the run (it is running it now).
  """
  record = runs_lib.read_record(stage_dir)
  why = runs_lib.incomplete_reason(name, stage_dir, config, record)
  if why is None:
    logging.info("study: %s complete, skipped", stage_dir)
  else:
    logging.info("study: %s: %s; running it", stage_dir, why)
    try:
      runs_lib.run_stage(name, registry.get(name), config, stage_dir, record)
    except errors.WorkdirBusyError:
      logging.info("study: %s is being run by another worker; on to the next run", stage_dir)
      raise Deferred(str(stage_dir)) from None
  return results.read(stage_dir, name) if results.exists(stage_dir) else None


def _val_auc(record: results.EvalRecord | None) -> float:
  value = (record.validation if record else {}).get("macro_auc")
  return -1.0 if value is None else value


def _row(variant: str, labels: int, seed: int, arm: str, record: results.EvalRecord, run: Path,
         **extra) -> dict[str, Any]:
  """A study row of a probe's or fine-tune's record (test numbers of the chosen epoch)."""
  return _scores_row(variant, labels, seed, arm, record.test, run,
                     validation_macro_auc=record.validation.get("macro_auc"),
                     epoch=record.chosen.epoch, train_examples=record.train_examples, **extra)


def _radial_row(variant: str, labels: int, seed: int, record: results.EvalRecord,
                run: Path) -> dict[str, Any]:
  """A study row of the radial baseline a run fitted on its labelled images."""
  base = record.baseline
  return _scores_row(variant, labels, seed, "radial", base.scores, run,
                     validation_macro_auc=base.validation_macro_auc, epoch=None,
                     train_examples=base.train_examples)


def _scores_row(variant: str, labels: int, seed: int, arm: str, scores: results.Scores,
                run: Path, **extra) -> dict[str, Any]:
  return {"variant": variant, "labels_per_class": labels, "seed": seed, "arm": arm,
          "test_macro_auc": scores.get("macro_auc"),
          "test_macro_auc_interval": scores.interval("macro_auc"),
          "test_accuracy": scores.get("accuracy"), **extra, "run": str(run)}


def summarise(rows: list[dict]) -> list[dict[str, Any]]:
  """Per (variant, arm, budget): the mean test macro AUC over seeds, its spread, and the
  mean of the seeds' bootstrap intervals."""
  cells: dict[tuple, list[dict]] = {}
  for r in rows:
    cells.setdefault((r["variant"], r["arm"], r["labels_per_class"]), []).append(r)
  out = []
  for (variant, arm, labels), members in sorted(cells.items(), key=lambda kv: (
      kv[0][0], ARMS.index(kv[0][1]), kv[0][2] <= 0, kv[0][2])):
    aucs = [m["test_macro_auc"] for m in members if m["test_macro_auc"] is not None]
    cis = [m["test_macro_auc_interval"] for m in members if m["test_macro_auc_interval"]]
    out.append({"variant": variant, "arm": arm, "labels_per_class": labels, "seeds": len(aucs),
                "mean_test_macro_auc": float(np.mean(aucs)) if aucs else None,
                "min": float(np.min(aucs)) if aucs else None,
                "max": float(np.max(aucs)) if aucs else None,
                "mean_interval": ([float(np.mean([c[0] for c in cis])),
                                   float(np.mean([c[1] for c in cis]))] if cis else None)})
  return out


GOAL_TEXT = {
    "mae_over_scratch": "MAE fine-tune ≥ scratch fine-tune + {margin}",
    "mae_over_radial": "MAE fine-tune ≥ radial baseline + {margin}",
    "probe_near_radial": "MAE probe ≥ radial baseline − {margin}",
    "ceiling_at_least": "supervised ceiling ≥ {margin}",
    "radial_at_most": "radial baseline (all labels) ≤ {margin}",
}


def goals(summary: list[dict], labels: int, over_scratch: float,
          over_radial: dict[str, float] | None = None,
          probe_near_radial: dict[str, float] | None = None,
          ceiling_at_least: dict[str, float] | None = None,
          radial_at_most: dict[str, float] | None = None) -> list[dict[str, Any]]:
  """The study's goals, each with the arm's mean test macro AUC (`value`), the AUC it had
  to reach (`target`) and the margin by which it was met (`gap`; negative: missed by that
  much). At `labels` per class, on every variant with both arms:
  - `mae_over_scratch`: the MAE fine-tune above the scratch fine-tune by `over_scratch`;
  per variant, where the dict names it:
  - `mae_over_radial`: the MAE fine-tune above the radial-profile baseline by a margin;
  - `probe_near_radial`: the MAE probe at most a margin below the radial baseline;
  and on all labels:
  - `ceiling_at_least`: the better supervised arm at least this AUC (the task is
    learnable);
  - `radial_at_most`: the radial baseline at most this AUC (the lens mass gives the class
    away no more than this)."""
  mean = {(s["variant"], s["arm"], s["labels_per_class"]): s["mean_test_macro_auc"]
          for s in summary if s["mean_test_macro_auc"] is not None}
  margins = {"mae_over_radial": over_radial or {}, "probe_near_radial": probe_near_radial or {},
             "ceiling_at_least": ceiling_at_least or {}, "radial_at_most": radial_at_most or {}}
  out = []
  for variant in dict.fromkeys(v for v, _, _ in mean):
    out += _variant_goals(mean, variant, labels, over_scratch, margins)
  return out


def config_goals(summary: list[dict], config: ml_collections.ConfigDict) -> list[dict[str, Any]]:
  """`goals` at the study config's `goal_*` keys."""
  return goals(summary, config.goal_labels, config.goal_over_scratch,
               over_radial=config.goal_over_radial.to_dict(),
               probe_near_radial=config.goal_probe_near_radial.to_dict(),
               ceiling_at_least=config.goal_ceiling_at_least.to_dict(),
               radial_at_most=config.goal_radial_at_most.to_dict())


def _goal(mean: dict, goal: str, variant: str, n: int, arm: str, target: float | None,
          margin: float, at_most: bool = False) -> dict[str, Any] | None:
  """One goal's row (`goals`), or None where the arm or the target is missing."""
  value = mean.get((variant, arm, n))
  if value is None or target is None:
    return None
  return {"goal": goal, "variant": variant, "labels_per_class": n, "arm": arm, "value": value,
          "target": target, "margin": margin,
          "gap": (target - value) if at_most else (value - target)}


def _variant_goals(mean: dict, variant: str, labels: int, over_scratch: float,
                   margins: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
  """The goals of one variant (`goals`), in their fixed order."""
  get = lambda arm, n=labels: mean.get((variant, arm, n))  # pylint: disable=unnecessary-lambda-assignment
  found = []
  if get("scratch_finetune") is not None:
    found.append(_goal(mean, "mae_over_scratch", variant, labels, "mae_finetune",
                       get("scratch_finetune") + over_scratch, over_scratch))
  for goal, arm, sign in (("mae_over_radial", "mae_finetune", 1),
                          ("probe_near_radial", "mae_probe", -1)):
    if variant in margins[goal] and get("radial") is not None:
      margin = margins[goal][variant]
      found.append(_goal(mean, goal, variant, labels, arm, get("radial") + sign * margin, margin))
  ceiling = [a for a in SUPERVISED if get(a, 0) is not None]
  if variant in margins["ceiling_at_least"] and ceiling:
    margin = margins["ceiling_at_least"][variant]
    found.append(_goal(mean, "ceiling_at_least", variant, 0,
                       max(ceiling, key=lambda a: get(a, 0)), margin, margin))
  if variant in margins["radial_at_most"]:
    margin = margins["radial_at_most"][variant]
    found.append(_goal(mean, "radial_at_most", variant, 0, "radial", margin, margin,
                       at_most=True))
  return [g for g in found if g is not None]


def snr_ceiling(data: ml_collections.ConfigDict, images_per_class: int) -> dict[str, Any] | None:
  """How far above the noise the substructure of a simulated variant lies: per class,
  the median and 10th / 90th percentiles of `simulate.substructure_snr` over the first
  `images_per_class` images of its folder (re-rendered from params.csv, noise-free).
  None for a folder without params.csv (real data)."""
  folder = Path(data.dir)
  if data.source != "simulated" or images_per_class <= 0 \
      or not (folder / simulate.PARAMS_NAME).exists():
    return None
  rows = simulate.read_parameters(folder)
  out = {}
  for name in layout.CLASS_NAMES:
    if name == "no_sub":
      continue
    snr = [simulate.substructure_snr(simulate.parameters_from_row(r)) for r in rows
           if r["class"] == name and r["index"] < images_per_class]
    if snr:
      p10, p50, p90 = np.percentile(snr, [10, 50, 90])
      out[name] = {"images": len(snr), "median": float(p50), "p10": float(p10),
                   "p90": float(p90), "share_below_5": float(np.mean(np.array(snr) < 5))}
  return out


def _f3(value: float | None) -> str:
  return "" if value is None else f"{value:.3f}"


def _summary_blocks(summary: list[dict]) -> list[tuple]:
  """The label-efficiency table: per variant, arm and budget, the mean over seeds."""
  rows = []
  for s in summary:
    ci = s["mean_interval"]
    rows.append([s["variant"], ARM_TITLES[s["arm"]],
                 "all" if s["labels_per_class"] <= 0 else str(s["labels_per_class"]),
                 str(s["seeds"]), _f3(s["mean_test_macro_auc"]),
                 f"{_f3(s['min'])} – {_f3(s['max'])}",
                 f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""])
  return [("p", "Test macro AUC (the test split chose nothing: epochs and learning rates were "
                "chosen on validation), mean over seeds, with the lowest and highest seed and "
                "the mean of the seeds' bootstrap 95% intervals."),
          ("table", ["variant", "arm", "labels per class", "seeds", "mean test macro AUC",
                     "min – max", "mean 95% interval"], rows)]


def _ceiling_blocks(summary: list[dict], ceilings: dict[str, dict]) -> list[tuple]:
  """Per variant: the substructure's SNR and what training on every label reaches."""
  mean = {(s["variant"], s["arm"], s["labels_per_class"]): s for s in summary}
  crow = []
  for variant, c in ceilings.items():
    snr = c.get("snr") or {}
    cell = lambda name: (f"{snr[name]['median']:.0f} [{snr[name]['p10']:.0f}, "  # pylint: disable=unnecessary-lambda-assignment,cell-var-from-loop
                         f"{snr[name]['p90']:.0f}]" if name in snr else "")
    auc = lambda arm: _f3((mean.get((variant, arm, 0)) or {}).get("mean_test_macro_auc"))  # pylint: disable=unnecessary-lambda-assignment,cell-var-from-loop
    crow.append([variant, cell("cdm"), cell("axion"), *(auc(a) for a in SUPERVISED),
                 auc("radial")])
  if not crow:
    return []
  return [("p", "Ceilings: how far above the noise the substructure lies (median "
                "[10th, 90th percentile] of its noise-weighted signal, the SNR a matched "
                "filter with the true smooth lens reaches), and what a network trained on "
                "every label reaches (test macro AUC, mean over seeds)."),
          ("table", ["variant", "cdm substructure SNR", "axion substructure SNR",
                     *(ARM_TITLES[a] for a in SUPERVISED), "radial baseline (all labels)"],
           crow)]


def _goal_blocks(goal_rows: list[dict]) -> list[tuple]:
  """The goals (`goals`): each arm's mean against its target, met or missed by how much."""
  if not goal_rows:
    return []
  return [("p", "Goals (test macro AUC; a negative gap is the amount by which a goal was "
                "missed):"),
          ("table", ["variant", "labels per class", "goal", "arm", "mean test macro AUC",
                     "target", "gap"],
           [[g["variant"], "all" if g["labels_per_class"] <= 0 else str(g["labels_per_class"]),
             GOAL_TEXT[g["goal"]].format(margin=g["margin"]), ARM_TITLES[g["arm"]],
             f"{g['value']:.3f}", f"{g['target']:.3f}",
             f"{g['gap']:+.3f} {'(met)' if g['gap'] >= 0 else '(missed)'}"]
            for g in goal_rows])]


def tables(summary: list[dict], ceilings: dict[str, dict], goal_rows: list[dict]
           ) -> list[tuple]:
  """The study's tables as report blocks (`report.to_markdown` / `to_html` render them):
  the label-efficiency table, the ceilings per variant, the goals."""
  return (_summary_blocks(summary) + _ceiling_blocks(summary, ceilings)
          + _goal_blocks(goal_rows))


@registry.register("study")
def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) every run of the study; writes its tables, figure and report."""
  workdir = Path(workdir)
  start = time.time()
  validate.check_study(config, ARMS)
  _warn_unused_budget_steps(config)
  first = config.data.copy_and_resolve_references()
  first.dir = config.data_dirs[config.variants[0]]
  validate.check_chain({name: _stage(sub, name, config, first) for name, sub in (
      ("data", config.data_stage), ("pretrain", config.pretrain), ("probe", config.probe),
      ("finetune", config.finetune))}, workdir / config.variants[0])
  rows, ceilings = _all_runs(config, workdir)
  summary = summarise(rows)
  goal_rows = config_goals(summary, config)
  seconds = time.time() - start
  if loop.is_main_process():
    _write(workdir, config, rows, summary, ceilings, goal_rows, seconds)
  logging.info("study done in %s: %s", report.duration(seconds), workdir / TABLE_FILE)
  return {"rows": len(rows), "table": str(workdir / TABLE_FILE)}


def radial_beside_supervised(config: ml_collections.ConfigDict, arms: tuple[str, ...],
                             ladder: tuple[int, ...]) -> bool:
  """Whether the radial baseline on every label is read from the supervised arms' runs:
  where the ladder's `all` budget runs no arm that carries it (every fine-tune and
  probe does)."""
  carriers = {"mae_finetune", "mae_partial", "mae_probe", "scratch_finetune"}
  return 0 not in ladder or not carriers & set(budget_arms(config, arms, 0))


def _warn_unused_budget_steps(config: ml_collections.ConfigDict) -> None:
  """A `<stage>_budget_steps` entry for a budget no variant's ladder has (a ladder
  overridden on the command line) does nothing: say so, rather than refuse the run."""
  ladders = {max(n, 0) for v in config.variants
             for n in (config.variant_labels_per_class.get(v) or config.labels_per_class)}
  for stage in ("finetune", "probe"):
    unused = [labels for labels, _ in config[f"{stage}_budget_steps"] if labels not in ladders]
    if unused:
      logging.warning("study: %s_budget_steps names budgets no ladder runs (%s); they are "
                      "not used", stage, ", ".join(budget_name(n) for n in unused))


def _all_runs(config: ml_collections.ConfigDict, workdir: Path
              ) -> tuple[list[dict], dict[str, Any]]:
  """Every run of every variant, pass after pass until none is left to another worker:
  any number of processes may run the same study on one workdir, each run claimed by
  one (its workdir lock; a dead worker's lock ends with it and the run is taken over,
  resuming from its checkpoint). Returns the rows and ceilings of the complete pass."""
  while True:
    pass_, rows, ceilings = _Pass(), [], {}
    for variant in config.variants:
      variant_rows, ceilings[variant] = _run_variant(config, variant, workdir / variant, pass_)
      rows += variant_rows
    if not pass_.deferred:
      return rows, ceilings
    logging.info("study: %d run(s) wait for other workers (%s); looking again in %g s",
                 len(pass_.deferred), ", ".join(pass_.deferred[:3]), config.poll_seconds)
    time.sleep(config.poll_seconds)


def _run_variant(config: ml_collections.ConfigDict, variant: str, vdir: Path, pass_: _Pass
                 ) -> tuple[list[dict], dict[str, Any]]:
  """Every run of one variant: data, MAE, each budget's arms, the supervised ceiling.
  Returns its rows and its ceilings (substructure SNR); runs held by another worker
  (and those that need them) are left to a later pass (`pass_`)."""
  data = config.data.copy_and_resolve_references()
  data.sim.variant = variant
  data.dir = config.data_dirs[variant]
  ready, summary = pass_.attempt(_ensure_data, config, data, vdir / "data")
  if not ready:
    return [], {}
  train_size = sum(summary["counts"]["train"].values())
  pre_dir = vdir / "pretrain"
  arms = tuple(config.variant_arms.get(variant) or config.arms)
  ladder = tuple(config.variant_labels_per_class.get(variant) or config.labels_per_class)
  mae_ready = True
  if any(a in arms for a in MAE_ARMS):
    mae_ready, _ = pass_.attempt(_ensure, "pretrain",
                                 _stage(config.pretrain, "pretrain", config, data), pre_dir)
  rows = []
  for labels in ladder:
    rows += _run_budget(config, data, variant, arms, labels, train_size, pre_dir,
                        vdir / budget_name(labels), pass_, mae_ready)
  rows += _run_supervised(config, data, variant, train_size, vdir / "supervised", arms=arms,
                          radial=radial_beside_supervised(config, arms, ladder), pass_=pass_)
  return rows, {"snr": _snr(data, config.snr_images, vdir / SNR_FILE)}


def _snr(data: ml_collections.ConfigDict, images: int, path: Path) -> dict | None:
  """`snr_ceiling`, measured once per variant folder and kept in `path`."""
  key = {"dir": str(Path(data.dir).resolve()), "images": images}
  if path.exists():
    kept = fileio.read_json(path)
    if kept.get("key") == key:
      return kept["snr"]
  snr = snr_ceiling(data, images)
  if loop.is_main_process():
    fileio.write_json_atomic(path, {"key": key, "snr": snr})
  return snr


def _mae_arm(config, data, stage: str, pre_dir: Path, run_dir: Path,
             **overrides) -> tuple[dict, Path]:
  """A fine-tune or probe (`stage`) of the variant's MAE: (its metrics, its run dir)."""
  return _ensure(stage, _stage(config[stage], stage, config, data, init_from=str(pre_dir),
                               **overrides), run_dir), run_dir


def _scratch_arm(config, data, variant: str, labels: int, bdir: Path,
                 scratch_lr: float | None, **overrides) -> tuple[tuple[dict, Path], float]:
  """The scratch fine-tune of one seed (`overrides["seed"]`): with the first seed, every
  `scratch_lrs` rate and the one validation chooses; later seeds at that rate. Returns
  (its metrics and run dir, the rate)."""
  seed = overrides["seed"]
  lrs = config.scratch_lrs if scratch_lr is None else (scratch_lr,)
  tried = {lr: _scratch(config, data, lr, bdir / "scratch_finetune" / f"seed{seed}_lr{lr:g}",
                        **overrides) for lr in lrs}
  if scratch_lr is None:   # chosen on validation with the first seed
    scratch_lr = max(tried, key=lambda lr: _val_auc(tried[lr][0]))
    logging.info("study: %s, %s: scratch lr %g chosen on validation (%s)", variant,
                 budget_name(labels), scratch_lr,
                 ", ".join(f"{lr:g}: {_val_auc(m):.4f}" for lr, (m, _) in tried.items()))
  return tried[scratch_lr], scratch_lr


def _seed_runs(config, data, variant: str, arms: tuple[str, ...], bdir: Path, pre_dir: Path,
               pass_: _Pass, mae_ready: bool, scratch: list, common: dict, schedules: dict
               ) -> dict[str, tuple[dict, Path]]:
  """One seed's arms of a budget: arm -> (metrics, run dir), the deferred ones left out.
  `scratch` holds the scratch rate chosen with the first seed ([None] until then; a
  deferred choice makes the later seeds wait)."""
  seed, runs = common["seed"], {}
  for arm, stage, extra in (("mae_finetune", "finetune", {}),
                            ("mae_partial", "finetune", {"trainable_blocks": config.partial_blocks}),
                            ("mae_probe", "probe", {})):
    if arm not in arms:
      continue
    ok, out = (pass_.attempt(_mae_arm, config, data, stage, pre_dir, bdir / arm / f"seed{seed}",
                             **common, **schedules[stage], **extra) if mae_ready
               else pass_.wait_for(f"{bdir / arm / f'seed{seed}'} (needs the MAE)"))
    if ok:
      runs[arm] = out
  if "scratch_finetune" in arms:
    first = seed == config.seeds[0]
    ok, out = (pass_.attempt(_scratch_arm, config, data, variant, common["labels_per_class"],
                             bdir, scratch[0], **common, **schedules["finetune"])
               if first or scratch[0] is not None
               else pass_.wait_for(f"{bdir} scratch seed {seed} (needs the chosen rate)"))
    if ok:
      runs["scratch_finetune"], scratch[0] = out
  return {arm: runs[arm] for arm in ARMS if arm in runs}   # the study's fixed row order


def _run_budget(config, data, variant: str, arms: tuple[str, ...], labels: int,
                train_size: int, pre_dir: Path, bdir: Path, pass_: _Pass,
                mae_ready: bool) -> list[dict]:
  """The arms of one label budget, every seed (deferred runs left to a later pass)."""
  devices = jax.device_count()
  schedules = {stage: _budget_schedule(config[stage], labels, train_size, devices,
                                       budget_steps(config, stage, labels), config.evaluations)
               for stage in ("finetune", "probe")}
  arms = budget_arms(config, arms, labels)
  rows, scratch = [], [None]
  for seed in config.seeds:
    runs = _seed_runs(config, data, variant, arms, bdir, pre_dir, pass_, mae_ready, scratch,
                      dict(labels_per_class=labels, seed=seed), schedules)
    scratch_lr = scratch[0]
    for arm, (metrics, run_dir) in runs.items():
      extra = {"lr": scratch_lr} if arm == "scratch_finetune" else (
          {"features": metrics.features} if arm == "mae_probe" else {})
      rows.append(_row(variant, labels, seed, arm, metrics, run_dir, **extra))
    if "radial" in arms and runs:   # fitted on the same labelled images
      metrics, run_dir = next(iter(runs.values()))
      rows.append(_radial_row(variant, labels, seed, metrics, run_dir))
  return rows


def _finetune_keys(config: ml_collections.ConfigDict,
                   options: dict[str, str]) -> ml_collections.ConfigDict:
  """The fine-tune keys of a run with config-argument `options` (the CNN's `arch=cnn`):
  the stock config of those options, with every key it shares with the study's
  `finetune` taken from there (an override of the study's fine-tune applies to both)."""
  if not options:
    return config.finetune
  stock = validate.reference_config("finetune", config.preset, options)
  ours = validate.flat_keys(config.finetune)
  for key, value in validate.flat_keys(stock).items():
    if key in ours and ours[key] != value:
      *parents, leaf = key.split(".")
      node = stock
      for p in parents:
        node = node[p]
      node[leaf] = ours[key]
  return stock


def _scratch(config, data, lr: float, run_dir: Path, options: dict[str, str] | None = None,
             **overrides) -> tuple[dict, Path]:
  """A fine-tune from a random initialisation, every param at `lr`."""
  sub = _finetune_keys(config, options or {})
  rates = {"optim.lr_groups": ((".*", lr),)}
  if "layer_decay" in sub.optim:
    rates["optim.layer_decay"] = 1.0
  if "init_from" in sub:
    rates["init_from"] = ""
  return _ensure("finetune", _stage(sub, "finetune", config, data, **rates, **overrides),
                 run_dir), run_dir


def _run_supervised(config, data, variant: str, train_size: int, sdir: Path, *,
                    arms: tuple[str, ...], radial: bool, pass_: _Pass) -> list[dict]:
  """The ceiling arms: each network from scratch on every label, once per seed (and,
  with `radial`, the radial baseline on every label beside them)."""
  schedule = _budget_schedule(config.finetune, 0, train_size, jax.device_count(),
                              config.supervised_steps, config.evaluations)
  rows = []
  for seed in config.seeds:
    runs = {}
    for arm in (a for a in SUPERVISED if a in arms):
      lr = config.supervised_lrs[arm]
      ok, out = pass_.attempt(_scratch, config, data, lr, sdir / arm / f"seed{seed}",
                              options=SUPERVISED[arm], labels_per_class=0, seed=seed, **schedule)
      if ok:
        runs[arm] = out
        rows.append(_row(variant, 0, seed, arm, *out, lr=lr))
    if radial and "radial" in arms and runs:
      metrics, run_dir = next(iter(runs.values()))
      rows.append(_radial_row(variant, 0, seed, metrics, run_dir))
  return rows


def _write(workdir: Path, config, rows, summary, ceilings, goal_rows, seconds: float) -> None:
  """study.json, study.md, the figure and the report (tables rendered from the rows)."""
  before = workdir / RESULTS_FILE
  old = fileio.read_json(before) if before.exists() else {}
  total = old.get("seconds_all_runs", old.get("seconds_this_run", 0.0)) + seconds
  fileio.write_json_atomic(before, {
      "rows": rows, "summary": summary, "ceilings": ceilings, "goals": goal_rows,
      "seconds_this_run": round(seconds, 1), "seconds_all_runs": round(total, 1)})
  blocks = tables(summary, ceilings, goal_rows) + [
      ("p", f"Wall time: {report.duration(total)}, summed over every invocation in this "
            "workdir (workers that ran at once each count theirs; a rerun skips finished runs).")]
  table = report.to_markdown([("h1", f"Label-efficiency study ({config.preset})")] + blocks)
  fileio.write_atomic(workdir / TABLE_FILE, lambda f: f.write(table.encode()))
  plots.label_efficiency(summary, workdir / FIGURE_FILE,
                         title=f"Label efficiency ({config.preset}): test macro AUC",
                         goals=goal_rows)
  report.write_study(workdir, config, blocks, FIGURE_FILE)


def _ensure_data(config, data, stage_dir: Path) -> dict:
  stage = _stage(config.data_stage, "data", config, data)
  record = runs_lib.read_record(stage_dir)
  if runs_lib.incomplete_reason("data", stage_dir, stage, record) is not None:
    try:
      runs_lib.run_stage("data", registry.get("data"), stage, stage_dir, record)
    except errors.WorkdirBusyError:
      logging.info("study: %s is being run by another worker; on to the next run", stage_dir)
      raise Deferred(str(stage_dir)) from None
  return json.loads((stage_dir / workdir_lib.DATA_SUMMARY).read_text())
