"""Shared defaults for every stage's config: data source, simulation, augmentation.

Presets: `demo` (a CPU-minutes simulated set), `demo_long` (demo with the MAE pretrained
9x longer, the best recipe measured on `substructure`), `seed` (the full DeepLense Model II
size, 30k images per class), `seed_gpu` (seed with one GPU's batches) and `tiny` (a few
images, for tests).
"""

from __future__ import annotations

import difflib

import ml_collections

PRESETS = ("demo", "demo_long", "seed", "seed_gpu", "tiny")

# Simulated images per class for each preset (the real Model II set has ~30k).
_SIM_PER_CLASS = {"demo": 3000, "seed": 30000, "tiny": 24}
# Shares of the images in the validation and test splits (by file-name hash). Demo:
# 600 per class each, so a test AUC's bootstrap 95% interval is about +-0.02 wide.
_HELD_OUT = {"demo": 0.2, "seed": 0.1, "tiny": 0.2}


# seed_gpu: the seed recipe with the larger batches one GPU needs to finish it in minutes,
# every learning rate scaled linearly with the batch (LARS's already is, lr_scaling).
GPU_BATCH = {"pretrain": 1024, "probe": 1024, "finetune": 512}


# Presets that are another's sizes with one change: seed_gpu (one GPU's batches, below) and
# demo_long (pretraining 180 epochs instead of 20, configs/pretrain.py).
_SIZE_OF = {"seed_gpu": "seed", "demo_long": "demo"}


def size(preset: str) -> str:
  """The sizes a preset takes its model, data and schedule from (seed_gpu: seed's;
  demo_long: demo's)."""
  return _SIZE_OF.get(preset, preset)


# seed_gpu pretraining: an epoch is 23 steps of 1,024 images (1-3 s of GPU work), so the
# host work after an epoch (validation, figures, the finite check and save of a checkpoint)
# runs every few epochs instead, each a wait on the device (history.json's host_syncs).
GPU_PRETRAIN_EVERY = {"eval_every_epochs": 5, "checkpoint_every_epochs": 10,
                      "plot_every_epochs": 50}


def for_gpu(config: ml_collections.ConfigDict, stage: str) -> ml_collections.ConfigDict:
  """seed_gpu: the stage's batch from GPU_BATCH, its learning rates scaled linearly;
  pretraining's epoch-end work every few epochs (GPU_PRETRAIN_EVERY)."""
  if config.preset != "seed_gpu":
    return config
  if stage == "pretrain":
    config.update(GPU_PRETRAIN_EVERY)
  factor = GPU_BATCH[stage] / config.batch_size
  config.batch_size = GPU_BATCH[stage]
  config.eval_batch_size = GPU_BATCH[stage]
  if "lr" in config.optim:
    config.optim.lr *= factor
  elif config.optim.get("lr_scaling") != "linear":
    config.optim.lr_groups = tuple((p, lr * factor) for p, lr in config.optim.lr_groups)
  return config


def parse_preset(arg: str | None) -> str:
  """The preset named by a config argument (`--config=file.py:PRESET`), default demo."""
  preset = arg or "demo"
  if preset not in PRESETS:
    close = difflib.get_close_matches(preset, PRESETS, n=1)
    raise ValueError(f"unknown preset {preset!r}" + (f"; did you mean {close[0]}?" if close else "")
                     + f" Presets: {', '.join(PRESETS)}")
  return preset


VARIANTS = ("model_ii", "hard", "substructure")


def data_dir(variant: str, preset: str) -> str:
  """The simulated folder of a variant and preset: data/<variant>_sim[_<size>] (a
  preset shares the folder of the preset whose sizes it takes)."""
  return f"data/{variant}_sim" + ("" if size(preset) == "seed" else f"_{size(preset)}")


def data_config(preset: str) -> ml_collections.ConfigDict:
  """Where the images come from and how they are prepared and augmented."""
  data = ml_collections.ConfigDict()
  # 'simulated': generate the folder below with the Model II simulator if needed;
  # 'deeplense': read a DeepLense folder the user brings (never written to).
  data.source = "simulated"
  data.sim = ml_collections.ConfigDict(dict(
      per_class=_SIM_PER_CLASS[size(preset)], seed=0, noise=False,
      workers=0,  # 0: one worker per CPU core
      # 'model_ii': the DeepLense recipe (the main lens is the same in every image);
      # 'hard': main lens, shear and source drawn per image, Euclid noise always on;
      # 'substructure': hard's lens, shear and noise with the source spread of
      # `source_spread` (0: the Model II source ... 3: hard's source), the benchmark where
      # the substructure itself is the signal.
      variant="model_ii",
      source_spread=0,
  ))
  # Follows the variant until set: `--config.data.sim.variant=hard` alone simulates and
  # reads data/hard_sim_<size> (data/hard_sim for seed), never the model_ii folder.
  data.dir = ("data/" + data.sim.get_ref("variant")
              + ("_sim" if size(preset) == "seed" else f"_sim_{size(preset)}"))
  # Prepared splits (arrays, and the tfds dataset with reader=tfds), one sub-folder per
  # fingerprint of the folder's listing and the split settings.
  data.cache_dir = "~/.cache/mae_jax/datasets"
  # Splits by file-name hash: validation chooses epochs and settings, test only reports.
  data.validation_fraction = _HELD_OUT[size(preset)]
  data.test_fraction = _HELD_OUT[size(preset)]
  data.on_bad_file = "error"   # or 'skip': leave bad files out and list them
  # 'files': the project's safe reader (no TensorFlow); 'tfds': the tfds dataset.
  data.reader = "files"
  # 'device': the split in device memory, batches gathered in the step; 'host': batches
  # moved from host memory per chunk of steps; 'auto': device when a device's shard fits
  # `device_memory_share` of its memory (always on CPUs).
  data.feed = "auto"
  data.device_memory_share = 0.5
  data.augment = ml_collections.ConfigDict(dict(flip=True, rot90=True, max_shift=4))
  return data


def run_config(preset: str) -> dict:
  """Keys of every training stage's loop: logging, dispatch, checkpoints, profiling."""
  return dict(
      log_every_steps={"seed": 50, "demo": 10, "tiny": 1}[size(preset)],
      # Training steps per dispatch (lax.scan); metrics stay on the device until logged.
      steps_per_call={"seed": 50, "demo": 10, "tiny": 1}[size(preset)],
      checkpoint_every_steps=0,   # also save every N steps (0: off)
      # (first, last) step of a jax.profiler trace written to WORKDIR/profile, snapped
      # to the loop's chunks (it never splits one: no extra compile); () off.
      profile_steps=(),
      tensorboard="auto",   # 'clu' (needs TensorFlow), 'events' (tensorboard package), 'none'
  )


def model_config(preset: str) -> ml_collections.ConfigDict:
  """ViT encoder / MAE decoder sizes. `seed` is the seed recipe (docs/design.md); `demo` fits a 2-core CPU."""
  sizes = {
      # patch, dim, depth, heads, decoder dim, depth, heads
      "seed": (4, 256, 8, 8, 128, 4, 8),
      "demo": (8, 128, 4, 4, 64, 2, 4),
      "tiny": (16, 32, 2, 2, 16, 1, 2),
  }[size(preset)]
  p, dim, depth, heads, ddim, ddepth, dheads = sizes
  return ml_collections.ConfigDict(dict(
      image_size=64, channels=1, patch=p, dim=dim, depth=depth, heads=heads, mlp_ratio=4.0,
      # Patch embedding: 'linear' (ViT's; public MAE weights load) or 'conv' (a small
      # CNN on each patch alone, `stem_width` and 2x that many channels;
      # docs/substructure.md).
      stem="linear", stem_width=16,
      decoder_dim=ddim, decoder_depth=ddepth, decoder_heads=dheads,
      mask_ratio=0.75,
      # Compute dtype: 'auto' is bfloat16 on a GPU or TPU (float32 params, optimiser state,
      # losses and softmax statistics) and float32 on a CPU; seed_gpu asks bfloat16 outright.
      dtype="bfloat16" if preset == "seed_gpu" else "auto",
  ))


def classifier_config(preset: str, stage: str) -> ml_collections.ConfigDict:
  """Shared keys of the probe and fine-tune stages (the model, data, logging)."""
  config = ml_collections.ConfigDict()
  config.stage = stage
  config.preset = preset
  config.seed = 0
  config.data = data_config(preset)
  config.model = model_config(preset)
  del config.model.decoder_dim, config.model.decoder_depth, config.model.decoder_heads
  del config.model.mask_ratio
  config.model.update(dict(
      # 'vit': the ViT encoder above; 'cnn': the small supervised CNN (models/cnn.py, from
      # scratch only: the study's supervised ceiling), stages of `cnn_widths` channels.
      arch="vit",
      cnn_widths=(16, 32, 64, 128), cnn_stem=2,
      head="mlp",              # the seed's 256->512->256 MLP head; 'linear' is MAE's BN + linear
      head_hidden=(512, 256),
      pool="cls",              # CLS token, or 'mean' of the patch tokens
      feature_block=-1,        # -1: after the last block and the final norm; i: block i
      dropout=0.2,
      drop_path=0.0,
  ))
  # The labelled budget: this many images per class from the train split (stratified,
  # drawn with `seed`); 0: all of them.
  config.labels_per_class = 0
  # Choose the frozen features' block and pooling on validation (probe: needs a frozen
  # encoder and no augmentation).
  config.select_features = False
  # The stage whose latest checkpoint initialises this one (`--config.init_from=DIR`),
  # and params never taken from it (the new head).
  config.init_from = f"runs/pretrain_{preset}"
  config.init_from_stage = "pretrain"
  config.dont_load = (r"classifier/.*",)
  # Or start the encoder from public MAE weights instead of `init_from` (a facebookresearch/mae
  # .pth, a Hugging Face ViTMAE folder or .safetensors; see mae_jax/models/load.py).
  config.init_weights = ""
  # Off by default: in Model II every lens has the same orientation and centre, and the
  # classes differ by ~2% in ring radius (~0.2 px); shifts of a few pixels hide that signal.
  # Measured (demo fine-tune, 15 epochs): macro AUC 0.55 with flips+rot90+shift 4, 0.91 without.
  config.augment = False
  config.label_smoothing = 0.0
  # Fit the radial-profile baseline on the same labelled images and report it beside this
  # stage. A chain whose stages share the labels needs it once (the accelerator run turns
  # it off in the fine-tune: the probe's is the same).
  config.fit_baseline = True
  # What validation and test are scored with (mae_jax/eval/evaluators.py), and the
  # validation number that chooses the epoch test reports.
  config.evals = ("auc", "accuracy", "balanced_accuracy", "ece", "confusion_matrix")
  config.select_by = "macro_auc"
  # Validation every this many epochs, and after the last one.
  config.eval_every_epochs = 1
  config.update(run_config(preset))
  config.checkpoint_every_epochs = 1
  config.keep_checkpoints = 2
  return config


def classifier_optim(**overrides) -> ml_collections.ConfigDict:
  """Optimiser keys read by `mae_jax.train.optim.classifier_optimizer`."""
  optim = dict(
      name="adamw", lr_groups=((r".*", 1e-3),), lr_scaling="none", layer_decay=1.0,
      frozen=(), weight_decay=0.0, b1=0.9, b2=0.999, momentum=0.9, trust_coefficient=0.001,
      warmup_epochs=1.0, min_lr=0.0, grad_clip_norm=0.0,
      no_decay=(r".*/bias", r".*norm[0-9]*/scale", r".*_token", r"classifier/bn[0-9]*/.*"),
  )
  optim.update(overrides)
  return ml_collections.ConfigDict(optim)
