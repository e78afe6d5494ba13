"""Label-efficiency study: does the MAE pretraining pay off, and at which label budget?

  python main.py --config=configs/study.py:demo --workdir=runs/study_demo
  python main.py --config=configs/study.py:demo --workdir=runs/study_demo \
      --config.variants='("hard",)' --config.seeds='(0,)'

For each simulator variant (`model_ii`, and `substructure`, where the lens mass gives
the class away no more than the radial baseline shows and the substructure itself is
the signal): one MAE pretrained on the unlabelled pool, then for each label budget and
seed the arms MAE fine-tune, scratch fine-tune (its own learning rate, chosen on
validation from `scratch_lrs`), MAE probe (features chosen on validation) and the
radial-profile baseline; and once per seed the supervised ceiling (the ViT from
scratch on every label). All scored on the test split, beside the substructure's
signal-to-noise ratio per variant.
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


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  preset = common.parse_preset(arg)
  config = ml_collections.ConfigDict()
  config.stage = "study"
  config.preset = preset
  config.data = common.data_config(preset)   # shared by every run; the variant is set per run
  config.variants = ("model_ii", "substructure")
  config.data_dirs = ml_collections.ConfigDict(
      {v: common.data_dir(v, preset) for v in common.VARIANTS})
  # Labelled images per class drawn from the train split (0: all of it).
  config.labels_per_class = {"seed": (10, 30, 100, 300, 1000, 0), "demo": (100,),
                             "tiny": (2, 0)}[common.size(preset)]
  config.seeds = {"seed": (0, 1, 2), "demo": (0, 1, 2), "tiny": (0,)}[common.size(preset)]
  config.arms = {"seed": ("mae_finetune", "mae_partial", "scratch_finetune", "mae_probe", "radial",
                          "supervised", "supervised_cnn"),
                 # demo: the CNN is the cheaper ceiling; `substructure` adds the ViT (below).
                 "demo": ("mae_finetune", "scratch_finetune", "mae_probe", "radial",
                          "supervised_cnn"),
                 "tiny": ("mae_finetune", "mae_partial", "scratch_finetune", "mae_probe", "radial",
                          "supervised", "supervised_cnn")}[common.size(preset)]
  # Per variant, a ladder and arms other than the above; () keeps the above (the demo cuts
  # what does not inform on a 2-core CPU: model_ii's ceiling is its radial baseline's).
  config.variant_labels_per_class = ml_collections.ConfigDict({v: () for v in common.VARIANTS})
  config.variant_arms = ml_collections.ConfigDict({v: () for v in common.VARIANTS})
  if common.size(preset) == "demo":
    config.variant_arms.model_ii = ("mae_finetune", "scratch_finetune", "mae_probe", "radial")
    # substructure: the ladder up to every label, with both ceilings (docs/substructure.md:
    # the ViT from scratch leaves chance after ~1,100 steps on every label; the MAE
    # fine-tune gains most at 300 labels per class).
    config.variant_labels_per_class.substructure = (100, 300, 0)
    config.variant_arms.substructure = ("mae_finetune", "scratch_finetune", "mae_probe",
                                        "radial", "supervised", "supervised_cnn")
  # mae_partial: the MAE fine-tune with only the encoder's last this many blocks training.
  config.partial_blocks = 1
  # The scratch fine-tune's learning rates (every param), chosen on validation.
  config.scratch_lrs = {"seed": (1e-4, 3e-4, 1e-3), "demo": (1e-3, 3e-3),
                        "tiny": (1e-3,)}[common.size(preset)]
  # seed_gpu: the fine-tune's batch grows 8-fold there: rates scale with it.
  factor = common.GPU_BATCH["finetune"] / finetune_config.get_config("seed").batch_size
  if preset == "seed_gpu":
    config.scratch_lrs = tuple(lr * factor for lr in config.scratch_lrs)
  # About this many optimiser steps per run, whatever the budget (epochs follow); the
  # batch shrinks to at most half the labelled images.
  config.finetune_steps = {"seed": 5000, "demo": 200, "tiny": 4}[common.size(preset)]
  config.probe_steps = {"seed": 2000, "demo": 300, "tiny": 4}[common.size(preset)]
  # Per label budget ((labels per class, steps), ...; 0: every label), steps other than the
  # above. demo: the schedules the substructure arms measured (docs/substructure.md):
  # fine-tunes of 120 epochs at 300 per class and 40 on every label (batch 64); the
  # probe's 20 epochs on every label (batch 128).
  config.finetune_budget_steps = {"demo": ((300, 1680), (0, 3320))}.get(common.size(preset), ())
  config.probe_budget_steps = {"demo": ((0, 820),)}.get(common.size(preset), ())
  # The supervised ceiling (the ViT and the small CNN from scratch on every label):
  # optimiser steps and each arm's learning rate.
  # demo: 40 epochs at 1e-3, the best from-scratch ViT of the substructure arms.
  config.supervised_steps = {"seed": 20000, "demo": 3320, "tiny": 4}[common.size(preset)]
  config.supervised_lrs = ml_collections.ConfigDict({
      "supervised": {"seed": 3e-4, "demo": 1e-3, "tiny": 1e-3}[common.size(preset)],
      "supervised_cnn": {"seed": 1e-3, "demo": 1e-3, "tiny": 1e-3}[common.size(preset)]})
  if preset == "seed_gpu":
    for arm in config.supervised_lrs:
      config.supervised_lrs[arm] *= factor
  # Substructure SNR measured on this many images per class of each simulated variant.
  # Workers: any number of processes may run this study on one workdir (each run is
  # claimed by one); a worker whose remaining runs others hold looks again this often.
  config.poll_seconds = {"seed": 60.0, "demo": 30.0, "tiny": 1.0}[common.size(preset)]
  config.snr_images = {"seed": 300, "demo": 200, "tiny": 2}[common.size(preset)]
  # Validation passes per run (they choose the epoch that test reports).
  config.evaluations = {"seed": 10, "demo": 5, "tiny": 2}[common.size(preset)]
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
  config.probe.select_features = True
  return config
