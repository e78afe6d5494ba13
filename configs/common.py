"""Shared defaults for every stage's config: data source, simulation, augmentation.

Presets: `demo` (a CPU-minutes simulated set), `seed` (the full DeepLense Model II
size, 30k images per class) and `tiny` (a few images, for tests).
"""

from __future__ import annotations

import difflib

import ml_collections

PRESETS = ("demo", "seed", "tiny")

# Simulated images per class for each preset (the real Model II set has ~30k).
_SIM_PER_CLASS = {"demo": 1000, "seed": 30000, "tiny": 24}


def parse_preset(arg: str | None) -> str:
  """The preset named by a config argument (`--config=file.py:PRESET`), default demo."""
  preset = arg or "demo"
  if preset not in PRESETS:
    close = difflib.get_close_matches(preset, PRESETS, n=1)
    raise ValueError(f"unknown preset {preset!r}" + (f"; did you mean {close[0]}?" if close else "")
                     + f" Presets: {', '.join(PRESETS)}")
  return preset


def data_config(preset: str) -> ml_collections.ConfigDict:
  """Where the images come from and how they are prepared and augmented."""
  data = ml_collections.ConfigDict()
  # 'simulated': generate the folder below with the Model II simulator if needed;
  # 'deeplense': read a DeepLense folder the user brings (never written to).
  data.source = "simulated"
  data.sim = ml_collections.ConfigDict(dict(
      per_class=_SIM_PER_CLASS[preset], seed=0, noise=False,
      workers=0,  # 0: one worker per CPU core
      # 'model_ii': the DeepLense recipe (the main lens is the same in every image);
      # 'hard': main lens, shear and source drawn per image, Euclid noise always on.
      variant="model_ii",
  ))
  # Follows the variant until set: `--config.data.sim.variant=hard` alone simulates and
  # reads data/hard_sim_<preset> (data/hard_sim for seed), never the model_ii folder.
  data.dir = ("data/" + data.sim.get_ref("variant")
              + ("_sim" if preset == "seed" else f"_sim_{preset}"))
  # Prepared tfds datasets, one sub-folder per source fingerprint.
  data.cache_dir = "~/tensorflow_datasets/mae_jax"
  data.validation_fraction = 0.1
  data.on_bad_file = "error"   # or 'skip': leave bad files out and list them
  data.cache_in_memory = True
  data.augment = ml_collections.ConfigDict(dict(flip=True, rot90=True, max_shift=4))
  return data


def model_config(preset: str) -> ml_collections.ConfigDict:
  """ViT encoder / MAE decoder sizes. `seed` is the seed recipe (docs/design.md); `demo` fits a 2-core CPU."""
  sizes = {
      # patch, dim, depth, heads, decoder dim, depth, heads
      "seed": (4, 256, 8, 8, 128, 4, 8),
      "demo": (8, 128, 4, 4, 64, 2, 4),
      "tiny": (16, 32, 2, 2, 16, 1, 2),
  }[preset]
  p, dim, depth, heads, ddim, ddepth, dheads = sizes
  return ml_collections.ConfigDict(dict(
      image_size=64, channels=1, patch=p, dim=dim, depth=depth, heads=heads, mlp_ratio=4.0,
      decoder_dim=ddim, decoder_depth=ddepth, decoder_heads=dheads,
      mask_ratio=0.75,
      dtype="float32",
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
      head="mlp",              # the seed's 256->512->256 MLP head; 'linear' is MAE's BN + linear
      head_hidden=(512, 256),
      pool="cls",              # CLS token after the final norm, or 'mean' of the patch tokens
      dropout=0.2,
      drop_path=0.0,
  ))
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
  config.log_every_steps = {"seed": 50, "demo": 10, "tiny": 1}[preset]
  config.checkpoint_every_epochs = 1
  config.checkpoint_every_steps = 0
  config.keep_checkpoints = 2
  return config


def classifier_optim(**overrides) -> ml_collections.ConfigDict:
  """Optimiser keys read by `mae_jax.optim.classifier_optimizer`."""
  optim = dict(
      name="adamw", lr_groups=((r".*", 1e-3),), lr_scaling="none", layer_decay=1.0,
      frozen=(), weight_decay=0.0, b1=0.9, b2=0.999, momentum=0.9, trust_coefficient=0.001,
      warmup_epochs=1.0, min_lr=0.0, grad_clip_norm=0.0,
      no_decay=(r".*/bias", r".*norm[0-9]*/scale", r".*_token", r"classifier/bn[0-9]*/.*"),
  )
  optim.update(overrides)
  return ml_collections.ConfigDict(optim)
