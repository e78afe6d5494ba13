"""The table of an accelerator run (tools/accelerator/run.sh): speed and results.

  python tools/accelerator/summary.py RUN_DIR THROUGHPUT_TXT [--seconds N]
  python tools/accelerator/summary.py --epochs RUN_DIR      # the per-epoch table only

Reads the pipeline's `report.json` in RUN_DIR and the benchmark's printout (either may
be missing: a part of the run that did not happen is left out), and prints a markdown
summary: the real-loop images/s against the targets, the wall time of each stage and of
the whole run, every training epoch's images/s per stage and its host syncs (from each
stage's `history.json` and `config.json`; an epoch's time is its steps, without
evaluation, and the first of a stage or phase includes compilation), and the probe's and fine-tune's test
AUCs (with their bootstrap intervals) beside the seed study's published micro AUCs and
the radial-profile baseline.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

# Targets of the real loop on one H200 in bfloat16 (images/s).
TARGETS = {"pretrain": 35_000, "finetune": 20_000}


def loop_rates(text: str) -> list[tuple[str, str, int, float]]:
  """(task, feed, batch, images/s) of every real-loop line of the benchmark's output."""
  pattern = re.compile(r"^(\w+)\s+real loop, (\w+) feed, batch (\d+): ([\d,.]+) images/s", re.M)
  return [(t, f, int(b), float(r.replace(",", ""))) for t, f, b, r in pattern.findall(text)]


def _ci(m: dict) -> str:
  ci = (m.get("intervals") or {}).get("macro_auc")
  return f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""


STAGES = ("pretrain", "probe", "finetune")


def epoch_rates(run: Path) -> list[tuple[str, int, int, float, float, int | None]]:
  """(stage, epoch, steps, seconds, images/s, host syncs) of every epoch the pipeline
  trained; the syncs are the host's waits on the device since the previous epoch's
  record (`history.json`'s `host_syncs`; None in runs that did not count them)."""
  rows = []
  for stage in STAGES:
    history, config = run / stage / "history.json", run / stage / "config.json"
    if not history.exists() or not config.exists():
      continue
    batch = int(json.loads(config.read_text())["batch_size"])
    previous = 0
    for record in json.loads(history.read_text()):
      steps, seconds = record["step"] - previous, float(record.get("seconds") or 0.0)
      previous = record["step"]
      rows.append((stage, int(record["epoch"]), steps, seconds,
                   steps * batch / seconds if seconds > 0 else float("nan"),
                   record.get("host_syncs")))
  return rows


def epoch_table(run: Path) -> list[str]:
  rows = epoch_rates(run)
  if not rows:
    return []
  lines = ["| stage | epoch | steps | seconds | images/s | host syncs |",
           "|---|---|---|---|---|---|"]
  lines += [f"| {stage} | {epoch} | {steps} | {seconds:.2f} | {rate:,.0f} | "
            f"{'' if syncs is None else syncs} |"
            for stage, epoch, steps, seconds, rate, syncs in rows]
  return lines + [""]


def summary(run: Path, throughput: str, seconds: float | None) -> str:
  report = run / "report.json"
  data = json.loads(report.read_text()) if report.exists() else {}
  lines = ["# Accelerator run", ""]
  rates = loop_rates(throughput)
  if rates:
    lines += ["| real loop | feed | batch | images/s | target |", "|---|---|---|---|---|"]
    for task, feed, batch, rate in rates:
      target = TARGETS.get(task)
      lines.append(f"| {task} | {feed} | {batch} | {rate:,.0f} | "
                   + (f"{target:,} ({'met' if rate >= target else 'missed'})" if target else "")
                   + " |")
    lines.append("")
  attention = [l.strip() for l in throughput.splitlines() if re.match(r"^\w+\s+attention ", l)]
  lines += [f"- {l}" for l in attention] + ([""] if attention else [])
  lines += ["| stage | wall time |", "|---|---|"]
  for name, stage in data.get("stages", {}).items():
    lines.append(f"| {name} | {stage.get('seconds', 0):.1f} s |")
  if seconds is not None:
    lines.append(f"| **whole run** | {seconds:.0f} s |")
  lines += [""] + epoch_table(run)
  records = data.get("records") or {}   # each stage's eval_metrics.json (test split)
  if not records:
    return "\n".join(lines) + "\n"
  lines += ["| model (test split) | micro AUC | macro AUC [95%] | accuracy | seed, published |",
            "|---|---|---|---|---|"]
  for stage in ("probe", "finetune"):
    m = records.get(stage)
    published = data.get("seed_published", {}).get(stage, {}).get("micro_auc")
    if m:
      lines.append(f"| {stage} | {m['micro_auc']:.3f} | {m['macro_auc']:.3f}{_ci(m)} | "
                   f"{m['accuracy']:.3f} | {published} |")
  b = next((r["baseline"] for r in records.values() if r.get("baseline")), None)
  if b:
    lines.append(f"| baseline (radial profile) | {b['micro_auc']:.3f} | "
                 f"{b['macro_auc']:.3f}{_ci(b)} | {b['accuracy']:.3f} | |")
  return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("run", help="the pipeline's workdir")
  parser.add_argument("throughput", nargs="?", default="", help="the benchmark's printout")
  parser.add_argument("--seconds", type=float, default=None, help="wall time of the whole run")
  parser.add_argument("--epochs", action="store_true", help="print the per-epoch table only")
  args = parser.parse_args(argv)
  if args.epochs:
    print("\n".join(epoch_table(Path(args.run))))
    return
  text = Path(args.throughput).read_text() if args.throughput and Path(
      args.throughput).exists() else ""
  print(summary(Path(args.run), text, args.seconds))


if __name__ == "__main__":
  main()
