"""How many labelled shots the online probe needs to rank pretraining checkpoints.

  python research/online_probe_shots.py --data DIR --pretrain WORKDIR ... \
      [--shots 50 100 200 500 0] [--validation 200 0] [--seeds 0 1 2] [--json out.json]

For each pretraining workdir (its latest checkpoint) the frozen encoder's candidate
features of the whole train and validation splits are computed once; then, for each
number of shots per class (0: every training image) and of validation images per class
(0: all), over a few seeded draws, the online probe's score (`eval.online_probe.score`:
the best candidate's validation macro AUC of a logistic regression on the shots) and the
seconds its fits take. The test split is never read.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from mae_jax.data import arrays  # pylint: disable=g-import-not-at-top
from mae_jax.data import feeds  # pylint: disable=g-import-not-at-top
from mae_jax.data import source  # pylint: disable=g-import-not-at-top
from mae_jax.eval import online_probe  # pylint: disable=g-import-not-at-top
from mae_jax.models import build  # pylint: disable=g-import-not-at-top
from mae_jax.runtime import checkpoint  # pylint: disable=g-import-not-at-top
from mae_jax.runtime import parallel  # pylint: disable=g-import-not-at-top
from mae_jax.stages import common  # pylint: disable=g-import-not-at-top
from mae_jax.stages import validate  # pylint: disable=g-import-not-at-top
from mae_jax.train import steps  # pylint: disable=g-import-not-at-top


def _bank(model, encoder, split: arrays.Split, mesh) -> dict[str, np.ndarray]:
  feed = feeds.DeviceFeed(split.images, split.labels, mesh)
  feeding = steps.Feeding(source="device", local_batch=128 // mesh.devices.size, seed=0)
  tree = parallel.replicate({"params": {"encoder": encoder}, "batch_stats": {}}, mesh)
  return common.Evaluator(steps.feature_bank_fn(model), mesh, feed, feeding)(tree)


def _draw(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
  """Sorted indices of `per_class` examples of each class (0: all), seeded."""
  if per_class <= 0:
    return np.arange(len(labels))
  rng = np.random.default_rng([seed, 0x5407])
  return np.sort(np.concatenate([rng.choice(np.flatnonzero(labels == c), per_class, replace=False)
                                 for c in np.unique(labels)]))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data", required=True, help="a DeepLense folder (prepared on first use)")
  parser.add_argument("--cache", default="~/.cache/mae_jax/datasets")
  parser.add_argument("--pretrain", nargs="+", required=True, help="pretraining workdirs")
  parser.add_argument("--shots", type=int, nargs="+", default=[50, 100, 200, 500, 0])
  parser.add_argument("--validation", type=int, nargs="+", default=[200, 0])
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--config", default="configs/pretrain.py:demo")
  parser.add_argument("--json", default=None)
  args = parser.parse_args()
  file, _, preset = args.config.partition(":")
  config = validate.load_config_file(file, preset or None)
  dataset = arrays.prepare(args.data, args.cache,
                           rule=source.DataSettings.from_config(config.data).split, progress=False)
  train, val = dataset["train"], dataset["validation"]
  mesh = parallel.make_mesh()
  model = build.build_encoder_features(config.model)
  report = {}
  for workdir in args.pretrain:
    saved, step = checkpoint.restore_latest_on_one_device(Path(workdir) / "checkpoints")
    encoder = jax.device_get(saved["params"]["encoder"])
    banks = {"train": _bank(model, encoder, train, mesh), "validation": _bank(model, encoder, val, mesh)}
    rows = []
    for shots in args.shots:
      for per_val in args.validation:
        scores, seconds = [], []
        for seed in (args.seeds if shots or per_val else args.seeds[:1]):
          t, v = _draw(train.labels, shots, seed), _draw(val.labels, per_val, seed)
          bank = {n: np.concatenate([banks["train"][n][t], banks["validation"][n][v]])
                  for n in banks["train"]}
          start = time.time()
          out = online_probe.score(bank, np.concatenate([train.labels[t], val.labels[v]]), len(t))
          seconds.append(time.time() - start)
          scores.append(out[online_probe.SCORE])
        rows.append({"shots": shots, "validation": per_val, "scores": scores,
                     "mean": float(np.mean(scores)), "sd": float(np.std(scores)),
                     "fit_seconds": float(np.mean(seconds))})
        print(f"{workdir} step {step}: shots {shots or 'all':>4} validation {per_val or 'all':>4}: "
              f"{np.mean(scores):.4f} ± {np.std(scores):.4f} ({len(scores)} draws; "
              f"fits {np.mean(seconds):.2f} s)", flush=True)
    report[str(workdir)] = {"step": step, "rows": rows}
  if args.json:
    Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
  main()
