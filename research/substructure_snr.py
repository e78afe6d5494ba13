"""How far above the noise the substructure lies, per simulator variant and dial level.

  python research/substructure_snr.py [--images 100] [--out docs/substructure_snr.png]

For `model_ii`, `hard` and every `substructure` source-spread level, draws the first
`--images` images per class of seed 0 (parameters only, as `params.csv` would hold them)
and prints the median and 10th / 90th percentiles of `simulate.substructure_snr`: the
noise-weighted norm of (image with substructure - image without), noise-free, against
the Euclid VIS noise. A matched filter that knew the smooth lens would reach this SNR;
a classifier has to infer the smooth lens from the image. Writes a figure of the
distributions (and its data as JSON beside it).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import matplotlib  # pylint: disable=g-import-not-at-top
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from mae_jax.data import simulate  # pylint: disable=g-import-not-at-top

CLASSES = ("cdm", "axion")


def settings() -> list[tuple[str, str, int]]:
  """(label, variant, source_spread) of every setting measured."""
  out = [("model_ii", "model_ii", 0), ("hard", "hard", 0)]
  return out + [(f"substructure {level}", "substructure", level)
                for level in range(simulate.SOURCE_SPREAD_MAX + 1)]


def measure(variant: str, level: int, images: int) -> dict[str, list[float]]:
  return {c: [simulate.substructure_snr(simulate.draw_parameters(
      c, simulate.image_rng(0, c, i), variant=variant, source_spread=level))
              for i in range(images)] for c in CLASSES}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--images", type=int, default=100, help="images per class and setting")
  parser.add_argument("--out", default="runs/substructure_snr.png")
  args = parser.parse_args()
  start = time.perf_counter()
  results = {}
  print(f"{'setting':<16} {'class':<6} {'median':>8} {'p10':>8} {'p90':>8} {'<5':>6}")
  for label, variant, level in settings():
    results[label] = measure(variant, level, args.images)
    for c in CLASSES:
      snr = np.array(results[label][c])
      p10, p50, p90 = np.percentile(snr, [10, 50, 90])
      print(f"{label:<16} {c:<6} {p50:8.1f} {p10:8.1f} {p90:8.1f} {np.mean(snr < 5):6.1%}")
  fig, axes = plt.subplots(1, len(CLASSES), figsize=(11, 4), sharey=True)
  for ax, c in zip(axes, CLASSES):
    labels = list(results)
    ax.boxplot([results[k][c] for k in labels], whis=(10, 90), showfliers=False)
    ax.set_xticks(range(1, len(labels) + 1), labels, rotation=30, ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.set_title(f"{c}: substructure SNR (box: quartiles, whiskers: 10-90%)", fontsize=10)
    ax.grid(alpha=0.3, axis="y")
  axes[0].set_ylabel("noise-weighted norm of the substructure")
  fig.suptitle(f"Substructure against the Euclid noise ({args.images} images per class)")
  fig.tight_layout()
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out, dpi=110)
  out.with_suffix(".json").write_text(json.dumps({"images": args.images, "snr": results}))
  print(f"wrote {out} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
  main()
