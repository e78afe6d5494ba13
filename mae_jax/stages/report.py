"""The pipeline's report, written from what its stages left in their workdirs.

`report.md` (figures linked), `report.html` (figures embedded as base64 PNG, so it
opens offline, alone), `report.json` (the numbers) and `figures.png` (a grid of
the main figures). Contents: the metrics of the probe and the fine-tune beside the
seed study's published ones (and a baseline's, when `eval_metrics.json` holds
one), every figure, the wall time and hardware of each stage, and the recipe as run.
Nothing is recomputed: every number is read from a stage's own files.
"""

from __future__ import annotations

import base64
import datetime
import html
import json
import os
import sys
from pathlib import Path
from typing import Any

import ml_collections
from flax import traverse_util

from mae_jax.data import layout
from mae_jax.eval import evaluators
from mae_jax.eval import plots
from mae_jax.eval import results
from mae_jax.runtime import fileio
from mae_jax.runtime import workdir as workdir_lib
from mae_jax.stages import runs as runs_lib

REPORT_MD, REPORT_HTML, REPORT_JSON, FIGURE_GRID, FIGURES_JSON = (
    "report.md", "report.html", "report.json", "figures.png", "figures.json")

# The seed study's published results (real DeepLense Model II data; docs/design.md).
SEED_PUBLISHED = {
    "probe": {"micro_auc": 0.58},
    "finetune": {"micro_auc": 0.97, "auc": {"no_sub": 1.00, "cdm": 0.94, "axion": 0.96},
                 "accuracy": 0.87},
}
# The stages whose output is a results record (eval_metrics.json).
RECORD_STAGES = ("probe", "finetune")
STAGE_TITLES = {"data": "data", "pretrain": "MAE pretraining", "probe": "linear probe",
                "finetune": "fine-tune"}
# Known figures in report order: (stage, file under the stage's workdir, caption).
FIGURES = (
    ("data", "plots/samples.png", "Samples of the data (min-max normalised)"),
    ("pretrain", "plots/loss_curve.png", "MAE pretraining: loss per epoch"),
    ("pretrain", "plots/reconstructions.png", "MAE reconstructions of validation images"),
    ("pretrain", "plots/online_probe.png",
     "MAE pretraining: a few-shot probe of the frozen features on validation, per epoch"),
    ("probe", "plots/roc.png", "Linear probe: ROC curves on the test split (epoch chosen on validation)"),
    ("probe", "plots/confusion.png", "Linear probe: confusion matrix"),
    ("probe", "plots/loss_curve.png", "Linear probe: loss per epoch"),
    ("finetune", "plots/roc.png", "Fine-tune: ROC curves on the test split (epoch chosen on validation)"),
    ("finetune", "plots/confusion.png", "Fine-tune: confusion matrix"),
    ("finetune", "plots/loss_curve.png", "Fine-tune: loss per epoch"),
)
# The figures of the grid (figures.png), in order.
GRID = (("pretrain", "plots/reconstructions.png"), ("pretrain", "plots/loss_curve.png"),
        ("probe", "plots/roc.png"), ("finetune", "plots/roc.png"),
        ("finetune", "plots/confusion.png"), ("finetune", "plots/loss_curve.png"))


# --- Collecting ----------------------------------------------------------------------


def _read(path: Path) -> Any:
  return fileio.read_json(path) if path.exists() else None


def _stage_entry(name: str, folder: Path, configured: bool, record: dict | None) -> dict:
  """What the report shows of one stage: its status, runs, time, hardware and summary."""
  runs = (record or {}).get("runs", [])
  return {
      "configured": configured,
      "complete": bool(record and record.get("complete")),
      "runs": len(runs),
      "seconds": round(sum(r.get("seconds") or 0.0 for r in runs), 1),
      "hardware": runs[-1].get("hardware") if runs else None,
      "compute_dtype": runs[-1].get("compute_dtype") if runs else None,
      "load_average_1m": ([runs[-1]["hardware"].get("load_average_1m"),
                           runs[-1].get("load_average_1m_end")] if runs else None),
      "step": (record or {}).get("step"),
      "summary": (None if name in RECORD_STAGES else _read(folder / runs_lib.OUTPUT[name])),
  }


def _stale_source_note(workdir: Path, name: str, record: dict | None) -> str | None:
  """A note when the stage `name` started from was trained further since."""
  source = (record or {}).get("source")
  if not (source and source.get("stage")):
    return None
  now = (runs_lib.read_record(workdir / source["stage"]) or {}).get("step")
  if source.get("step") is not None and now is not None and now != source["step"]:
    return (f"{name} was started from {source['stage']} step {source['step']}, but "
            f"{source['stage']} now ends at step {now}: delete {workdir / name} to redo {name} "
            "from it.")
  return None


def collect(workdir: str | os.PathLike[str], config: ml_collections.ConfigDict,
            stages: dict[str, ml_collections.ConfigDict]) -> dict[str, Any]:
  """Everything the report shows, read from the stages' files: the probe's and
  fine-tune's results records under "records" (`json_ready` makes it JSON)."""
  workdir = Path(workdir)
  out: dict[str, Any] = {"workdir": str(workdir), "preset": config.preset,
                         "generated": datetime.datetime.now().isoformat(timespec="seconds"),
                         "command": " ".join(sys.argv), "stages": {}, "records": {},
                         "notes": [], "seed_published": SEED_PUBLISHED}
  for name in runs_lib.STAGES:
    record = runs_lib.read_record(workdir / name)
    if name not in stages and record is None:
      continue
    entry = _stage_entry(name, workdir / name, name in stages, record)
    out["stages"][name] = entry
    if name in RECORD_STAGES and results.exists(workdir / name):
      out["records"][name] = results.read(workdir / name, name)
    note = _stale_source_note(workdir, name, record)
    if note:
      out["notes"].append(note)
    if name in stages and not entry["complete"]:
      out["notes"].append(f"{name} is not complete; rerun the pipeline command to finish it.")
  return out


# --- Blocks: one description, two renderings ---------------------------------------------


def _f(value: Any, digits: int = 4) -> str:
  return "" if value is None else f"{value:.{digits}f}"


def duration(seconds: float | None) -> str:
  """`4 min 22 s`, `38.2 s`, `1 h 05 min`."""
  if seconds is None:
    return ""
  if seconds < 60:
    return f"{seconds:.1f} s"
  minutes, s = divmod(int(round(seconds)), 60)
  if minutes < 60:
    return f"{minutes} min {s:02d} s"
  return f"{minutes // 60} h {minutes % 60:02d} min"


def _with_interval(value: float | None, interval: list | None, digits: int) -> str:
  if value is None:
    return ""
  if not interval:
    return _f(value, digits)
  return f"{value:.{digits}f} [{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]"


# Numbers with their own columns in the results table; any other scalar an evaluator
# yields gets a column after them.
_FIXED = ("micro_auc", "macro_auc", "auc", "accuracy", "confusion_matrix")


def _extra_columns(data: dict) -> list[str]:
  """Scalars the records hold beyond the fixed columns (balanced accuracy, ECE, ...)."""
  found = [k for r in data["records"].values() for k, v in r.test.values.items()
           if k not in _FIXED and not isinstance(v, (dict, list))]
  return list(dict.fromkeys(found))


def _metric_row(label: str, m: dict, ci: dict, extra: list[str], examples: str = "",
                digits: int = 4) -> list[str]:
  auc = m.get("auc") or {}
  f = lambda v: _f(v, digits)  # pylint: disable=unnecessary-lambda-assignment
  return [label, examples, f(m.get("micro_auc")),
          _with_interval(m.get("macro_auc"), ci.get("macro_auc"), digits),
          *(f(auc.get(c)) for c in layout.CLASS_NAMES), f(m.get("accuracy")),
          *(_with_interval(m.get(k), ci.get(k), digits) for k in extra)]


def _scores_row(label: str, scores: results.Scores, extra: list[str]) -> list[str]:
  return _metric_row(label, scores.values, scores.intervals or {}, extra,
                     str(scores.num_examples))


def _baseline(data: dict) -> results.Baseline | None:
  """The radial baseline of the first record that has one (the probe's and fine-tune's
  are fitted on the same labelled images)."""
  return next((r.baseline for r in data["records"].values() if r.baseline), None)


def _metric_table_rows(data: dict, extra: list[str]) -> list[list[str]]:
  """Per model (chosen and last epoch), the seed's published numbers, and the baseline."""
  rows = []
  for stage in ("probe", "finetune"):
    r = data["records"].get(stage)
    title = STAGE_TITLES[stage]
    if r:
      chosen_by = evaluators.scalars(list(evaluators.EVALUATORS)).get(r.select_by, r.select_by)
      rows.append(_scores_row(f"**{title}** (epoch {r.chosen.epoch}, chosen on validation "
                              f"{chosen_by})", r.test, extra))
      if r.final:
        rows.append(_scores_row(f"{title}, last epoch ({r.final.epoch})", r.final.scores, extra))
    rows.append(_metric_row(f"{title}, seed study (published, real data)", SEED_PUBLISHED[stage],
                            {}, extra, digits=2))
  base = _baseline(data)
  if base:
    rows.append(_scores_row("baseline (same labelled images, same test split)", base.scores,
                            extra))
  return rows


def _comparison_line(data: dict, stage: str, r: results.EvalRecord) -> str:
  """A model against the seed's micro AUC and the baseline, and its frozen features."""
  seed = SEED_PUBLISHED[stage]["micro_auc"]
  micro = r.test.get("micro_auc")
  line = (f"{STAGE_TITLES[stage]}: test micro AUC {_f(micro)} against the seed's "
          f"{seed:.2f} ({micro - seed:+.4f})" if micro is not None
          else f"{STAGE_TITLES[stage]}: no micro AUC (a class is missing from the split)")
  margins = [f"{key.replace('_auc', ' AUC')} {v:+.4f}"
             for key, v in (r.margin_over_baseline() or {}).items()
             if v is not None and key.endswith("_auc")]
  if margins:
    line += "; margin over the baseline: " + ", ".join(margins)
  if r.features:
    line += f"; frozen features: {r.features}"
  return line + "."


def _metrics_blocks(data: dict) -> list[tuple]:
  extra = _extra_columns(data)
  titles = evaluators.scalars(list(evaluators.EVALUATORS))
  header = ["model", "test images", "micro AUC", "macro AUC [95% interval]",
            *(f"AUC {c}" for c in layout.CLASS_NAMES), "accuracy",
            *(f"{titles.get(k, k)} [95% interval]" for k in extra)]
  blocks = [("h2", "Results"), ("table", header, _metric_table_rows(data, extra))]
  lines = [_comparison_line(data, stage, data["records"][stage])
           for stage in ("probe", "finetune") if data["records"].get(stage)]
  base = _baseline(data)
  if base and base.description:
    lines.append(f"The baseline: {base.description}.")
  if lines:
    blocks.append(("list", lines))
  blocks.append(("p", "Every model number is on the held-out test split, which chose nothing: "
                      "the epoch is the one with the best validation number named beside it "
                      "(the last epoch's test numbers are below it). Intervals are bootstrap "
                      "95% intervals (1,000 resamples within each class). Numbers are read "
                      "from each stage's eval_metrics.json. The seed study's are those its "
                      "authors published for the real DeepLense Model II data; with simulated "
                      "data they show the target, not a like-for-like score."))
  return blocks


def _stage_rows(data: dict) -> list[list[str]]:
  rows, total = [], 0.0
  for name, s in data["stages"].items():
    hw = s.get("hardware") or {}
    load = s.get("load_average_1m") or [None, None]
    status = "complete" if s["complete"] else ("not run" if not s["runs"] else "incomplete")
    if not s["configured"]:
      status += " (not in this pipeline's stages)"
    rows.append([STAGE_TITLES[name], status, duration(s["seconds"]) if s["runs"] else "",
                 str(s["runs"]), hw.get("devices", ""), s.get("compute_dtype") or "",
                 " → ".join(str(x) for x in load if x is not None)])
    total += s["seconds"] or 0.0
  rows.append(["**total**", "", duration(total), "", "", "", ""])
  return rows


def _summary_lines(data: dict) -> list[str]:
  lines = []
  d = (data["stages"].get("data") or {}).get("summary")
  if d:
    counts = {split: sum(c.values()) for split, c in d.get("counts", {}).items()}
    lines.append(f"data: {d.get('source')} images of {d['image_shape'][0]}×"
                 f"{d['image_shape'][1]} from {d.get('data_dir')}; "
                 + ", ".join(f"{n} {split}" for split, n in counts.items())
                 + f"; {d.get('bad_files', 0)} bad file(s).")
  p = (data["stages"].get("pretrain") or {}).get("summary")
  if p:
    lines.append(f"MAE pretraining: {p.get('epochs')} epochs, {p.get('steps')} steps; final "
                 f"train loss {_f(p.get('final_train_loss'))}, validation loss "
                 f"{_f(p.get('final_val_loss'))}.")
  return lines


def _hardware_lines(data: dict) -> list[str]:
  """One line per distinct machine, naming the stages (their latest runs) it ran."""
  machines: dict[str, list[str]] = {}
  for name, s in data["stages"].items():
    hw = s.get("hardware")
    if hw:
      text = (f"{hw.get('backend')} backend, {hw.get('devices')}; CPU {hw.get('cpu')} "
              f"({hw.get('cpu_cores')} cores), {hw.get('memory_gib')} GiB memory; host "
              f"{hw.get('host')}; Python {hw.get('python')}, JAX {hw.get('jax')}")
      machines.setdefault(text, []).append(STAGE_TITLES[name])
  return [f"hardware ({', '.join(stages)}): {text}" for text, stages in machines.items()]


def _flat_config(config: ml_collections.ConfigDict) -> str:
  flat = traverse_util.flatten_dict(config.copy_and_resolve_references().to_dict(), sep=".")
  return "\n".join(f"{k} = {v!r}" for k, v in flat.items())


def figures(workdir: Path, data: dict) -> list[tuple[str, str]]:
  """(caption, path relative to the workdir) of every figure the stages wrote."""
  found = [(caption, f"{stage}/{rel}") for stage, rel, caption in FIGURES
           if (workdir / stage / rel).exists()]
  known = {p for _, p in found}
  for stage in data["stages"]:
    for png in sorted((workdir / stage / workdir_lib.PLOTS).glob("*.png")):
      rel = f"{stage}/{workdir_lib.PLOTS}/{png.name}"
      if rel not in known:
        found.append((f"{STAGE_TITLES[stage]}: {png.stem.replace('_', ' ')}", rel))
  return found


def blocks(workdir: Path, config: ml_collections.ConfigDict, data: dict) -> list[tuple]:
  """The report as a list of blocks: (kind, ...) with kinds h1, h2, p, list, table,
  figure, pre."""
  out = [("h1", f"mae_jax pipeline report: {config.preset} preset"),
         ("p", f"Workdir {data['workdir']}, written {data['generated']}.")]
  if (workdir / FIGURE_GRID).exists():
    out.append(("figure", "The main figures at a glance", FIGURE_GRID))
  out += _metrics_blocks(data)
  out += [("h2", "Stages, wall time and hardware"),
          ("table", ["stage", "status", "wall time", "runs", "devices", "compute dtype",
                     "CPU load (1-min average, start → end)"], _stage_rows(data)),
          ("p", "Wall time is the sum over the runs of a stage (a resumed stage has several); "
                "the load shows how busy the machine was, which slows a shared CPU."),
          ("list", _summary_lines(data) + _hardware_lines(data))]
  if data["notes"]:
    out += [("h2", "Notes"), ("list", data["notes"])]
  out.append(("h2", "Figures"))
  out += [("figure", caption, rel) for caption, rel in figures(workdir, data)]
  out += [("h2", "Recipe as run"),
          ("p", "The pipeline's config with every override applied. Each stage's full "
                "config as it ran is in its workdir's config.json."),
          ("pre", _flat_config(config))]
  return out


def _md_cell(text: str) -> str:
  return text.replace("|", "\\|")


def to_markdown(report: list[tuple]) -> str:
  """Markdown of `blocks(...)`; figures are linked relative to the workdir."""
  lines = []
  for block in report:
    kind = block[0]
    if kind == "h1":
      lines += [f"# {block[1]}", ""]
    elif kind == "h2":
      lines += [f"## {block[1]}", ""]
    elif kind == "p":
      lines += [block[1], ""]
    elif kind == "list":
      lines += [f"- {item}" for item in block[1]] + [""]
    elif kind == "table":
      header, rows = block[1], block[2]
      lines.append("| " + " | ".join(map(_md_cell, header)) + " |")
      lines.append("|" + "---|" * len(header))
      lines += ["| " + " | ".join(map(_md_cell, row)) + " |" for row in rows]
      lines.append("")
    elif kind == "figure":
      lines += [f"**{block[1]}**", "", f"![{block[1]}]({block[2]})", ""]
    elif kind == "pre":
      lines += ["```", block[1], "```", ""]
  return "\n".join(lines)


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#222}table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;
padding:4px 8px;text-align:right}td:first-child,th:first-child{text-align:left}
th{background:#f3f3f3}figure{margin:1.5em 0}img{max-width:100%}figcaption{font-weight:600}
pre{background:#f6f6f6;padding:1em;overflow-x:auto;font-size:85%}"""


def _inline(text: str) -> str:
  """Escapes text, then renders **bold** (the only inline markup blocks use)."""
  parts = html.escape(text).split("**")
  return "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))


def to_html(report: list[tuple], workdir: Path) -> str:
  """A self-contained HTML page of `blocks(...)`: figures embedded as base64 PNG."""
  body = []
  for block in report:
    kind = block[0]
    if kind in ("h1", "h2", "p"):
      body.append(f"<{kind}>{_inline(block[1])}</{kind}>")
    elif kind == "list":
      body.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in block[1]) + "</ul>")
    elif kind == "table":
      head = "".join(f"<th>{_inline(h)}</th>" for h in block[1])
      rows = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>"
                     for row in block[2])
      body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
    elif kind == "figure":
      png = base64.b64encode((workdir / block[2]).read_bytes()).decode("ascii")
      body.append(f'<figure><figcaption>{_inline(block[1])}</figcaption>'
                  f'<img alt="{html.escape(block[1])}" src="data:image/png;base64,{png}">'
                  "</figure>")
    elif kind == "pre":
      body.append(f"<details><summary>show</summary><pre>{html.escape(block[1])}</pre></details>")
  title = html.escape(report[0][1]) if report and report[0][0] == "h1" else "mae_jax report"
  return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}'
          f"</title><style>{_CSS}</style></head><body>\n" + "\n".join(body)
          + "\n</body></html>\n")


def write(workdir: str | os.PathLike[str], config: ml_collections.ConfigDict,
          stages: dict[str, ml_collections.ConfigDict]) -> dict[str, Path]:
  """Writes report.md, report.html, report.json and figures.png into `workdir`."""
  workdir = Path(workdir)
  data = collect(workdir, config, stages)
  captions = {(stage, rel): caption for stage, rel, caption in FIGURES}
  grid = [(captions[key], workdir / key[0] / key[1]) for key in GRID
          if (workdir / key[0] / key[1]).exists()]
  if grid:
    plots.figure_grid(grid, workdir / FIGURE_GRID,
                      title=f"mae_jax pipeline, {config.preset} preset")
  report = blocks(workdir, config, data)
  paths = {"markdown": workdir / REPORT_MD, "html": workdir / REPORT_HTML,
           "json": workdir / REPORT_JSON, "figures": workdir / FIGURES_JSON}
  write_figure_data(workdir, paths["figures"])
  fileio.write_atomic(paths["markdown"], lambda f: f.write(to_markdown(report).encode()))
  fileio.write_atomic(paths["html"], lambda f: f.write(to_html(report, workdir).encode()))
  fileio.write_json_atomic(paths["json"], json_ready(data))
  return paths


def json_ready(data: dict) -> dict:
  """`collect`'s data as JSON: each results record as its eval_metrics.json."""
  out = {**data, "records": {k: r.to_json() for k, r in data["records"].items()}}
  return json.loads(json.dumps(out, default=str))


def write_figure_data(workdir: Path, path: Path, pattern: str = "**/*.json") -> None:
  """Every figure's data in one JSON ({figure path: its data}), from the `.json` each
  figure function writes beside its PNG (those matching `pattern` under `workdir`)."""
  found = {}
  for data in sorted(workdir.glob(pattern)):
    png = data.with_suffix(".png")
    if png.exists() and data.name != FIGURES_JSON:
      found[str(png.relative_to(workdir))] = json.loads(data.read_text())
  fileio.write_json_atomic(path, found)


def write_study(workdir: str | os.PathLike[str], config: ml_collections.ConfigDict,
                tables: list[tuple], figure: str) -> dict[str, Path]:
  """The study's report.md / report.html: its figure, its tables (report blocks built
  from the study's rows, `stages.study.tables`), then the recipe as run."""
  workdir = Path(workdir)
  blocks = [("h1", f"mae_jax label-efficiency study: {config.preset} preset"),
            ("p", f"Workdir {workdir}. Generated "
                  f"{datetime.datetime.now().isoformat(timespec='seconds')}."),
            ("figure", "Test macro AUC against labels per class", figure),
            *tables,
            ("h2", "Recipe as run"), ("pre", _flat_config(config))]
  paths = {"markdown": workdir / REPORT_MD, "html": workdir / REPORT_HTML,
           "figures": workdir / FIGURES_JSON}
  write_figure_data(workdir, paths["figures"], pattern="*.json")
  fileio.write_atomic(paths["markdown"], lambda f: f.write(to_markdown(blocks).encode()))
  fileio.write_atomic(paths["html"], lambda f: f.write(to_html(blocks, workdir).encode()))
  return paths
