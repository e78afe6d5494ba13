"""MAE pretraining on an unlabelled pool, in phases (seed: 100 epochs without, then 250
with augmentation).

  python main.py --config=configs/pretrain.py:demo --workdir=runs/pretrain_demo
  python main.py --config=configs/pretrain.py:seed --workdir=runs/pretrain_seed

The base is the demo recipe: a ViT that pretrains on a 2-core CPU in minutes, MSE on every
patch's high-pass part (the objective whose encoder sees substructure, docs/training.md).
`seed` is the seed recipe (docs/design.md: patch 4, encoder 256/8/8, decoder 128/4/8, mask
0.75, BCE, AdamW lr 8e-4, wd 0.05) for a GPU; `demo_long` pretrains 180 epochs instead of
20; `tiny` is for tests.
"""

import ml_collections

from configs import common

# The seed's objective: BCE on the removed patches' [0, 1] pixels.
_BCE = {"loss.type": "bce", "loss.norm_pix": False, "loss.masked_only": True,
        "loss.target": "pixels"}
_SEED = {**_BCE, "classes": ("no_sub",), "phase_epochs": (100, 250), "batch_size": 256,
         "optim.lr": 8e-4, "optim.warmup_epochs": 10.0, "plot_every_epochs": 10}
# What each preset changes (`common.SHARED` holds the sizes every stage shares).
PRESETS = {
    "demo_long": {"phase_epochs": (20, 160)},
    "tiny": {**_BCE, "phase_epochs": (1, 1), "batch_size": 8, "optim.lr": 1e-3,
             "optim.warmup_epochs": 0.5, "checkpoint_every_epochs": 1, "plot_every_epochs": 1,
             "probe_every_epochs": 1, "probe_shots": 4, "probe_validation": 4},
    "seed": _SEED,
    # The host work after an epoch (validation, figures, a checkpoint) every few epochs:
    # an epoch is 23 steps of 1,024 images there.
    "seed_gpu": {**_SEED, "batch_size": common.GPU_BATCH["pretrain"],
                 "eval_batch_size": common.GPU_BATCH["pretrain"],
                 "optim.lr": 8e-4 * (common.GPU_BATCH["pretrain"] / 256),
                 "eval_every_epochs": 5, "checkpoint_every_epochs": 10, "plot_every_epochs": 50,
                 "probe_every_epochs": 25},
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  preset, _ = common.parse(arg)
  config = ml_collections.ConfigDict()
  config.stage = "pretrain"
  config.preset = preset
  config.seed = 0
  config.data = common.data_config(preset)
  # The unlabelled pool: the train split's images of these classes, subsampled to
  # `pool_size` (0: all of them); the seed's pool is `no_sub` only (docs/diagnosis.md).
  config.classes = ("no_sub", "cdm", "axion")
  config.pool_size = 0
  config.model = ml_collections.ConfigDict(dict(
      **common.vit_config(), decoder_dim=64, decoder_depth=2, decoder_heads=4, mask_ratio=0.75))
  # Start from public MAE weights (facebookresearch/mae .pth, Hugging Face ViTMAE folder or
  # .safetensors; mae_jax/models/load.py): only a fresh run reads it.
  config.init_weights = ""
  # The objective (mae_jax/objectives/reconstruction.py): 'mse' or 'bce' (on [0, 1]
  # pixels); norm_pix (MAE's); the removed patches only, or every patch; the target,
  # 'pixels' or 'highpass' (each patch minus its own Gaussian blur).
  config.loss = ml_collections.ConfigDict(dict(
      type="mse", norm_pix=True, masked_only=False, target="highpass", highpass_sigma=1.0))
  # Phases run in order; each has its epoch count and whether to augment.
  config.phase_epochs = (7, 13)
  config.phase_augment = (False, True)
  config.batch_size = 64   # global
  config.eval_batch_size = config.get_ref("batch_size")
  # Examples per device in one micro-batch: a step accumulates its gradient over
  # micro-batches of at most this size (the same update from a smaller working set; faster
  # on a CPU, docs/performance.md); 0: the whole batch.
  config.micro_batch = ml_collections.ConfigDict(dict(cpu=8, accelerator=0))
  config.optim = ml_collections.ConfigDict(dict(
      lr=5e-4, b1=0.9, b2=0.95, weight_decay=0.05, warmup_epochs=2.0, min_lr=0.0,
      grad_clip_norm=0.0,
      # No weight decay on biases, norms, tokens (position embeddings are fixed).
      no_decay=(r".*/bias", r".*norm[0-9]*/scale", r".*_token")))
  config.update(common.loop_keys())
  # Validation loss every this many epochs (and after the last one).
  config.eval_every_epochs = 1
  config.checkpoint_every_epochs = 5
  config.keep_checkpoints = 3
  config.plot_every_epochs = 5
  config.num_reconstructions = 8      # columns of plots/reconstructions.png
  # Watching the features (mae_jax/eval/online_probe.py): every this many epochs (and after
  # the last; 0: off) a few-shot logistic regression on the frozen encoder's features,
  # fitted on `probe_shots` labelled training images per class and scored (macro AUC) on
  # up to `probe_validation` validation images per class; in history.json as probe_auc.
  # Fewer shots or validation images do not rank checkpoints as the frozen probe does
  # (docs/results.md).
  config.probe_every_epochs = 10
  config.probe_shots = 300
  config.probe_validation = 1000
  return common.apply_preset(config, preset, PRESETS)
