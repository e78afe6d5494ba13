"""MAE pretraining on `no_sub` images, in phases (seed: 100 epochs without, then
250 with augmentation).

  python main.py --config=configs/pretrain.py:demo --workdir=runs/pretrain_demo
  python main.py --config=configs/pretrain.py:seed --workdir=runs/pretrain_seed

Presets: `seed` is the seed recipe (docs/design.md: patch 4, encoder 256/8/8,
decoder 128/4/8, mask 0.75, AdamW lr 8e-4, wd 0.05) for a GPU; `demo` is a
smaller ViT that finishes on a 2-core CPU in minutes; `demo_long` is demo pretrained
180 epochs instead of 20 (the best measured on `substructure`); `tiny` is for tests.
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  preset = common.parse_preset(arg)
  config = ml_collections.ConfigDict()
  config.stage = "pretrain"
  config.preset = preset
  config.seed = 0
  config.data = common.data_config(preset)
  # The unlabelled pool: the train split's images of these classes, subsampled to
  # `pool_size` (0: all of them). The seed pretrains on no-substructure images only; the
  # demo on every class (measured: features separate the classes better, docs/diagnosis.md).
  config.classes = ("no_sub",) if common.size(preset) == "seed" else ("no_sub", "cdm", "axion")
  config.pool_size = 0
  config.model = common.model_config(preset)
  # Start from public MAE weights (facebookresearch/mae .pth, Hugging Face ViTMAE folder or
  # .safetensors; see mae_jax/models/load.py): the encoder, and the decoder if the file has one.
  # Only a fresh run reads it; a workdir with a checkpoint resumes from that.
  config.init_weights = ""

  # demo: MSE on every patch's high-pass part, normalised per patch. Measured on the
  # demo folders (docs/substructure.md): its frozen features see substructure (probe 0.657
  # against 0.501 for BCE on the removed patches) and read model_ii better (probe 0.913
  # against 0.840, fine-tune at 100 labels per class 0.888 against 0.879; 3 seeds). seed
  # and tiny keep BCE on the removed patches' [0, 1] pixels: not measured at seed scale.
  highpass = common.size(preset) == "demo"
  config.loss = ml_collections.ConfigDict(dict(
      # 'bce': BCE-with-logits on [0, 1] pixels (the seed's); 'mse' is the MAE reference
      type="mse" if highpass else "bce",
      norm_pix=highpass,   # MAE norm_pix_loss (with 'mse')
      # MAE: loss on removed patches only; the seed used all patches
      masked_only=not highpass,
      # 'pixels', or 'highpass' (with 'mse'): each patch minus its own Gaussian blur of
      # `highpass_sigma` pixels, the few-pixel detail substructure adds (docs/substructure.md).
      target="highpass" if highpass else "pixels",
      highpass_sigma=1.0,
  ))

  # Phases run in order; each has its epoch count and whether to augment.
  # demo: 20 epochs of the 3-class pool (1,660 steps at batch 64).
  config.phase_epochs = {"seed": (100, 250), "demo": (7, 13), "tiny": (1, 1)}[common.size(preset)]
  # demo_long: 180 epochs (20 + 160; 37 min on 2 cores beside two other runs). Measured
  # on `substructure` (docs/substructure.md): every MAE score rises with the length (the
  # fine-tune at 300 labels per class 0.600 / 0.667 / 0.717 for 20 / 60 / 180 epochs, on
  # every label 0.821 / 0.835 / 0.854); the demo keeps 20 so its pipeline stays quick.
  if preset == "demo_long":
    config.phase_epochs = (20, 160)
  config.phase_augment = (False, True)

  config.batch_size = {"seed": 256, "demo": 64, "tiny": 8}[common.size(preset)]   # global
  config.eval_batch_size = config.get_ref("batch_size")
  # Examples per device in one micro-batch: a step accumulates its gradient over micro-batches
  # of at most this size (the same update from a smaller working set); 0: the whole batch.
  # On a CPU that made the seed step 1.6x faster at batch 256 (docs/performance.md).
  config.micro_batch = ml_collections.ConfigDict(dict(cpu=8, accelerator=0))
  config.optim = ml_collections.ConfigDict(dict(
      # demo: 5e-4, the best of 3e-3, 5e-4 and 2e-4 measured (docs/diagnosis.md).
      lr={"seed": 8e-4, "demo": 5e-4, "tiny": 1e-3}[common.size(preset)],
      b1=0.9, b2=0.95, weight_decay=0.05,
      warmup_epochs={"seed": 10.0, "demo": 2.0, "tiny": 0.5}[common.size(preset)],
      min_lr=0.0, grad_clip_norm=0.0,
      # No weight decay on biases, norms, tokens (position embeddings are fixed).
      no_decay=(r".*/bias", r".*norm[0-9]*/scale", r".*_token"),
  ))

  config.update(common.run_config(preset))
  # Validation loss every this many epochs (and after the last one).
  config.eval_every_epochs = 1
  config.checkpoint_every_epochs = {"seed": 5, "demo": 5, "tiny": 1}[common.size(preset)]
  config.keep_checkpoints = 3
  config.plot_every_epochs = {"seed": 10, "demo": 5, "tiny": 1}[common.size(preset)]
  config.num_reconstructions = 8      # columns of plots/reconstructions.png
  return common.for_gpu(config, "pretrain")
