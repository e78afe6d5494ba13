"""Full fine-tuning: every param trained, AdamW with per-group learning rates.

  python main.py --config=configs/finetune.py:demo --workdir=runs/finetune_demo
  python main.py --config=configs/finetune.py:demo --workdir=runs/finetune_demo \
      --config.init_from=runs/probe_demo --config.init_from_stage=probe --config.dont_load='()'

Starts from a pretrain workdir (new head) or, with `dont_load=()`, from a probe
workdir keeping its head. Seed recipe: encoder lr 9.5e-5, head lr 8e-4, weight
decay 1e-4 (not on biases, norms, tokens), warmup then cosine. MAE options:
`optim.layer_decay` (0.65-0.75), `model.drop_path`, `label_smoothing`.
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  preset = common.parse_preset(arg)
  config = common.classifier_config(preset, "finetune")
  config.epochs = {"seed": 50, "demo": 15, "tiny": 2}[common.size(preset)]
  config.batch_size = {"seed": 64, "demo": 64, "tiny": 8}[common.size(preset)]
  config.eval_batch_size = {"seed": 256, "demo": 256, "tiny": 8}[common.size(preset)]
  config.optim = common.classifier_optim(
      name="adamw",
      # demo: the encoder at 1e-4 keeps the pretrained features (validation macro AUC at
      # 100 / 30 labels per class: 0.889 / 0.646 against 0.851 / 0.631 at 5e-4).
      lr_groups=((r"encoder/.*", {"seed": 9.5e-5, "demo": 1e-4, "tiny": 1e-4}[common.size(preset)]),
                 (r".*", {"seed": 8e-4, "demo": 1e-3, "tiny": 8e-4}[common.size(preset)])),
      weight_decay=1e-4, warmup_epochs={"seed": 5.0, "demo": 1.0, "tiny": 0.5}[common.size(preset)],
      min_lr=1e-6)
  # Partial fine-tuning (MAE, He et al. 2022, Fig. 9): only the encoder's last this many
  # blocks and its final norm train with the head; the patch embedding and the blocks below
  # stay as pretrained (no backward pass through them). -1: every param trains.
  config.trainable_blocks = -1
  return common.for_gpu(config, "finetune")
