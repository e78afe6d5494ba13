"""Label-efficiency study: does the MAE pretraining pay off, and at which label budget?

  python main.py --config=configs/study.py:demo --workdir=runs/study_demo
  python main.py --config=configs/study.py:demo --workdir=runs/study_demo \
      --config.variants='("hard",)' --config.seeds='(0,)'

For each simulator variant (`model_ii`, and `substructure`, where the lens mass gives
the class away no more than the radial baseline shows and the substructure itself is
the signal): one MAE pretrained on the unlabelled pool, then for each label budget and
seed the arms MAE fine-tune, scratch fine-tune (its own learning rate, chosen on
validation from `scratch_lrs`), MAE probe (features chosen on validation) and the
radial-profile baseline; and once per seed the supervised ceilings (the ViT and the CNN
from scratch on every label). All scored on the test split, beside the substructure's
signal-to-noise ratio per variant (docs/study.md).
Each stage's keys are those of its own config file, under the stage's name
(`--config.finetune.optim.layer_decay=0.75`, `--config.pretrain.phase_epochs='(10, 20)'`).
Running the command again skips finished runs and resumes the rest.
"""

import ml_collections

from configs import common
from configs import data as data_config
from configs import finetune as finetune_config
from configs import pipeline as pipeline_config
from configs import pretrain as pretrain_config
from configs import probe as probe_config

_ALL_ARMS = ("mae_finetune", "mae_partial", "scratch_finetune", "mae_probe", "radial",
             "supervised", "supervised_cnn")
_SEED = {"labels_per_class": (10, 30, 100, 300, 1000, 0), "arms": _ALL_ARMS,
         "variant_arms.model_ii": (), "variant_arms.substructure": (),
         "variant_labels_per_class.substructure": (),
         "arm_table.scratch_finetune.lrs": (1e-4, 3e-4, 1e-3), "finetune_steps": 5000,
         "probe_steps": 2000, "finetune_budget_steps": (), "probe_budget_steps": (),
         "supervised_steps": 20000, "arm_table.supervised.lrs": (3e-4,), "poll_seconds": 60.0,
         "snr_images": 300, "evaluations": 10}
_GPU = common.GPU_BATCH["finetune"] / 64   # seed_gpu's fine-tune batch grows 8-fold
# What each preset changes from the demo study.
PRESETS = {
    "tiny": {**{k: v for k, v in _SEED.items() if k.startswith("variant_")},
             "labels_per_class": (2, 0), "seeds": (0,), "arms": _ALL_ARMS,
             "arm_table.scratch_finetune.lrs": (1e-3,), "finetune_steps": 4, "probe_steps": 4,
             "finetune_budget_steps": (), "probe_budget_steps": (), "supervised_steps": 4,
             "poll_seconds": 1.0, "snr_images": 2, "evaluations": 2},
    "seed": _SEED,
    "seed_gpu": {**_SEED, "arm_table.scratch_finetune.lrs": tuple(
        lr * _GPU for lr in _SEED["arm_table.scratch_finetune.lrs"]),
                 "arm_table.supervised.lrs": (3e-4 * _GPU,),
                 "arm_table.supervised_cnn.lrs": (1e-3 * _GPU,)},
}


def arm_table() -> ml_collections.ConfigDict:
  """The arms that train, as data: the `stage` a run is, where it `start`s ('mae': the
  variant's pretraining; 'scratch'), the `lrs` a scratch arm tries (every param at one
  rate; chosen on validation with the first seed, kept for the others), whether it is a
  `ceiling` (every label, once per seed, `supervised_steps` steps), the config-argument
  option `arch`, and any other key (a stage key it sets, `trainable_blocks`). The
  `radial` arm trains nothing: it is the radial baseline each run fits on its labels."""
  return ml_collections.ConfigDict({
      "mae_finetune": {"stage": "finetune", "start": "mae"},
      # The MAE fine-tune with only the encoder's last block (and its final norm) training.
      "mae_partial": {"stage": "finetune", "start": "mae", "trainable_blocks": 1},
      "scratch_finetune": {"stage": "finetune", "start": "scratch", "lrs": (1e-3, 3e-3)},
      "mae_probe": {"stage": "probe", "start": "mae"},
      "supervised": {"stage": "finetune", "start": "scratch", "lrs": (1e-3,), "ceiling": True},
      "supervised_cnn": {"stage": "finetune", "start": "scratch", "lrs": (1e-3,),
                         "ceiling": True, "arch": "cnn"},
  })


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  preset, _ = common.parse(arg)
  config = ml_collections.ConfigDict()
  config.stage = "study"
  config.preset = preset
  config.data = data_config.get_config(preset).data   # shared; the variant is set per run
  config.variants = ("model_ii", "substructure")
  config.data_dirs = ml_collections.ConfigDict(
      {v: common.data_dir(v, preset) for v in common.VARIANTS})
  # Labelled images per class drawn from the train split (0: all of it).
  config.labels_per_class = (100,)
  config.seeds = (0, 1, 2)
  # demo: the CNN is the cheaper ceiling; `substructure` adds the ViT (below).
  config.arms = ("mae_finetune", "scratch_finetune", "mae_probe", "radial", "supervised_cnn")
  # Per variant, a ladder and arms other than the above; () keeps the above. The demo
  # cuts what does not inform on a 2-core CPU (model_ii's ceiling is its radial
  # baseline's); on substructure it runs the ladder to every label with both ceilings.
  config.variant_labels_per_class = ml_collections.ConfigDict({v: () for v in common.VARIANTS})
  config.variant_arms = ml_collections.ConfigDict({v: () for v in common.VARIANTS})
  config.variant_arms.model_ii = ("mae_finetune", "scratch_finetune", "mae_probe", "radial")
  config.variant_labels_per_class.substructure = (100, 300, 0)
  config.variant_arms.substructure = ("mae_finetune", "scratch_finetune", "mae_probe", "radial",
                                      "supervised", "supervised_cnn")
  config.arm_table = arm_table()
  # About this many optimiser steps per run, whatever the budget (epochs follow); the
  # batch shrinks to at most half the labelled images.
  config.finetune_steps = 200
  config.probe_steps = 300
  # Per label budget ((labels per class, steps), ...; 0: every label), steps other than the
  # above: the schedules the substructure arms measured (docs/substructure.md).
  config.finetune_budget_steps = ((300, 1680), (0, 3320))
  config.probe_budget_steps = ((0, 820),)
  # The ceilings' optimiser steps (the ViT and the small CNN from scratch on every label).
  config.supervised_steps = 3320
  # Workers: any number of processes may run this study on one workdir (each run is
  # claimed by one); a worker whose remaining runs others hold looks again this often.
  config.poll_seconds = 30.0
  # Substructure SNR measured on this many images per class of each simulated variant.
  config.snr_images = 200
  # Validation passes per run (they choose the epoch that test reports).
  config.evaluations = 5
  # The goals the study checks (table) and draws (figure), at `goal_labels` per class:
  # the MAE fine-tune above the scratch fine-tune by `goal_over_scratch` and, per variant,
  # above the radial baseline by `goal_over_radial`; the MAE probe at most
  # `goal_probe_near_radial` below the radial baseline. On all labels: the supervised
  # ceiling at least `goal_ceiling_at_least`, the radial baseline at most
  # `goal_radial_at_most` (the variant is a test of substructure, not of lens mass).
  config.goal_labels = 100
  config.goal_over_scratch = 0.05
  config.goal_over_radial = ml_collections.ConfigDict({"substructure": 0.15})
  config.goal_probe_near_radial = ml_collections.ConfigDict({"model_ii": 0.03})
  config.goal_ceiling_at_least = ml_collections.ConfigDict({"substructure": 0.90})
  config.goal_radial_at_most = ml_collections.ConfigDict({"substructure": 0.65})
  config.data_stage = pipeline_config.stage_keys(data_config.get_config(preset))
  config.pretrain = pipeline_config.stage_keys(pretrain_config.get_config(preset))
  config.finetune = pipeline_config.stage_keys(finetune_config.get_config(preset))
  config.probe = pipeline_config.stage_keys(probe_config.get_config(preset))
  return common.apply_preset(config, preset, PRESETS)
