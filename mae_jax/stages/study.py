"""The `study` stage: does the pretraining pay off? A label-efficiency study.

  python main.py --config=configs/study.py:demo --workdir=runs/study_demo

For each simulator variant: prepare the data, pretrain one MAE on the unlabelled
pool, then for each label budget (images per class from the train split) and each
seed, run the arms:

- `mae_finetune`: the fine-tune stage from the MAE;
- `scratch_finetune`: the same fine-tune from a random encoder, at its own learning
  rate, chosen on validation from `scratch_lrs` (with the first seed of each budget;
  the other seeds reuse it);
- `mae_probe`: the probe stage on the MAE's frozen features, block and pooling
  chosen on validation;
- `radial`: the radial-profile logistic regression, fitted on the same labelled
  images (read from the fine-tune's `eval_metrics.json`).

Every run is an ordinary stage in its own sub-workdir
(`WORKDIR/<variant>/<budget>/<arm>/...`), skipped when complete and resumed when
not, so the command can be stopped and run again. Every number comes from a run's
`eval_metrics.json` (test split, epoch chosen on validation, bootstrap interval);
the study writes `study.json`, `study.md`, `report.md` / `report.html` and
`label_efficiency.png`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from mae_jax.data import layout
from mae_jax.eval import plots
from mae_jax.runtime import fileio
from mae_jax.stages import classify
from mae_jax.stages import pipeline
from mae_jax.stages import registry
from mae_jax.stages import report
from mae_jax.stages import validate
from mae_jax.train import loop

ARMS = ("mae_finetune", "scratch_finetune", "mae_probe", "radial")
ARM_TITLES = {"mae_finetune": "MAE fine-tune", "scratch_finetune": "scratch fine-tune",
              "mae_probe": "MAE probe", "radial": "radial-profile baseline"}
RESULTS_FILE, TABLE_FILE, FIGURE_FILE = "study.json", "study.md", "label_efficiency.png"


def budget_name(labels_per_class: int) -> str:
  return "all" if labels_per_class <= 0 else f"{labels_per_class}_per_class"


def _stage(sub: ml_collections.ConfigDict, name: str, config: ml_collections.ConfigDict,
           data: ml_collections.ConfigDict, **overrides) -> ml_collections.ConfigDict:
  stage = sub.copy_and_resolve_references()
  stage.unlock()
  stage.stage = name
  stage.preset = config.preset
  stage.data = data.copy_and_resolve_references()
  if name in ("probe", "finetune"):
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


def _ensure(name: str, config: ml_collections.ConfigDict, stage_dir: Path) -> dict | None:
  """Runs stage `name` in `stage_dir` unless complete; returns its eval_metrics.json."""
  record = report.read_record(stage_dir)
  why = pipeline.incomplete_reason(name, stage_dir, config, record)
  if why is None:
    logging.info("study: %s complete, skipped", stage_dir)
  else:
    logging.info("study: %s: %s; running it", stage_dir, why)
    pipeline.run_stage(name, registry.get(name), config, stage_dir, record)
  path = stage_dir / classify.EVAL_FILE
  return fileio.read_json(path) if path.exists() else None


def _val_auc(metrics: dict | None) -> float:
  value = ((metrics or {}).get("validation") or {}).get("macro_auc")
  return -1.0 if value is None else value


def _row(variant: str, labels: int, seed: int, arm: str, metrics: dict, run: Path,
         **extra) -> dict[str, Any]:
  ci = (metrics.get("intervals") or {}).get("macro_auc")
  return {"variant": variant, "labels_per_class": labels, "seed": seed, "arm": arm,
          "test_macro_auc": metrics.get("macro_auc"), "test_macro_auc_interval": ci,
          "test_accuracy": metrics.get("accuracy"),
          "validation_macro_auc": (metrics.get("validation") or {}).get(
              "macro_auc", metrics.get("validation_macro_auc")),   # the baseline keeps it flat
          "epoch": metrics.get("epoch"), "train_examples": metrics.get("num_train",
                                                                       metrics.get("train_examples")),
          "run": str(run), **extra}


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


def goals(summary: list[dict], over_scratch: float, over_radial: dict[str, float],
          max_labels: int) -> list[dict[str, Any]]:
  """The study's goals, per variant and budget up to `max_labels` per class, each with
  the arm's mean test macro AUC (`value`), the AUC it had to reach (`target`) and the
  difference (`gap`, negative: missed by that much):
  - `mae_over_scratch`: the MAE fine-tune above the scratch fine-tune by `over_scratch`;
  - `best_over_radial` (variants in `over_radial`): the best deep arm above the
    radial-profile baseline by that variant's margin."""
  mean = {(s["variant"], s["arm"], s["labels_per_class"]): s["mean_test_macro_auc"]
          for s in summary if s["mean_test_macro_auc"] is not None}
  out = []
  for variant, labels in dict.fromkeys((v, n) for v, _, n in mean if 0 < n <= max_labels):
    get = lambda arm: mean.get((variant, arm, labels))  # pylint: disable=cell-var-from-loop
    if get("mae_finetune") is not None and get("scratch_finetune") is not None:
      out.append({"goal": "mae_over_scratch", "variant": variant, "labels_per_class": labels,
                  "arm": "mae_finetune", "value": get("mae_finetune"),
                  "target": get("scratch_finetune") + over_scratch})
    deep = {a: get(a) for a in ARMS if a != "radial" and get(a) is not None}
    if variant in over_radial and deep and get("radial") is not None:
      best = max(deep, key=deep.get)
      out.append({"goal": "best_over_radial", "variant": variant, "labels_per_class": labels,
                  "arm": best, "value": deep[best], "target": get("radial") + over_radial[variant]})
  for g in out:
    g["gap"] = g["value"] - g["target"]
  return out


def _markdown(summary: list[dict], config: ml_collections.ConfigDict, seconds: float,
              goal_rows: list[dict]) -> str:
  lines = [f"# Label-efficiency study ({config.preset})", "",
           "Test macro AUC (the test split chose nothing: epochs and learning rates were "
           "chosen on validation), mean over seeds, with the lowest and highest seed and the "
           "mean of the seeds' bootstrap 95% intervals.", "",
           "| variant | arm | labels per class | seeds | mean test macro AUC | min – max | "
           "mean 95% interval |", "|---|---|---|---|---|---|---|"]
  for s in summary:
    f = lambda v: "" if v is None else f"{v:.3f}"  # pylint: disable=unnecessary-lambda-assignment
    ci = s["mean_interval"]
    lines.append(f"| {s['variant']} | {ARM_TITLES[s['arm']]} | "
                 f"{'all' if s['labels_per_class'] <= 0 else s['labels_per_class']} | "
                 f"{s['seeds']} | {f(s['mean_test_macro_auc'])} | {f(s['min'])} – {f(s['max'])} | "
                 + (f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "") + " |")
  if goal_rows:
    lines += ["", "Goals (test macro AUC; a negative gap is the amount by which a goal was missed):",
              "", "| variant | labels per class | goal | arm | mean test macro AUC | target | gap |",
              "|---|---|---|---|---|---|---|"]
    what = {"mae_over_scratch": f"MAE fine-tune ≥ scratch + {config.goal_over_scratch}",
            "best_over_radial": "best arm ≥ radial + {}"}
    for g in goal_rows:
      text = what[g["goal"]].format(config.goal_over_radial.get(g["variant"]))
      lines.append(f"| {g['variant']} | {g['labels_per_class']} | {text} | "
                   f"{ARM_TITLES[g['arm']]} | {g['value']:.3f} | {g['target']:.3f} | "
                   f"{g['gap']:+.3f} {'(met)' if g['gap'] >= 0 else '(missed)'} |")
  lines += ["", f"Wall time: {report.duration(seconds)} (every invocation in this workdir; this "
            "one skips finished runs).", ""]
  return "\n".join(lines)


@registry.register("study")
def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) every run of the study; writes its table, figure and report."""
  workdir = Path(workdir)
  start = time.time()
  unknown = [a for a in config.arms if a not in ARMS]
  if unknown:
    raise ValueError(f"unknown arm(s) {unknown}; choose among {', '.join(ARMS)}")
  rows = []
  first = config.data.copy_and_resolve_references()
  first.dir = config.data_dirs[config.variants[0]]
  validate.check_chain({name: _stage(sub, name, config, first) for name, sub in (
      ("data", config.data_stage), ("pretrain", config.pretrain), ("probe", config.probe),
      ("finetune", config.finetune))}, workdir / config.variants[0])
  for variant in config.variants:
    vdir = workdir / variant
    data = config.data.copy_and_resolve_references()
    data.sim.variant = variant
    data.dir = config.data_dirs[variant]
    summary = _ensure_data(config, data, vdir / "data")
    train_size = sum(summary["counts"]["train"].values())
    pre_dir = vdir / "pretrain"
    pretrain_config = _stage(config.pretrain, "pretrain", config, data)
    needs_mae = any(a in config.arms for a in ("mae_finetune", "mae_probe"))
    if needs_mae:
      _ensure("pretrain", pretrain_config, pre_dir)
    for labels in config.labels_per_class:
      bdir = vdir / budget_name(labels)
      schedule = _budget_schedule(config.finetune, labels, train_size, jax.device_count(),
                                  config.finetune_steps, config.evaluations)
      probe_schedule = _budget_schedule(config.probe, labels, train_size, jax.device_count(),
                                        config.probe_steps, config.evaluations)
      scratch_lr = None
      for seed in config.seeds:
        common = dict(labels_per_class=labels, seed=seed)
        fine = fine_dir = None
        if "mae_finetune" in config.arms:
          run_dir = bdir / "mae_finetune" / f"seed{seed}"
          fine = _ensure("finetune", _stage(config.finetune, "finetune", config, data,
                                            init_from=str(pre_dir), **common, **schedule),
                         run_dir)
          rows.append(_row(variant, labels, seed, "mae_finetune", fine, run_dir))
          fine_dir = run_dir
        if "scratch_finetune" in config.arms:
          if scratch_lr is None:   # chosen on validation with the first seed
            tried = {}
            for lr in config.scratch_lrs:
              run_dir = bdir / "scratch_finetune" / f"seed{seed}_lr{lr:g}"
              tried[lr] = (_ensure("finetune", _stage(
                  config.finetune, "finetune", config, data, init_from="",
                  **{"optim.lr_groups": ((".*", lr),), "optim.layer_decay": 1.0},
                  **common, **schedule), run_dir), run_dir)
            scratch_lr = max(tried, key=lambda lr: _val_auc(tried[lr][0]))
            logging.info("study: %s, %s: scratch lr %g chosen on validation (%s)", variant,
                         budget_name(labels), scratch_lr,
                         ", ".join(f"{lr:g}: {_val_auc(m):.4f}" for lr, (m, _) in tried.items()))
            metrics, run_dir = tried[scratch_lr]
          else:
            run_dir = bdir / "scratch_finetune" / f"seed{seed}_lr{scratch_lr:g}"
            metrics = _ensure("finetune", _stage(
                config.finetune, "finetune", config, data, init_from="",
                **{"optim.lr_groups": ((".*", scratch_lr),), "optim.layer_decay": 1.0},
                **common, **schedule), run_dir)
          rows.append(_row(variant, labels, seed, "scratch_finetune", metrics, run_dir,
                           lr=scratch_lr))
          fine, fine_dir = (fine, fine_dir) if fine else (metrics, run_dir)
        if "mae_probe" in config.arms:
          run_dir = bdir / "mae_probe" / f"seed{seed}"
          probe = _ensure("probe", _stage(config.probe, "probe", config, data,
                                          init_from=str(pre_dir), **common, **probe_schedule),
                          run_dir)
          rows.append(_row(variant, labels, seed, "mae_probe", probe, run_dir,
                           features=probe.get("features")))
          fine, fine_dir = (fine, fine_dir) if fine else (probe, run_dir)
        if "radial" in config.arms and fine is not None:   # fitted on the same labelled images
          rows.append(_row(variant, labels, seed, "radial", fine["baseline"], fine_dir))
  summary = summarise(rows)
  goal_rows = goals(summary, config.goal_over_scratch, config.goal_over_radial.to_dict(),
                    config.goal_max_labels)
  seconds = time.time() - start
  if loop.is_main_process():
    before = workdir / RESULTS_FILE
    old = fileio.read_json(before) if before.exists() else {}
    earlier = old.get("seconds_all_runs", old.get("seconds_this_run", 0.0))
    total = earlier + seconds
    fileio.write_json_atomic(workdir / RESULTS_FILE, {
        "rows": rows, "summary": summary, "goals": goal_rows,
        "seconds_this_run": round(seconds, 1), "seconds_all_runs": round(total, 1)})
    table = _markdown(summary, config, total, goal_rows)
    fileio.write_atomic(workdir / TABLE_FILE, lambda f: f.write(table.encode()))
    plots.label_efficiency(summary, workdir / FIGURE_FILE,
                           title=f"Label efficiency ({config.preset}): test macro AUC",
                           goals=goal_rows)
    report.write_study(workdir, config, table, FIGURE_FILE)
  logging.info("study done in %s: %s", report.duration(seconds), workdir / TABLE_FILE)
  return {"rows": len(rows), "table": str(workdir / TABLE_FILE)}


def _ensure_data(config, data, stage_dir: Path) -> dict:
  stage = _stage(config.data_stage, "data", config, data)
  record = report.read_record(stage_dir)
  if pipeline.incomplete_reason("data", stage_dir, stage, record) is not None:
    pipeline.run_stage("data", registry.get("data"), stage, stage_dir, record)
  return json.loads((stage_dir / "data_summary.json").read_text())
