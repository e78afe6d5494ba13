"""The `study` stage: does the pretraining pay off? A label-efficiency study.

  python main.py --config=configs/study.py:demo --workdir=runs/study_demo

For each simulator variant: prepare the data, pretrain one MAE on the unlabelled pool,
then for each label budget (images per class from the train split) and each seed, run the
arms the config's `arm_table` states as data (configs/study.py): a fine-tune or probe
that starts from the MAE or from scratch (a scratch arm's rate chosen on validation with
the first seed of each budget, kept for the others), and the radial baseline each run
fits on its labels; the `ceiling` arms once per seed on every label. Where the `supervised`
ceiling runs on the scratch fine-tune's schedule it is also the scratch ViT on every label:
the `all` budget does not train `scratch_finetune` again (`budget_arms`).

Each run takes about `finetune_steps` (`probe_steps`) optimiser steps, or its budget's own
count in `finetune_budget_steps` (`probe_budget_steps`). For simulated variants the study
also measures how far above the noise the substructure lies (`snr_ceiling`).

Every run is an ordinary stage in its own sub-workdir (`WORKDIR/<variant>/<budget>/<arm>/
...`), skipped when complete and resumed when not. Any number of processes may run the
same command on one workdir: each run is claimed by one (`runtime.claims`). The rows,
tables, goals and figure come from the runs' results records (`study_tables`).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from mae_jax.data import layout
from mae_jax.data import simulate
from mae_jax.eval import results
from mae_jax.runtime import claims
from mae_jax.runtime import fileio
from mae_jax.runtime import workdir as workdir_lib
from mae_jax.stages import classify  # pylint: disable=unused-import (registers probe, finetune)
from mae_jax.stages import data as data_stage  # pylint: disable=unused-import (registers data)
from mae_jax.stages import registry
from mae_jax.stages import report
from mae_jax.stages import runs as runs_lib
from mae_jax.stages import study_tables as tables_lib
from mae_jax.stages import validate
from mae_jax.train import loop

RADIAL = tables_lib.RADIAL
SNR_FILE = "substructure_snr.json"   # per variant folder: the measured SNR, kept
STAGES, STARTS = ("finetune", "probe"), ("mae", "scratch")


@dataclasses.dataclass(frozen=True)
class Arm:
  """One arm of the config's `arm_table`."""
  name: str
  stage: str                                   # 'finetune' or 'probe'
  start: str                                   # 'mae' (the variant's pretraining) or 'scratch'
  lrs: tuple[float, ...] = ()                  # scratch: every param at one of these rates
  ceiling: bool = False                        # every label, once per seed
  options: dict[str, str] = dataclasses.field(default_factory=dict)   # config argument
  overrides: dict[str, Any] = dataclasses.field(default_factory=dict)  # stage keys


def arm_table(config: ml_collections.ConfigDict) -> dict[str, Arm]:
  """The arms the config's `arm_table` states."""
  out = {}
  for name, spec in config.arm_table.items():
    spec = dict(spec)
    own = {k: spec.pop(k) for k in ("stage", "start", "lrs", "ceiling", "arch") if k in spec}
    out[name] = Arm(name, own.get("stage", ""), own.get("start", ""),
                    tuple(own.get("lrs", ())), bool(own.get("ceiling", False)),
                    {"arch": own["arch"]} if "arch" in own else {}, spec)
  return out


def arm_problems(config: ml_collections.ConfigDict) -> list[str]:
  """Problems of the `arm_table` and of `arms` / `variant_arms` naming arms it lacks."""
  table = arm_table(config)
  found = []
  for arm in table.values():
    if arm.stage not in STAGES or arm.start not in STARTS:
      found.append(f"arm_table.{arm.name}: stage must be one of {', '.join(STAGES)} and start "
                   f"one of {', '.join(STARTS)}, got {arm.stage!r} and {arm.start!r}")
    elif (arm.start == "scratch") != bool(arm.lrs) or (arm.ceiling and arm.start != "scratch"):
      found.append(f"arm_table.{arm.name}: a scratch arm (and only it) has `lrs`; a ceiling "
                   "starts from scratch")
  known = (*table, RADIAL)
  named = dict.fromkeys((*config.arms, *(a for v in config.variant_arms.values() for a in v)))
  found += [f"unknown arm {a!r}; choose among {', '.join(known)}" for a in named
            if a not in known]
  return found


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
  rate one of the scratch arm's): that run is the scratch ViT on every label."""
  table = arm_table(config)
  same = ("supervised" in table and "scratch_finetune" in table
          and budget_steps(config, "finetune", 0) == config.supervised_steps
          and set(table["supervised"].lrs) <= set(table["scratch_finetune"].lrs))
  if labels <= 0 and "supervised" in arms and same:
    return tuple(a for a in arms if a != "scratch_finetune")
  return arms


def radial_beside_supervised(config: ml_collections.ConfigDict, arms: tuple[str, ...],
                             ladder: tuple[int, ...]) -> bool:
  """Whether the radial baseline on every label is read from the ceiling arms' runs:
  where the ladder's `all` budget runs no arm that carries it (every run does)."""
  table = arm_table(config)
  carriers = {a for a in budget_arms(config, arms, 0) if a in table and not table[a].ceiling}
  return 0 not in ladder or not carriers


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


def _set(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
  *parents, leaf = key.split(".")
  node = config
  for p in parents:
    node = node[p]
  node[leaf] = value


def _stage(sub: ml_collections.ConfigDict, name: str, config: ml_collections.ConfigDict,
           data: ml_collections.ConfigDict, **overrides) -> ml_collections.ConfigDict:
  """A stage's full config: its keys `sub`, the study's preset and the run's data, a
  source the run sets itself (none unless an override names one), and `overrides`."""
  stage = sub.copy_and_resolve_references()
  stage.unlock()
  stage.stage = name
  stage.preset = config.preset
  stage.data = data.copy_and_resolve_references()
  stock = validate.reference_config(name, config.preset, validate.options_of(stage))
  if stock is not None and "init_from" in stock:   # a ViT classifier (not the CNN)
    stage.init_from, stage.init_from_stage = "", "pretrain"
  for key, value in overrides.items():
    _set(stage, key, value)
  stage.lock()
  return stage


def _stage_keys(config: ml_collections.ConfigDict, arm: Arm) -> ml_collections.ConfigDict:
  """The stage keys of an arm's runs: the study's `finetune` / `probe`; with config-argument
  options (the CNN's `arch=cnn`), the stock config of those options with every key it
  shares with the study's taken from there (an override of the study's applies to both)."""
  if not arm.options:
    return config[arm.stage]
  stock = validate.reference_config(arm.stage, config.preset, arm.options)
  ours = validate.flat_keys(config[arm.stage])
  chosen = validate.option_keys(arm.stage)   # what the options set stays theirs
  for key, value in validate.flat_keys(stock).items():
    if key in ours and ours[key] != value and key not in chosen:
      _set(stock, key, ours[key])
  return stock


@dataclasses.dataclass
class _Variant:
  """What every run of one variant shares."""
  config: ml_collections.ConfigDict
  name: str
  data: ml_collections.ConfigDict      # the variant's data settings
  folder: Path                         # WORKDIR/<variant>
  train_size: int
  pass_: claims.Pass
  mae_ready: bool = True               # the pretraining is complete

  @property
  def pretrain_dir(self) -> Path:
    return self.folder / "pretrain"

  def schedule_of(self, stage: str, labels: int, steps: int | None = None) -> dict[str, Any]:
    config = self.config
    steps = budget_steps(config, stage, labels) if steps is None else steps
    return _budget_schedule(config[stage], labels, self.train_size, jax.device_count(), steps,
                            config.evaluations)


def _ensure(name: str, config: ml_collections.ConfigDict,
            stage_dir: Path) -> results.EvalRecord | None:
  """Runs stage `name` in `stage_dir` unless complete (a run another worker holds raises
  `claims.Deferred`); returns its results record (None for a stage that writes none)."""
  record = runs_lib.read_record(stage_dir)
  why = runs_lib.incomplete_reason(name, stage_dir, config, record)
  if why is None:
    logging.info("study: %s complete, skipped", stage_dir)
  else:
    logging.info("study: %s: %s; running it", stage_dir, why)
    claims.claimed(lambda: runs_lib.run_stage(name, registry.get(name), config, stage_dir,
                                              record), f"study: {stage_dir}")
  return results.read(stage_dir, name) if results.exists(stage_dir) else None


def _arm_run(v: _Variant, arm: Arm, labels: int, seed: int, lr: float | None,
             run_dir: Path, schedule: dict[str, Any]) -> tuple[results.EvalRecord, Path]:
  """One run of an arm: from the variant's MAE, or from scratch with every param at `lr`."""
  sub = _stage_keys(v.config, arm)
  overrides = {**schedule, "labels_per_class": labels, "seed": seed, **arm.overrides}
  if arm.start == "mae":
    overrides["init_from"] = str(v.pretrain_dir)
  else:
    overrides["optim.lr_groups"] = ((".*", lr),)
    if "layer_decay" in sub.optim:
      overrides["optim.layer_decay"] = 1.0
  config = _stage(sub, arm.stage, v.config, v.data, **overrides)
  return _ensure(arm.stage, config, run_dir), run_dir


def _val_auc(record: results.EvalRecord | None) -> float:
  value = (record.validation if record else {}).get("macro_auc")
  return -1.0 if value is None else value


def _scratch_run(v: _Variant, arm: Arm, labels: int, seed: int, chosen: dict[str, float],
                 folder: Path, schedule: dict[str, Any]) -> tuple[results.EvalRecord, Path]:
  """A scratch arm's run of one seed: with the arm's first seed, one run per rate in
  `lrs` and the rate validation chooses (kept in `chosen`); later seeds at that rate."""
  if len(arm.lrs) == 1:
    chosen[arm.name] = arm.lrs[0]
  lrs = (chosen[arm.name],) if arm.name in chosen else arm.lrs
  tried = {lr: _arm_run(v, arm, labels, seed, lr,
                        folder / (f"seed{seed}" if arm.ceiling else f"seed{seed}_lr{lr:g}"),
                        schedule) for lr in lrs}
  if len(tried) > 1:
    chosen[arm.name] = max(tried, key=lambda lr: _val_auc(tried[lr][0]))
    logging.info("study: %s, %s, %s: lr %g chosen on validation (%s)", v.name,
                 budget_name(labels), arm.name, chosen[arm.name],
                 ", ".join(f"{lr:g}: {_val_auc(m):.4f}" for lr, (m, _) in tried.items()))
  return tried[chosen[arm.name]]


def _one(v: _Variant, arm: Arm, labels: int, seed: int, chosen: dict[str, float],
         folder: Path, schedule: dict[str, Any]) -> tuple[results.EvalRecord, Path] | None:
  """An arm's run of one seed, or None where it waits for a run another worker holds."""
  if arm.start == "mae":
    if not v.mae_ready:
      return v.pass_.wait_for(f"{folder / f'seed{seed}'} (needs the MAE)")[1]
    ok, out = v.pass_.attempt(_arm_run, v, arm, labels, seed, None, folder / f"seed{seed}",
                              schedule)
  else:
    if len(arm.lrs) > 1 and arm.name not in chosen and seed != v.config.seeds[0]:
      return v.pass_.wait_for(f"{folder} seed {seed} (needs the rate chosen with the first "
                              "seed)")[1]
    ok, out = v.pass_.attempt(_scratch_run, v, arm, labels, seed, chosen, folder, schedule)
  return out if ok else None


def _rows(v: _Variant, arms: list[Arm], labels: int, folder: Path, radial: bool,
          schedules: dict[str, dict[str, Any]]) -> list[dict]:
  """The rows of `arms` at one label budget, every seed: each run's, and the radial
  baseline of the seed's first run where `radial`."""
  rows, chosen = [], {}
  for seed in v.config.seeds:
    done = {}
    for arm in arms:
      out = _one(v, arm, labels, seed, chosen, folder / arm.name, schedules[arm.stage])
      if out is not None:
        done[arm.name] = out
        extra = ({"lr": chosen[arm.name]} if arm.start == "scratch" else
                 {"features": out[0].features} if arm.stage == "probe" else {})
        rows.append(tables_lib.row(v.name, labels, seed, arm.name, *out, **extra))
    if radial and done:   # fitted on the same labelled images
      rows.append(tables_lib.radial_row(v.name, labels, seed, *next(iter(done.values()))))
  return rows


def _variant_rows(v: _Variant) -> list[dict]:
  """Every row of one variant: each budget's arms, then the ceilings."""
  config, table = v.config, arm_table(v.config)
  names = tuple(config.variant_arms.get(v.name) or config.arms)
  ladder = tuple(config.variant_labels_per_class.get(v.name) or config.labels_per_class)
  rows = []
  for labels in ladder:
    arms = [table[a] for a in budget_arms(config, names, labels)
            if a in table and not table[a].ceiling]
    schedules = {s: v.schedule_of(s, labels) for s in STAGES}
    rows += _rows(v, arms, labels, v.folder / budget_name(labels), RADIAL in names, schedules)
  ceilings = [table[a] for a in names if a in table and table[a].ceiling]
  schedule = v.schedule_of("finetune", 0, config.supervised_steps)
  rows += _rows(v, ceilings, 0, v.folder / "supervised",
                RADIAL in names and radial_beside_supervised(config, names, ladder),
                {"finetune": schedule, "probe": schedule})
  return rows


def _ensure_data(config: ml_collections.ConfigDict, data: ml_collections.ConfigDict,
                 stage_dir: Path) -> dict:
  stage = _stage(config.data_stage, "data", config, data)
  record = runs_lib.read_record(stage_dir)
  if runs_lib.incomplete_reason("data", stage_dir, stage, record) is not None:
    claims.claimed(lambda: runs_lib.run_stage("data", registry.get("data"), stage, stage_dir,
                                              record), f"study: {stage_dir}")
  return json.loads((stage_dir / workdir_lib.DATA_SUMMARY).read_text())


def _run_variant(config: ml_collections.ConfigDict, name: str, folder: Path,
                 pass_: claims.Pass) -> tuple[list[dict], dict[str, Any]]:
  """Every run of one variant: its data, its MAE, its arms. Returns its rows and its
  ceilings (substructure SNR); runs another worker holds (and those that need them)
  are left to a later pass."""
  data = config.data.copy_and_resolve_references()
  data.sim.variant = name
  data.dir = config.data_dirs[name]
  ready, summary = pass_.attempt(_ensure_data, config, data, folder / "data")
  if not ready:
    return [], {}
  v = _Variant(config, name, data, folder, sum(summary["counts"]["train"].values()), pass_)
  table = arm_table(config)
  names = tuple(config.variant_arms.get(name) or config.arms)
  if any(a in table and table[a].start == "mae" for a in names):
    v.mae_ready, _ = pass_.attempt(_ensure, "pretrain",
                                   _stage(config.pretrain, "pretrain", config, data),
                                   v.pretrain_dir)
  return _variant_rows(v), {"snr": _snr(data, config.snr_images, folder / SNR_FILE)}


def _all_runs(config: ml_collections.ConfigDict, workdir: Path
              ) -> tuple[list[dict], dict[str, Any]]:
  """Every run of every variant, pass after pass until none is left to another worker
  (`claims.until_done`). Returns the rows and ceilings of the complete pass."""

  def one_pass(pass_: claims.Pass) -> tuple[list[dict], dict[str, Any]]:
    rows, ceilings = [], {}
    for variant in config.variants:
      variant_rows, ceilings[variant] = _run_variant(config, variant, workdir / variant, pass_)
      rows += variant_rows
    return rows, ceilings

  return claims.until_done(one_pass, config.poll_seconds)


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


def _warn_unused_budget_steps(config: ml_collections.ConfigDict) -> None:
  """A `<stage>_budget_steps` entry for a budget no variant's ladder has (a ladder
  overridden on the command line) does nothing: say so, rather than refuse the run."""
  ladders = {max(n, 0) for v in config.variants
             for n in (config.variant_labels_per_class.get(v) or config.labels_per_class)}
  for stage in STAGES:
    unused = [labels for labels, _ in config[f"{stage}_budget_steps"] if labels not in ladders]
    if unused:
      logging.warning("study: %s_budget_steps names budgets no ladder runs (%s); they are "
                      "not used", stage, ", ".join(budget_name(n) for n in unused))


def _check(config: ml_collections.ConfigDict, workdir: Path) -> None:
  """The study's own keys, then every stage's, before anything runs."""
  validate.check_study(config, arm_problems(config))
  _warn_unused_budget_steps(config)
  first = config.data.copy_and_resolve_references()
  first.dir = config.data_dirs[config.variants[0]]
  validate.check_chain({name: _stage(sub, name, config, first) for name, sub in (
      ("data", config.data_stage), ("pretrain", config.pretrain), ("probe", config.probe),
      ("finetune", config.finetune))}, workdir / config.variants[0])


@registry.register("study")
def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) every run of the study; writes its tables, figure and report."""
  workdir = Path(workdir)
  start = time.time()
  _check(config, workdir)
  rows, ceilings = _all_runs(config, workdir)
  summary = tables_lib.summarise(rows)
  goal_rows = tables_lib.config_goals(summary, config)
  seconds = time.time() - start
  if loop.is_main_process():
    tables_lib.write(workdir, config, rows, summary, ceilings, goal_rows, seconds)
  logging.info("study done in %s: %s", report.duration(seconds),
               workdir / tables_lib.TABLE_FILE)
  return {"rows": len(rows), "table": str(workdir / tables_lib.TABLE_FILE)}
