"""The table of an accelerator run (benchmarks/accelerator_run.sh): speed and results.

  python benchmarks/accelerator_summary.py RUN_DIR THROUGHPUT_TXT [--seconds N]

Reads the pipeline's `report.json` in RUN_DIR and the benchmark's printout, and prints a
markdown summary: the real-loop images/s against the targets, the wall time of each
stage and of the whole run, and the probe's and fine-tune's test AUCs (with their
bootstrap intervals) beside the seed study's published micro AUCs and the
radial-profile baseline.
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


def summary(run: Path, throughput: str, seconds: float | None) -> str:
  data = json.loads((run / "report.json").read_text())
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
  lines += ["| stage | wall time |", "|---|---|"]
  for name, stage in data.get("stages", {}).items():
    lines.append(f"| {name} | {stage.get('seconds', 0):.1f} s |")
  if seconds is not None:
    lines.append(f"| **whole run** (simulation, benchmark, pipeline) | {seconds:.0f} s |")
  lines += ["", "| model (test split) | micro AUC | macro AUC [95%] | accuracy | seed, published |",
            "|---|---|---|---|---|"]
  for stage in ("probe", "finetune"):
    m = data.get("metrics", {}).get(stage)
    published = data.get("seed_published", {}).get(stage, {}).get("micro_auc")
    if m:
      lines.append(f"| {stage} | {m['micro_auc']:.3f} | {m['macro_auc']:.3f}{_ci(m)} | "
                   f"{m['accuracy']:.3f} | {published} |")
  for name, b in data.get("baselines", {}).items():
    lines.append(f"| {name} (radial profile) | {b['micro_auc']:.3f} | "
                 f"{b['macro_auc']:.3f}{_ci(b)} | {b['accuracy']:.3f} | |")
  return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("run", help="the pipeline's workdir")
  parser.add_argument("throughput", help="the benchmark's printout")
  parser.add_argument("--seconds", type=float, default=None, help="wall time of the whole run")
  args = parser.parse_args(argv)
  print(summary(Path(args.run), Path(args.throughput).read_text(), args.seconds))


if __name__ == "__main__":
  main()
