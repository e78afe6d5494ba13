"""Linear probe: the pretrained encoder frozen, a classification head trained with LARS.

  python main.py --config=configs/probe.py:demo --workdir=runs/probe_demo
  python main.py --config=configs/probe.py:seed --workdir=runs/probe_seed \
      --config.init_from=runs/pretrain_seed

The encoder comes from `init_from` (a pretrain workdir) and is frozen in the optimiser
(`optim.frozen`); its features are computed once, their block and pooling chosen on
validation. The seed's head is an MLP 256->512->256 with BatchNorm, ReLU and dropout 0.2
(`--config.model.head=linear` for MAE's BN + linear). LARS as in MAE: momentum 0.9,
weight decay 0, warmup then cosine per step; LARS moves each weight matrix by lr x
trust_coefficient of its norm per step, so the demo's rate is high (docs/training.md).
"""

import ml_collections

from configs import common

_SEED = {"epochs": 90, "batch_size": 256, "optim.lr_groups": ((r".*", 0.1),),
         "optim.lr_scaling": "linear", "optim.warmup_epochs": 10.0}
# What each preset changes (`common.SHARED` holds the sizes every stage shares).
PRESETS = {
    "tiny": {"epochs": 2, "batch_size": 8, "optim.lr_groups": ((r".*", 0.1),),
             "optim.warmup_epochs": 0.5},
    # seed: MAE's base lr 0.1 scaled with the batch (lr 0.1 at 256).
    "seed": _SEED,
    "seed_gpu": {**_SEED, "batch_size": common.GPU_BATCH["probe"],
                 "eval_batch_size": common.GPU_BATCH["probe"]},
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  preset, _ = common.parse(arg)
  config = common.classifier_config(preset, "probe")
  config.epochs = 20
  config.batch_size = 128
  config.eval_batch_size = config.get_ref("batch_size")
  config.optim = common.lars(lr_groups=((r".*", 4.0),), frozen=(r"encoder/.*",),
                             warmup_epochs=2.0)
  # The frozen features' block and pooling, chosen on validation (logistic regression).
  config.select_features = True
  return common.apply_preset(config, preset, PRESETS)
