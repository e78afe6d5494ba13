"""What a frozen encoder's features hold: rank, spread and linear separability per block.

  python research/feature_diagnosis.py --data DIR [--pretrain WORKDIR ...] [--random]
      [--labels_per_class 100] [--config configs/finetune.py:demo] [--json out.json]

For each encoder (a pretraining workdir's latest checkpoint, or a random initialisation
with --random) and each candidate feature (every block's output and the final normed
tokens, CLS or mean-pooled), on `labels_per_class` labelled train images per class and
the validation split (the test split is never read):

- effective rank: exp of the entropy of the normalised singular values of the centred
  features (how many directions the features really use);
- spread: the mean per-dimension standard deviation relative to the features' mean
  norm (near 0: every image maps to about the same point);
- class separation: the validation macro AUC of the logistic regression the probe
  uses to choose features (`eval.features.score_candidates`).

It also checks that a stage started from the workdir sees exactly the saved encoder
(`models.load.restore_from_stage`, every leaf compared bit for bit).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
from flax import traverse_util  # pylint: disable=g-import-not-at-top

from mae_jax.data import arrays  # pylint: disable=g-import-not-at-top
from mae_jax.data import feeds  # pylint: disable=g-import-not-at-top
from mae_jax.data import source  # pylint: disable=g-import-not-at-top
from mae_jax.eval import features as features_lib  # pylint: disable=g-import-not-at-top
from mae_jax.models import build  # pylint: disable=g-import-not-at-top
from mae_jax.models import load  # pylint: disable=g-import-not-at-top
from mae_jax.runtime import checkpoint  # pylint: disable=g-import-not-at-top
from mae_jax.runtime import parallel  # pylint: disable=g-import-not-at-top
from mae_jax.stages import common  # pylint: disable=g-import-not-at-top
from mae_jax.stages import validate  # pylint: disable=g-import-not-at-top
from mae_jax.train import steps  # pylint: disable=g-import-not-at-top


def effective_rank(x: np.ndarray) -> float:
  s = np.linalg.svd(x - x.mean(0), compute_uv=False)
  p = s / s.sum()
  p = p[p > 0]
  return float(np.exp(-(p * np.log(p)).sum()))


def spread(x: np.ndarray) -> float:
  return float(x.std(0).mean() / (np.linalg.norm(x, axis=1).mean() + 1e-12))


def bank(model, params, stats, split, mesh) -> dict[str, np.ndarray]:
  feed = feeds.DeviceFeed(split.images, split.labels, mesh)
  feeding = steps.Feeding(source="device", local_batch=128 // mesh.devices.size, seed=0)
  tree = parallel.replicate({"params": params, "batch_stats": stats}, mesh)
  return common.Evaluator(steps.feature_bank_fn(model), mesh, feed, feeding)(tree)


def encoder_exactly_restored(workdir: Path, params, stats) -> bool:
  """A stage started from `workdir` gets its checkpoint's encoder bit for bit."""
  loaded, _, _, _ = load.restore_from_stage(workdir, params, stats, dont_load=[r"classifier/.*"])
  saved, _ = checkpoint.restore_latest_on_one_device(workdir / "checkpoints")
  theirs = traverse_util.flatten_dict(saved["params"]["encoder"], sep="/")
  ours = traverse_util.flatten_dict(jax.device_get(loaded["encoder"]), sep="/")
  return set(theirs) == set(ours) and all(
      np.array_equal(np.asarray(theirs[k]), np.asarray(ours[k])) for k in ours)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data", required=True, help="a DeepLense folder (prepared on first use)")
  parser.add_argument("--cache", default="~/.cache/mae_jax/datasets")
  parser.add_argument("--pretrain", nargs="*", default=[], help="pretraining workdirs")
  parser.add_argument("--random", action="store_true", help="also a randomly initialised encoder")
  parser.add_argument("--labels_per_class", type=int, default=100)
  parser.add_argument("--config", default="configs/finetune.py:demo")
  parser.add_argument("--json", default=None)
  args = parser.parse_args()
  file, _, preset = args.config.partition(":")
  config = validate.load_config_file(file, preset or None)
  dataset = arrays.prepare(args.data, args.cache,
                           rule=source.DataSettings.from_config(config.data).split, progress=False)
  train = common.labelled_subset(dataset["train"], args.labels_per_class, 0)
  val = dataset["validation"]
  mesh = parallel.make_mesh()
  model = build.build_classifier(config.model, 3)
  fresh, stats = build.init_classifier(model, jax.random.key(0))
  encoders = [("random", fresh, None)] if args.random else []
  for workdir in args.pretrain:
    params, _, _, _ = load.restore_from_stage(workdir, fresh, stats,
                                              dont_load=[r"classifier/.*"])
    encoders.append((Path(workdir).name, params, Path(workdir)))
  report = {}
  for name, params, workdir in encoders:
    train_bank = bank(model, params, stats, train, mesh)
    val_bank = bank(model, params, stats, val, mesh)
    scores = features_lib.score_candidates(train_bank, train.labels, val_bank, val.labels)
    rows = {f: {"effective_rank": effective_rank(val_bank[f]), "spread": spread(val_bank[f]),
                "validation_macro_auc": scores[f]} for f in sorted(scores)}
    exact = encoder_exactly_restored(workdir, fresh, stats) if workdir else None
    report[name] = {"features": rows, "best": features_lib.choose(scores),
                    "encoder_restored_exactly": exact}
    print(f"{name}: best {report[name]['best']} "
          f"({scores[report[name]['best']]:.4f}); encoder restored exactly: {exact}")
    for f, r in rows.items():
      print(f"  {f:<14} rank {r['effective_rank']:6.1f}  spread {r['spread']:.4f}  "
            f"LR val macro AUC {r['validation_macro_auc']:.4f}")
  if args.json:
    Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
  main()
