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
  config.optim = common.classifier_optim(
      name="lars", lr_groups=((r".*", {"seed": 1e-3, "demo": 0.1, "tiny": 0.1}[common.size(preset)]),),
      lr_scaling="linear", frozen=(r"encoder/.*",), weight_decay=0.0,
      warmup_epochs={"seed": 10.0, "demo": 2.0, "tiny": 0.5}[common.size(preset)])
  return common.for_gpu(config, "probe")
