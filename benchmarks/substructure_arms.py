"""The arms of the `substructure` question (docs/substructure.md): which ViT and which
MAE recipe see the substructure. Each arm is one or more ordinary `main.py` runs; this
script runs the ones not yet finished (each resumes where it stopped), times them, and
prints the table of every arm: the command, wall time, the validation curve and the
test split's macro AUC with its bootstrap 95% interval.

  python benchmarks/substructure_arms.py --list
  python benchmarks/substructure_arms.py --run sup_vit_p8 sup_cnn    # in order, resumable
  python benchmarks/substructure_arms.py --queue arms.txt   # arms named in a file, re-read
                                                             # before each run (edit it live;
                                                             # arms.txt.pause holds it)
  python benchmarks/substructure_arms.py --table > /tmp/arms.md      # every finished run
  python benchmarks/substructure_arms.py --figure docs/substructure_curves.png --runs a b

Runs live in `--root` (default runs/arms/NAME); wall times accumulate over resumed
invocations in NAME/arm_wall.json. Nothing here chooses on the test split: a run's epoch
is chosen on validation by the stage itself, and the table reports the test numbers of
that epoch.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from mae_jax.eval import results  # pylint: disable=g-import-not-at-top,wrong-import-position

SUB = ("--config.data.sim.variant=substructure",)
SCRATCH = ("--config.init_from=",)
FLIPS = ("--config.augment=True", "--config.data.augment.max_shift=0")


# The loss on every patch's high-pass part (normalised per patch): the recipe whose frozen
# features first saw substructure, the demo default since.
VISIBLE_HP = ("--config.loss.masked_only=False", "--config.loss.type=mse",
              "--config.loss.norm_pix=True", "--config.loss.target=highpass")
# The demo recipe before it (BCE on the removed patches' pixels): the `base` arm, and the
# arms that change one thing of it.
BASE = ("--config.loss.masked_only=True", "--config.loss.type=bce",
        "--config.loss.norm_pix=False", "--config.loss.target=pixels")


def _lr(rate: float) -> str:
  return f"--config.optim.lr_groups=(('.*', {rate}),)"


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


def _supervised(*extra: str, epochs: int = 40, lr: float = 1e-3, expect: str = "") -> Run:
  return Run("configs/finetune.py:demo", (*SUB, *SCRATCH, _lr(lr), f"--config.epochs={epochs}",
                                          *extra), "architecture", expect)


def _mae_arm(name: str, pretrain: tuple[str, ...], model: tuple[str, ...] = (),
             expect: str = "", pool: str = "") -> dict[str, Run]:
  """An MAE recipe arm: one unlabelled pretraining on the `substructure` pool (every class;
  `pool`: another folder, e.g. a larger one), then the encoder scored three ways on the
  demo folder's labels: the probe (frozen features, block chosen on validation), a
  partial fine-tune (the last block and the head, every label) and the full fine-tune
  at 300 labels per class and on every label. The fine-tunes use the scratch ViT's recipe
  (lr 1e-3 for every param, 40 epochs), so only the initialisation differs; `ftdef` is
  the every-label fine-tune at the demo fine-tune's own rates."""
  pre = f"mae_{name}_pre"
  source = (f"--config.init_from={{root}}/{pre}",)
  data = ("--config.data.dir=data/substructure_sim_demo",)
  pool_dir = (f"--config.data.dir={pool}", "--config.data.sim.per_class=30000") if pool else ()
  question = f"mae:{name}"
  return {
      pre: Run("configs/pretrain.py:demo", (*SUB, *pool_dir, *model, *pretrain), question, expect),
      f"mae_{name}_probe": Run("configs/probe.py:demo", (*SUB, *data, *model, *source), question,
                               needs=(pre,)),
      # The probe's head trained 10x longer (the frozen features are computed once, so
      # its epochs are cheap): the 20-epoch probe was still rising.
      f"mae_{name}_probe200": Run("configs/probe.py:demo",
                                  (*SUB, *data, *model, *source, "--config.epochs=200"),
                                  question, needs=(pre,)),
      f"mae_{name}_partial": Run("configs/finetune.py:demo",
                                 (*SUB, *data, *model, *source, _lr(1e-3), "--config.epochs=40",
                                  "--config.trainable_blocks=1"), question, needs=(pre,)),
      f"mae_{name}_ft300": Run("configs/finetune.py:demo",
                               (*SUB, *data, *model, *source, _lr(1e-3), "--config.epochs=120",
                                "--config.labels_per_class=300"), question, needs=(pre,)),
      f"mae_{name}_ftall": Run("configs/finetune.py:demo",
                               (*SUB, *data, *model, *source, _lr(1e-3), "--config.epochs=40"),
                               question, needs=(pre,)),
      # The demo fine-tune's own rates (encoder 1e-4, head 1e-3): the MAE's features kept
      # closer to where pretraining left them.
      f"mae_{name}_ftdef": Run("configs/finetune.py:demo",
                               (*SUB, *data, *model, *source, "--config.epochs=40"),
                               question, needs=(pre,)),
      # Twice as long: every fine-tune was still rising at epoch 40.
      f"mae_{name}_ftdef80": Run("configs/finetune.py:demo",
                                 (*SUB, *data, *model, *source, "--config.epochs=80"),
                                 question, needs=(pre,)),
      # At 300 labels per class (120 epochs of 14 steps: half the steps of `ftdef`).
      f"mae_{name}_ft300def": Run("configs/finetune.py:demo",
                                  (*SUB, *data, *model, *source, "--config.epochs=120",
                                   "--config.labels_per_class=300"), question, needs=(pre,)),
  }


RUNS: dict[str, Run] = {
    # (1) Which network learns substructure from every label (5,400 images), from scratch.
    "sup_vit_p8": _supervised(
        expect="at chance for several epochs, then a slow climb (the 6,000-per-class hint)"),
    "sup_vit_p8_flips": _supervised(
        *FLIPS, expect="flips and quarter turns are label-preserving here: more data, higher"),
    "sup_vit_p8_conv": _supervised(
        "--config.model.stem=conv",
        expect="local non-linear features per patch: leaves chance sooner than p8"),
    "sup_vit_p8_conv_flips": _supervised("--config.model.stem=conv", *FLIPS),
    "sup_vit_p4": _supervised("--config.model.patch=4",
                              expect="finer tokens: sees few-pixel detail, 4x the tokens"),
    "sup_cnn": _supervised("--config.model.arch=cnn", expect="the ceiling: 0.81 at 10 epochs"),
    "sup_cnn_flips": _supervised("--config.model.arch=cnn", *FLIPS),
    "sup_vit_p8_mean": _supervised("--config.model.pool=mean",
                                   expect="the mean of the patch tokens, as the CNN's average pool"),
    "sup_vit_p8_b32": _supervised("--config.batch_size=32",
                                  expect="twice the steps per epoch: leaves chance sooner"),
    "sup_vit_p8_lr2e3": _supervised(lr=2e-3, expect="larger steps: sooner, or unstable"),
    "sup_vit_p8_e100": _supervised(epochs=100, expect="still rising at 40 epochs: to its plateau"),
    "sup_cnn_e100": _supervised("--config.model.arch=cnn", epochs=100,
                                expect="the CNN ceiling to its plateau (0.85 at 40 epochs)"),
    # The scratch reference of the MAE arms' fine-tune at 300 labels per class.
    "sup_vit_p8_300": _supervised(
        "--config.labels_per_class=300", epochs=120,
        expect="a sixth of the labels, 1,700 steps: near chance, or leaving the plateau late"),
    # (2) MAE recipes: each a pretraining, then probe / partial / 300 labels / every label.
    **_mae_arm("base", BASE, expect="the demo recipe before (BCE, mask 0.75, decoder 64 x 2, "
                                    "20 epochs): the lens and source, little substructure"),
    **_mae_arm("normpix", (*BASE, "--config.loss.type=mse", "--config.loss.norm_pix=True"),
               expect="MSE on per-patch normalised pixels (MAE's best target): more detail"),
    **_mae_arm("highpass", (*BASE, "--config.loss.type=mse", "--config.loss.norm_pix=True",
                            "--config.loss.target=highpass"),
               expect="each patch minus its blur: the few-pixel residual substructure adds"),
    **_mae_arm("visible", (*BASE, "--config.loss.masked_only=False"),
               expect="the loss on every patch (the seed's choice): the encoder must carry the "
                      "visible patches' own detail, substructure included"),
    **_mae_arm("visiblehp", VISIBLE_HP,
               expect="every patch's high-pass part: the visible detail, without the smooth "
                      "light that dominates the pixel loss"),
    **_mae_arm("visiblehp_long", (*VISIBLE_HP, "--config.phase_epochs=(20, 40)"),
               expect="the best recipe, 60 epochs (3x): MAE's probe keeps rising with length"),
    **_mae_arm("visiblehp_long180", (*VISIBLE_HP, "--config.phase_epochs=(20, 160)"),
               expect="9x the default length: on the 20 -> 60 epoch trend, the every-label "
                      "fine-tune near 0.85 and 300 per class > scratch + 0.10"),
    # One thing of the high-pass recipe (the demo default) changed at a time.
    **_mae_arm("visiblenp", (*VISIBLE_HP, "--config.loss.target=pixels"),
               expect="every patch, MSE on norm-pix pixels, no high-pass: how much of the "
                      "recipe is the loss on every patch, how much the high-pass target"),
    **_mae_arm("visiblehp_mask50", (*VISIBLE_HP, "--config.model.mask_ratio=0.5"),
               expect="half the patches visible: more of the loss on the visible detail, "
                      "the removed patches easier to predict"),
    **_mae_arm("visiblehp_dec4", (*VISIBLE_HP, "--config.model.decoder_depth=4"),
               expect="a deeper decoder takes over the reconstruction: the encoder's last "
                      "block more abstract, its probe higher (MAE Table 1)"),
    **_mae_arm("visiblehp_pool3", (*VISIBLE_HP, "--config.pool_size=16200"),
               pool="data/substructure_sim_pool10",
               expect="the best recipe on 3x the unlabelled images (16,200), 20 epochs"),
    **_mae_arm("visiblehp_pool10", VISIBLE_HP, pool="data/substructure_sim_pool10",
               expect="the best recipe on 10x the unlabelled images (~54,000), 20 epochs: the "
                      "steps of the 180-epoch arm, each image seen 20 times instead of 180"),
    **_mae_arm("mask50", (*BASE, "--config.model.mask_ratio=0.5"),
               expect="more context per removed patch: sharper predictions, finer features"),
    **_mae_arm("dec4", (*BASE, "--config.model.decoder_depth=4"),
               expect="a deeper decoder leaves the encoder's last blocks more abstract"),
    **_mae_arm("long", (*BASE, "--config.phase_epochs=(20, 40)"), expect="60 epochs, 3x the base"),
    **_mae_arm("pool3", (*BASE, "--config.pool_size=16200"), pool="data/substructure_sim_pool10",
               expect="3x the unlabelled images (16,200 of the 10x folder's train split)"),
    **_mae_arm("pool10", BASE, pool="data/substructure_sim_pool10",
               expect="10x the unlabelled images (the 10x folder's train split, ~54,000)"),
}


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
  subprocess.call([sys.executable, __file__, "--root", str(root), "--logs", str(log_dir),
                   "--one", todo[0]], cwd=ROOT)
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
  ax.set_title("substructure demo folder, every label: validation macro AUC by epoch")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(out, dpi=120)
  recorded.write_text(json.dumps(curves, indent=1))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
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
