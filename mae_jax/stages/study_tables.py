"""The study's rows, tables, goals and figure, made from the runs' typed results records.

A row is one run's test macro AUC (with its interval), or the radial baseline that run
fitted on the same labelled images; `summarise` averages rows over seeds, `goals` checks
the study's goals on the summary, `tables` renders them as report blocks and `write`
writes study.json, study.md, the figure and the report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from mae_jax.eval import plots
from mae_jax.eval import results
from mae_jax.runtime import fileio
from mae_jax.stages import report

RADIAL = "radial"
ARM_TITLES = {"mae_finetune": "MAE fine-tune", "mae_partial": "MAE partial fine-tune",
              "scratch_finetune": "scratch fine-tune",
              "mae_probe": "MAE probe", RADIAL: "radial-profile baseline",
              "supervised": "supervised ViT (all labels)",
              "supervised_cnn": "supervised CNN (all labels)"}
# Rows are ordered by arm in this order (arms of another table after these).
ARM_ORDER = tuple(ARM_TITLES)
# The ceiling arms of the stock table (a network from scratch on every label).
CEILINGS = ("supervised", "supervised_cnn")
RESULTS_FILE, TABLE_FILE, FIGURE_FILE = "study.json", "study.md", "label_efficiency.png"


def _order(arm: str) -> tuple[int, str]:
  return (ARM_ORDER.index(arm) if arm in ARM_ORDER else len(ARM_ORDER), arm)


def _title(arm: str) -> str:
  return ARM_TITLES.get(arm, arm)


def row(variant: str, labels: int, seed: int, arm: str, record: results.EvalRecord, run: Path,
        **extra) -> dict[str, Any]:
  """A study row of a probe's or fine-tune's record (test numbers of the chosen epoch)."""
  return _scores_row(variant, labels, seed, arm, record.test, run,
                     validation_macro_auc=record.validation.get("macro_auc"),
                     epoch=record.chosen.epoch, train_examples=record.train_examples, **extra)


def radial_row(variant: str, labels: int, seed: int, record: results.EvalRecord,
               run: Path) -> dict[str, Any]:
  """A study row of the radial baseline a run fitted on its labelled images."""
  base = record.baseline
  return _scores_row(variant, labels, seed, RADIAL, base.scores, run,
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
      kv[0][0], _order(kv[0][1]), kv[0][2] <= 0, kv[0][2])):
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
    if variant in margins[goal] and get(RADIAL) is not None:
      margin = margins[goal][variant]
      found.append(_goal(mean, goal, variant, labels, arm, get(RADIAL) + sign * margin, margin))
  ceiling = [a for a in CEILINGS if get(a, 0) is not None]
  if variant in margins["ceiling_at_least"] and ceiling:
    margin = margins["ceiling_at_least"][variant]
    found.append(_goal(mean, "ceiling_at_least", variant, 0,
                       max(ceiling, key=lambda a: get(a, 0)), margin, margin))
  if variant in margins["radial_at_most"]:
    margin = margins["radial_at_most"][variant]
    found.append(_goal(mean, "radial_at_most", variant, 0, RADIAL, margin, margin,
                       at_most=True))
  return [g for g in found if g is not None]


def _f3(value: float | None) -> str:
  return "" if value is None else f"{value:.3f}"


def _summary_blocks(summary: list[dict]) -> list[tuple]:
  """The label-efficiency table: per variant, arm and budget, the mean over seeds."""
  rows = []
  for s in summary:
    ci = s["mean_interval"]
    rows.append([s["variant"], _title(s["arm"]),
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
    crow.append([variant, cell("cdm"), cell("axion"), *(auc(a) for a in CEILINGS),
                 auc(RADIAL)])
  if not crow:
    return []
  return [("p", "Ceilings: how far above the noise the substructure lies (median "
                "[10th, 90th percentile] of its noise-weighted signal, the SNR a matched "
                "filter with the true smooth lens reaches), and what a network trained on "
                "every label reaches (test macro AUC, mean over seeds)."),
          ("table", ["variant", "cdm substructure SNR", "axion substructure SNR",
                     *(_title(a) for a in CEILINGS), "radial baseline (all labels)"],
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
             GOAL_TEXT[g["goal"]].format(margin=g["margin"]), _title(g["arm"]),
             f"{g['value']:.3f}", f"{g['target']:.3f}",
             f"{g['gap']:+.3f} {'(met)' if g['gap'] >= 0 else '(missed)'}"]
            for g in goal_rows])]


def tables(summary: list[dict], ceilings: dict[str, dict], goal_rows: list[dict]
           ) -> list[tuple]:
  """The study's tables as report blocks (`report.to_markdown` / `to_html` render them):
  the label-efficiency table, the ceilings per variant, the goals."""
  return (_summary_blocks(summary) + _ceiling_blocks(summary, ceilings)
          + _goal_blocks(goal_rows))


def write(workdir: Path, config: ml_collections.ConfigDict, rows: list[dict], summary: list[dict],
          ceilings: dict[str, Any], goal_rows: list[dict], seconds: float) -> None:
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
