"""The online probe's curve over a pretraining beside the frozen probe's test AUC of its
checkpoints: does the cheap score rank checkpoints as the probe does?

  python research/online_probe_figure.py --history runs/sub_pre2/history.json \
      --probes runs/sub_probe_415 runs/sub_probe_830 ... --out docs/online_probe_substructure.png

`--probes` are probe workdirs, each started from a folder holding one checkpoint of that
pretraining and named by its step (their `config.json`'s `init_from`, e.g. runs/sub_at/415).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import matplotlib  # pylint: disable=g-import-not-at-top
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

from mae_jax.eval import plots  # pylint: disable=g-import-not-at-top
from mae_jax.eval import results  # pylint: disable=g-import-not-at-top


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--history", required=True, help="the pretraining's history.json")
  parser.add_argument("--probes", nargs="+", required=True, help="probe workdirs, one per step")
  parser.add_argument("--out", required=True, help="the PNG (its data beside it as .json)")
  args = parser.parse_args()
  history = json.loads(Path(args.history).read_text())
  steps_per_epoch = history[0]["step"] // history[0]["epoch"]
  online = [(h["epoch"], h["probe_auc"]) for h in history if h.get("probe_auc") is not None]
  probes = []
  for workdir in args.probes:
    step = int(Path(json.loads((Path(workdir) / "config.json").read_text())["init_from"]).name)
    record = results.read(workdir)
    lo, hi = record.test.interval("macro_auc")
    probes.append((step // steps_per_epoch, record.test["macro_auc"], lo, hi))
  fig, ax = plt.subplots(figsize=(7, 4))
  ax.plot(*zip(*online), marker="o", ms=3, color="C2",
          label="online probe (validation, one draw of the shots)")
  ax.set_xlabel("pretraining epoch")
  ax.set_ylabel("macro AUC")
  epochs, auc, lo, hi = zip(*sorted(probes))
  ax.errorbar(epochs, auc, yerr=[[a - l for a, l in zip(auc, lo)], [h - a for a, h in zip(auc, hi)]],
              fmt="s", color="C0", capsize=3, label="frozen probe of that checkpoint (test, 95%)")
  ax.grid(alpha=0.3)
  ax.legend(loc="lower right", fontsize=8)
  title = "Online probe against the frozen probe of each checkpoint"
  ax.set_title(title)
  plots.save(fig, args.out, {"online": online, "probes": sorted(probes)}, title)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
