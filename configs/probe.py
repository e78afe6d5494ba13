"""Linear probe: the pretrained encoder frozen, a classification head trained with LARS.

  python main.py --config=configs/probe.py:demo --workdir=runs/probe_demo
  python main.py --config=configs/probe.py:seed --workdir=runs/probe_seed \
      --config.init_from=runs/pretrain_seed

The encoder comes from `init_from` (a pretrain workdir) and is frozen in the
optimiser (`optim.frozen`); the seed's head is an MLP 256->512->256 with
BatchNorm, ReLU and dropout 0.2 (`--config.model.head=linear` for MAE's BN +
linear). LARS as in MAE: lr = base_lr x batch / 256, momentum 0.9, weight decay
0, warmup then cosine per step.
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  preset = common.parse_preset(arg)
  config = common.classifier_config(preset, "probe")
  config.epochs = {"seed": 90, "demo": 20, "tiny": 2}[common.size(preset)]
  config.batch_size = {"seed": 256, "demo": 128, "tiny": 8}[common.size(preset)]
  config.eval_batch_size = config.get_ref("batch_size")
  # LARS scales each weight matrix's step to lr x trust_coefficient (0.001) of its norm,
  # so the rate sets how far the head moves per step, whatever the gradient. The seed's
  # base lr 1e-3 moved it by 1e-6 of its norm per step: the head hardly trained (the
  # seed's probe AUC 0.58). seed: MAE's base lr 0.1, scaled with the batch (lr 0.1 at 256,
  # ~8,500 steps); demo: a fixed lr 4.0 for its few hundred steps (measured on validation:
  # 0.1 -> 0.53, 1.0 -> 0.72, 4.0 -> 0.75 macro AUC at 100 labels per class).
  size = common.size(preset)
  config.optim = common.classifier_optim(
      name="lars", lr_groups=((r".*", {"seed": 0.1, "demo": 4.0, "tiny": 0.1}[size]),),
      lr_scaling="linear" if size == "seed" else "none", frozen=(r"encoder/.*",),
      weight_decay=0.0, warmup_epochs={"seed": 10.0, "demo": 2.0, "tiny": 0.5}[size])
  # The frozen features' block and pooling, chosen on validation (logistic regression).
  config.select_features = True
  return common.for_gpu(config, "probe")
