"""The one runner of research arms: each arm is one or more ordinary `main.py` runs,
named in an arms file (research/arms/*.py, `get_arms()`). It runs the ones not yet
finished (each resumes where it stopped), times them, and prints the table of every arm:
the command, wall time, the validation curve and the test split's macro AUC with its
bootstrap 95% interval.

  python research/run.py research/arms/substructure.py --list
  python research/run.py research/arms/substructure.py --run sup_vit_p8 sup_cnn   # in order
  python research/run.py research/arms/substructure.py --queue arms.txt   # arms named in a
      # file, re-read before each run (edit it live; arms.txt.pause holds it)
  python research/run.py research/arms/substructure.py --table > /tmp/arms.md
  python research/run.py research/arms/substructure.py --figure curves.png --runs a b

Runs live in `--root` (default runs/arms/NAME); wall times accumulate over resumed
invocations in NAME/arm_wall.json. Nothing here chooses on the test split: a run's epoch
is chosen on validation by the stage itself, and the table reports the test numbers of
that epoch.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from mae_jax.eval import results  # pylint: disable=g-import-not-at-top,wrong-import-position

@dataclasses.dataclass(frozen=True)
class Run:
  """One `main.py` invocation: the stage config and its overrides; `needs` names runs
  that must finish first (the pretraining a probe starts from)."""
  config: str
  overrides: tuple[str, ...]
  question: str
  expect: str = ""
  needs: tuple[str, ...] = ()

  def command(self, name: str, root: Path) -> list[str]:
    extra = [o.replace("{root}", str(root)) for o in self.overrides]
    return [f"--config={self.config}", f"--workdir={root / name}", *extra]


def load_arms(path: Path) -> dict[str, Run]:
  """The runs an arms file's `get_arms()` returns, by name."""
  spec = importlib.util.spec_from_file_location(f"arms_{path.stem}", path)
  if spec is None or not path.is_file():
    raise SystemExit(f"arms file {path} not found")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return {name: Run(**{k: tuple(v) if isinstance(v, list) else v for k, v in run.items()})
          for name, run in module.get_arms().items()}


RUNS: dict[str, Run] = {}   # the arms file's, set by main()
ARMS_FILE = Path()


def _wall_file(root: Path, name: str) -> Path:
  return root / name / "arm_wall.json"


def finished(root: Path, name: str) -> bool:
  run = root / name
  if RUNS[name].config.startswith("configs/pretrain.py"):
    return (run / "pretrain_summary.json").exists()
  return results.exists(run)


def run_one(name: str, root: Path, log_dir: Path) -> int:
  """Runs (or resumes) `name`, adding its wall time to NAME/arm_wall.json."""
  spec = RUNS[name]
  for need in spec.needs:
    if not finished(root, need):
      print(f"{name}: waits for {need}, which has not finished", flush=True)
      return 1
  log_dir.mkdir(parents=True, exist_ok=True)
  cmd = [sys.executable, str(ROOT / "main.py"), *spec.command(name, root)]
  start = time.time()
  with open(log_dir / f"{name}.log", "a") as log:
    rc = subprocess.call(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                         env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
  wall = time.time() - start
  path = _wall_file(root, name)
  previous = json.loads(path.read_text()) if path.exists() else {"seconds": 0.0, "calls": 0}
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps({"seconds": previous["seconds"] + wall,
                              "calls": previous["calls"] + 1, "last_rc": rc}))
  print(f"{name}: rc {rc}, {wall:.0f} s", flush=True)
  return rc


def _busy(root: Path) -> bool:
  """Whether a main.py run under `root` is running (arms run one at a time: a second
  would halve the first's speed and blur both wall times)."""
  found = subprocess.run(["pgrep", "-f", f"main.py .*--workdir={root}/"], capture_output=True,
                         text=True, check=False)
  return bool(found.stdout.strip())


def run_queue(queue: Path, root: Path, log_dir: Path) -> None:
  """Runs the first unfinished arm named in `queue` (one per line, # comments) that has
  not failed (NAME/arm_wall.json's last_rc), then starts this script afresh, so an edit
  of the queue file or of the arms here takes effect at the next arm. Each arm runs in
  its own process (`--one`), which records its wall time even if the queue is stopped."""
  names = [line.split("#")[0].strip() for line in queue.read_text().splitlines()]
  unknown = [n for n in names if n and n not in RUNS]
  if unknown:
    print(f"queue: unknown arm(s) {', '.join(unknown)} skipped", flush=True)

  def failed(n: str) -> bool:
    path = _wall_file(root, n)
    return path.exists() and json.loads(path.read_text()).get("last_rc", 0) != 0

  todo = [n for n in names if n in RUNS and not finished(root, n) and not failed(n)]
  if not todo:
    return
  pause = queue.with_name(queue.name + ".pause")
  if pause.exists():   # hold the queue between arms (a quiet machine for a benchmark)
    print(f"queue: paused while {pause} exists", flush=True)
    while pause.exists():
      time.sleep(15)
  if _busy(root):   # another arm runs: wait, then look at the queue afresh
    while _busy(root):
      time.sleep(30)
    os.execv(sys.executable, [sys.executable, *sys.argv])
  subprocess.call([sys.executable, __file__, str(ARMS_FILE), "--root", str(root),
                   "--logs", str(log_dir), "--one", todo[0]], cwd=ROOT)
  os.execv(sys.executable, [sys.executable, *sys.argv])


def _curve(history: list[dict], points: int = 8) -> str:
  """The validation macro AUC at about `points` evenly spaced epochs: `epoch: AUC`."""
  scored = [h for h in history if h.get("val_macro_auc") is not None]
  every = max(1, -(-len(scored) // points))
  picked = scored[every - 1::every]
  if scored and picked[-1] is not scored[-1]:
    picked.append(scored[-1])
  return ", ".join(f"{h['epoch']}: {h['val_macro_auc']:.2f}" for h in picked)


def row(name: str, root: Path) -> dict | None:
  """The table row of a finished run (None if it has not finished)."""
  run = root / name
  if not results.exists(run):
    return None
  record = results.read(run)
  history = json.loads((run / "history.json").read_text())
  wall = json.loads(_wall_file(root, name).read_text())["seconds"] if \
      _wall_file(root, name).exists() else float("nan")
  return {"name": name, "question": RUNS[name].question, "wall_s": wall,
          "epoch": record.chosen.epoch, "epochs": len(history), "curve": _curve(history),
          "validation": record.validation["macro_auc"], "test": record.test["macro_auc"],
          "interval": tuple(record.test.interval("macro_auc")), "auc": record.test["auc"],
          "command": "python main.py " + " ".join(RUNS[name].command(name, Path("runs/arms"))),
          "expect": RUNS[name].expect}


def table(names: list[str], root: Path) -> str:
  lines = ["| arm | wall | validation macro AUC (epoch: AUC) | chosen epoch (val) | "
           "test macro AUC [95%] | test AUC no_sub / cdm / axion |",
           "|---|---|---|---|---|---|"]
  commands = []
  for name in names:
    r = row(name, root)
    if r is None:
      continue
    auc = r["auc"]
    lines.append(
        f"| `{name}` | {r['wall_s'] / 60:.1f} min | {r['curve']} | {r['epoch']} of "
        f"{r['epochs']} ({r['validation']:.3f}) | **{r['test']:.3f}** "
        f"[{r['interval'][0]:.3f}, {r['interval'][1]:.3f}] | {auc['no_sub']:.3f} / "
        f"{auc['cdm']:.3f} / {auc['axion']:.3f} |")
    commands.append(f"- `{name}`: `{r['command']}`")
  return "\n".join(lines + [""] + commands) + "\n"


def figure(names: list[str], root: Path, out: Path) -> None:
  """Validation macro AUC by epoch of each run, one line each. The curves go to OUT.json
  beside the figure, added to those recorded there before (kept, drawn or not): a run
  whose workdir is gone is drawn from its recorded curve."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  recorded = out.with_suffix(".json")
  curves = json.loads(recorded.read_text()) if recorded.exists() else {}
  for name in names:
    path = root / name / "history.json"
    if path.exists():
      curves[name] = json.loads(path.read_text())
  fig, ax = plt.subplots(figsize=(8, 4.5))
  for name in (n for n in names if n in curves):
    history = [h for h in curves[name] if "val_macro_auc" in h]
    ax.plot([h["epoch"] for h in history], [h["val_macro_auc"] for h in history], label=name)
  ax.axhline(0.5, color="grey", lw=0.8, ls=":")
  ax.set_xlabel("epoch")
  ax.set_ylabel("validation macro AUC")
  ax.set_title(f"{ARMS_FILE.stem} arms: validation macro AUC by epoch")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(out, dpi=120)
  recorded.write_text(json.dumps(curves, indent=1))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("arms", type=Path, help="an arms file (research/arms/*.py)")
  parser.add_argument("--root", default="runs/arms", type=Path)
  parser.add_argument("--logs", default="runs/arms/logs", type=Path)
  parser.add_argument("--list", action="store_true", help="the arms and their questions")
  parser.add_argument("--run", nargs="*", default=[], help="run these arms in order")
  parser.add_argument("--queue", type=Path, help="run the arms named in this file, in order")
  parser.add_argument("--one", help="run this one arm (what --queue starts)")
  parser.add_argument("--table", action="store_true", help="print the finished arms' table")
  parser.add_argument("--figure", type=Path, help="validation curves of --runs to this PNG")
  parser.add_argument("--runs", nargs="*", default=[], help="arms for --table / --figure")
  args = parser.parse_args()
  global ARMS_FILE
  ARMS_FILE = args.arms.resolve()
  RUNS.update(load_arms(ARMS_FILE))
  unknown = [n for n in args.run + args.runs + ([args.one] if args.one else []) if n not in RUNS]
  if unknown:
    parser.error(f"unknown arm(s) {', '.join(unknown)}; --list shows them")
  if args.list:
    for name, spec in RUNS.items():
      print(f"{name:28s} {spec.question:14s} {spec.expect}")
  for name in args.run:
    if finished(args.root, name):
      print(f"{name}: finished", flush=True)
      continue
    run_one(name, args.root, args.logs)
  if args.one:
    sys.exit(run_one(args.one, args.root, args.logs))
  if args.queue:
    run_queue(args.queue, args.root, args.logs)
  names = args.runs or list(RUNS)
  if args.table:
    print(table(names, args.root))
  if args.figure:
    figure(names, args.root, args.figure)


if __name__ == "__main__":
  main()
