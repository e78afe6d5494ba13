"""Full fine-tuning: every param trained, AdamW with per-group learning rates.

  python main.py --config=configs/finetune.py:demo --workdir=runs/finetune_demo
  python main.py --config=configs/finetune.py:demo --workdir=runs/finetune_demo \
      --config.init_from=runs/probe_demo --config.init_from_stage=probe --config.dont_load='()'
  python main.py --config=configs/finetune.py:demo,arch=cnn --workdir=runs/cnn_demo

Starts from a pretrain workdir (new head) or, with `dont_load=()`, from a probe workdir
keeping its head. Seed recipe: encoder lr 9.5e-5, head lr 8e-4, weight decay 1e-4 (not on
biases, norms, tokens), warmup then cosine. MAE options: `optim.layer_decay` (0.65-0.75),
`model.drop_path`, `label_smoothing`; `trainable_blocks` for a partial fine-tune.
Option `arch=cnn`: the small CNN from scratch instead of the ViT (the study's ceiling).
"""

import ml_collections

from configs import common

OPTIONS = {"arch": ("vit", "cnn")}
OPTION_KEYS = {"arch": "model.arch"}   # the key each option sets (config checks read it)
_SEED = {"epochs": 50, "optim.lr_groups": ((r"encoder/.*", 9.5e-5), (r".*", 8e-4)),
         "optim.warmup_epochs": 5.0}
_GPU = common.GPU_BATCH["finetune"] / 64   # the seed batch's growth: rates scale with it
# What each preset changes (`common.SHARED` holds the sizes every stage shares).
PRESETS = {
    "tiny": {"epochs": 2, "batch_size": 8, "eval_batch_size": 8,
             "optim.lr_groups": ((r"encoder/.*", 1e-4), (r".*", 8e-4)),
             "optim.warmup_epochs": 0.5},
    "seed": _SEED,
    "seed_gpu": {**_SEED, "batch_size": common.GPU_BATCH["finetune"],
                 "eval_batch_size": common.GPU_BATCH["finetune"],
                 "optim.lr_groups": ((r"encoder/.*", 9.5e-5 * _GPU), (r".*", 8e-4 * _GPU))},
}
# The CNN has one rate for every param (it has no pretrained encoder).
CNN_PRESETS = {
    "tiny": {"epochs": 2, "batch_size": 8, "eval_batch_size": 8, "optim.warmup_epochs": 0.5},
    "seed": {"epochs": 50, "optim.warmup_epochs": 5.0},
    "seed_gpu": {"epochs": 50, "optim.warmup_epochs": 5.0,
                 "batch_size": common.GPU_BATCH["finetune"],
                 "eval_batch_size": common.GPU_BATCH["finetune"],
                 "optim.lr_groups": ((r".*", 1e-3 * _GPU),)},
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  preset, options = common.parse(arg, OPTIONS)
  cnn = options["arch"] == "cnn"
  config = common.classifier_config(preset, "finetune", options["arch"])
  config.epochs = 15
  config.batch_size = 64
  config.eval_batch_size = 256
  if cnn:
    config.optim = common.adamw(lr_groups=((r".*", 1e-3),), weight_decay=1e-4, min_lr=1e-6)
    del config.optim.layer_decay
    return common.apply_preset(config, preset, CNN_PRESETS)
  # The encoder at a tenth of the head's rate keeps the pretrained features
  # (docs/results.md).
  config.optim = common.adamw(lr_groups=((r"encoder/.*", 1e-4), (r".*", 1e-3)),
                              weight_decay=1e-4, min_lr=1e-6)
  # Partial fine-tuning (MAE, He et al. 2022, Fig. 9): only the encoder's last this many
  # blocks and its final norm train with the head; -1: every param trains.
  config.trainable_blocks = -1
  return common.apply_preset(config, preset, PRESETS)
