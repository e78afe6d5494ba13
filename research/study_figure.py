"""One label-efficiency figure from two studies on the same folders: the MAE arms of a
study that ran only those (for example `demo_long`, whose pretraining is the one thing it
changes) beside every arm of a reference study (the `demo` study: its scratch fine-tune,
radial baseline and ceilings do not depend on the pretraining, so they are not rerun).
The reference's MAE arms stay in the figure, renamed with `--reference-tag`; the goals
are recomputed with the MAE arms of the first study.

  python research/study_figure.py --study runs/study_long180/study.json \\
      --reference docs/label_efficiency_substructure_demo.json --variant substructure \\
      --reference-tag "20 epochs" --out docs/label_efficiency_substructure_demo_long.png

`--study` and `--reference` each take a study's `study.json` or a figure's `.json` (the
data the study drew its figure from). The figure's data is written beside it (.json).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configs import study as study_config  # pylint: disable=g-import-not-at-top
from mae_jax.eval import plots  # pylint: disable=g-import-not-at-top
from mae_jax.stages import study  # pylint: disable=g-import-not-at-top
from mae_jax.stages import study_tables  # pylint: disable=g-import-not-at-top


def read_summary(path: Path) -> list[dict]:
  """The per-(variant, arm, budget) summary of a study.json or of a figure's .json."""
  data = json.loads(path.read_text())
  summary = data.get("summary") or (data.get("data") or {}).get("summary")
  if summary is None:
    raise SystemExit(f"{path}: no study summary (a study.json, or a study figure's .json)")
  return summary


# The arms that start from the MAE (the stock study's arm table).
MAE_ARMS = tuple(name for name, arm in study.arm_table(study_config.get_config("demo")).items()
                 if arm.start == "mae")


def merge(mine: list[dict], reference: list[dict], variant: str, tag: str) -> list[dict]:
  """`mine`'s MAE arms; the reference's other arms; the reference's MAE arms renamed
  '<arm> (<tag>)'. Only `variant`."""
  own = [s for s in mine if s["variant"] == variant and s["arm"] in MAE_ARMS]
  if not own:
    raise SystemExit(f"the study has no MAE arm on {variant!r}")
  ref = [s for s in reference if s["variant"] == variant]
  renamed = [{**s, "arm": f"{s['arm']} ({tag})"} for s in ref if s["arm"] in MAE_ARMS]
  return own + [s for s in ref if s["arm"] not in MAE_ARMS] + renamed


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--study", type=Path, required=True)
  parser.add_argument("--reference", type=Path, required=True)
  parser.add_argument("--variant", default="substructure")
  parser.add_argument("--reference-tag", default="reference")
  parser.add_argument("--preset", default="demo", help="the study config whose goals apply")
  parser.add_argument("--title", default="")
  parser.add_argument("--out", type=Path, required=True)
  args = parser.parse_args()
  summary = merge(read_summary(args.study), read_summary(args.reference), args.variant,
                  args.reference_tag)
  goal_rows = study_tables.config_goals(summary, study_config.get_config(args.preset))
  plots.label_efficiency(summary, args.out, title=args.title or None, goals=goal_rows)
  for g in goal_rows:
    print(f"{g['goal']:18s} {g['arm']:16s} {g['labels_per_class']:>4d}/class "
          f"{g['value']:.3f} target {g['target']:.3f} gap {g['gap']:+.3f}")
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
