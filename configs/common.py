"""What every stage's config shares: the argument, the presets, the data, the model and
the loop keys, and the classifier stages' base and optimisers.

A config file's argument is `PRESET[,OPTION=VALUE...]`: `configs/finetune.py:demo`,
`configs/finetune.py:tiny,arch=cnn`. Each file's base is the `demo` recipe; a preset
states only what differs from it, in two tables of dotted keys: `SHARED` (sizes every
stage that has the key takes: data, model, loop) and the stage file's own `PRESETS`.
Options choose keys that exist only with them (the CNN's with `arch=cnn`).

Presets: `demo` (a CPU-minutes simulated set, the base), `demo_long` (demo with the MAE
pretrained 180 epochs), `seed` (the full DeepLense Model II size and the seed recipe),
`seed_gpu` (seed with one GPU's batches) and `tiny` (a few images, for tests).
"""

from __future__ import annotations

import difflib
from typing import Any, Mapping

import ml_collections

from mae_jax.data import simulate

PRESETS = ("demo", "demo_long", "seed", "seed_gpu", "tiny")
VARIANTS = simulate.VARIANTS

# Presets that are another's sizes with one change: demo_long (the pretraining's length,
# configs/pretrain.py) and seed_gpu (one GPU's batches).
_SIZE_OF = {"seed_gpu": "seed", "demo_long": "demo"}

_SEED = {
    "data.sim.per_class": 30000, "data.validation_fraction": 0.1, "data.test_fraction": 0.1,
    "model.patch": 4, "model.dim": 256, "model.depth": 8, "model.heads": 8,
    "model.decoder_dim": 128, "model.decoder_depth": 4, "model.decoder_heads": 8,
    "log_every_steps": 50, "steps_per_call": 50,
}
# Per preset, what every stage that has the key changes from the demo base.
SHARED: dict[str, dict[str, Any]] = {
    "demo": {},
    "demo_long": {},
    "tiny": {
        "data.sim.per_class": 24,
        "model.patch": 16, "model.dim": 32, "model.depth": 2, "model.heads": 2,
        "model.decoder_dim": 16, "model.decoder_depth": 1, "model.decoder_heads": 2,
        "log_every_steps": 1, "steps_per_call": 1,
    },
    # The seed recipe (docs/design.md): patch 4, encoder 256/8/8, decoder 128/4/8.
    "seed": _SEED,
    "seed_gpu": {**_SEED, "model.dtype": "bfloat16"},
}
# seed_gpu: one GPU's batches; each stage scales its learning rates linearly with them.
GPU_BATCH = {"pretrain": 1024, "probe": 1024, "finetune": 512}


def size(preset: str) -> str:
  """The preset whose data folder a preset shares (seed_gpu: seed's; demo_long: demo's)."""
  return _SIZE_OF.get(preset, preset)


def parse(arg: str | None, options: Mapping[str, tuple[str, ...]] = ()
          ) -> tuple[str, dict[str, str]]:
  """(preset, {option: value}) of a config argument `PRESET[,OPTION=VALUE...]` (default
  demo); `options` names each option a file takes and its values, the first the default."""
  preset, *rest = (arg or "demo").split(",")
  preset = preset or "demo"
  if preset not in PRESETS:
    close = difflib.get_close_matches(preset, PRESETS, n=1)
    raise ValueError(f"unknown preset {preset!r}" + (f"; did you mean {close[0]}?" if close else "")
                     + f" Presets: {', '.join(PRESETS)}")
  chosen = {name: values[0] for name, values in dict(options).items()}
  for item in rest:
    name, _, value = item.partition("=")
    if name not in chosen or value not in options[name]:
      known = ", ".join(f"{n}={'|'.join(v)}" for n, v in dict(options).items()) or "none"
      raise ValueError(f"unknown option {item!r} in the config argument; options: {known}")
    chosen[name] = value
  return preset, chosen


def override(config: ml_collections.ConfigDict, values: Mapping[str, Any],
             missing_ok: bool = False) -> ml_collections.ConfigDict:
  """Sets each dotted key of `values` in `config`; a key `config` lacks is an error (a
  preset naming a key no stage has), or skipped with `missing_ok` (`SHARED`'s keys)."""
  for key, value in values.items():
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      node = node.get(p) if isinstance(node, ml_collections.ConfigDict) else None
    if node is None or leaf not in node:
      if missing_ok:
        continue
      raise KeyError(f"preset override {key}: the config has no such key")
    node[leaf] = value
  return config


def apply_preset(config: ml_collections.ConfigDict, preset: str,
                 own: Mapping[str, Mapping[str, Any]]) -> ml_collections.ConfigDict:
  """`SHARED[preset]` where the config has the key, then the stage's `own[preset]`."""
  override(config, SHARED[preset], missing_ok=True)
  return override(config, own.get(preset, {}))


def data_dir(variant: str, preset: str) -> str:
  """The simulated folder of a variant and preset: data/<variant>_sim[_<size>] (a
  preset shares the folder of the preset whose sizes it takes)."""
  return f"data/{variant}_sim" + ("" if size(preset) == "seed" else f"_{size(preset)}")


def data_config(preset: str) -> ml_collections.ConfigDict:
  """Where the images come from and how they are prepared and augmented."""
  data = ml_collections.ConfigDict()
  # 'simulated': generate the folder below with the simulator if needed;
  # 'deeplense': read a DeepLense folder the user brings (never written to).
  data.source = "simulated"
  data.sim = ml_collections.ConfigDict(dict(
      per_class=3000, seed=0, noise=False,
      workers=0,  # 0: one worker per CPU core
      # One of simulate.VARIANTS (docs/data.md): 'model_ii' (the DeepLense recipe),
      # 'hard', 'substructure' (with `source_spread` 0..3 of the source's ranges).
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
  data.validation_fraction = 0.2
  data.test_fraction = 0.2
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


def loop_keys() -> dict[str, Any]:
  """Keys of every training stage's loop: logging, dispatch, checkpoints, profiling."""
  return dict(
      log_every_steps=10,
      # Training steps per dispatch (lax.scan); metrics stay on the device until logged.
      steps_per_call=10,
      checkpoint_every_steps=0,   # also save every N steps (0: off)
      # (first, last) step of a jax.profiler trace written to WORKDIR/profile, snapped
      # to the loop's chunks (it never splits one: no extra compile); () off.
      profile_steps=(),
      tensorboard="auto",   # 'clu' (needs TensorFlow), 'events' (tensorboard package), 'none'
  )


def vit_config() -> dict[str, Any]:
  """The ViT encoder (demo sizes; `SHARED` sets the others)."""
  return dict(
      image_size=64, channels=1, patch=8, dim=128, depth=4, heads=4, mlp_ratio=4.0,
      # Patch embedding: 'linear' (ViT's; public MAE weights load) or 'conv' (a small
      # CNN on each patch alone, `stem_width` and 2x that many channels;
      # docs/substructure.md).
      stem="linear", stem_width=16,
      # Compute dtype: 'auto' is bfloat16 on a GPU or TPU (float32 params, optimiser state,
      # losses and softmax statistics) and float32 on a CPU.
      dtype="auto",
  )


def classifier_config(preset: str, stage: str, arch: str = "vit") -> ml_collections.ConfigDict:
  """The probe's and fine-tune's shared base: the model (the ViT encoder, or with
  `arch='cnn'` the small supervised CNN), the labels, where the weights start, evaluation
  and the loop."""
  config = ml_collections.ConfigDict()
  config.stage = stage
  config.preset = preset
  config.seed = 0
  config.data = data_config(preset)
  head = dict(
      head="mlp",              # the seed's 256->512->256 MLP head; 'linear' is MAE's BN + linear
      head_hidden=(512, 256), dropout=0.2)
  if arch == "cnn":
    # The small supervised CNN (models/cnn.py), from scratch only: the study's ceiling.
    # Stages of `cnn_widths` channels, each halving the image after a `cnn_stem` stem.
    config.model = ml_collections.ConfigDict(dict(
        image_size=64, channels=1, dtype="auto", arch="cnn", cnn_widths=(16, 32, 64, 128),
        cnn_stem=2, **head))
  else:
    config.model = ml_collections.ConfigDict(dict(
        **vit_config(), arch="vit", **head,
        pool="cls",              # CLS token, or 'mean' of the patch tokens
        feature_block=-1,        # -1: after the last block and the final norm; i: block i
        drop_path=0.0))
  # The labelled budget: this many images per class from the train split (stratified,
  # drawn with `seed`); 0: all of them.
  config.labels_per_class = 0
  if arch != "cnn":
    # The stage whose latest checkpoint initialises this one (`--config.init_from=DIR`),
    # and params never taken from it (the new head); or public MAE weights instead (a
    # facebookresearch/mae .pth, a Hugging Face ViTMAE folder or .safetensors).
    config.init_from = f"runs/pretrain_{preset}"
    config.init_from_stage = "pretrain"
    config.dont_load = (r"classifier/.*",)
    config.init_weights = ""
  # Off by default: in Model II every lens has the same orientation and centre, and the
  # classes differ by ~2% in ring radius (~0.2 px); shifts of a few pixels hide that
  # signal (docs/results.md).
  config.augment = False
  config.label_smoothing = 0.0
  # Fit the radial-profile baseline on the same labelled images and report it beside this
  # stage (a chain whose stages share the labels needs it once).
  config.fit_baseline = True
  # What validation and test are scored with (mae_jax/eval/evaluators.py), and the
  # validation number that chooses the epoch test reports.
  config.evals = ("auc", "accuracy", "balanced_accuracy", "ece", "confusion_matrix")
  config.select_by = "macro_auc"
  # Validation every this many epochs, and after the last one.
  config.eval_every_epochs = 1
  config.update(loop_keys())
  config.checkpoint_every_epochs = 1
  config.keep_checkpoints = 2
  return config


_NO_DECAY = (r".*/bias", r".*norm[0-9]*/scale", r".*_token", r"classifier/bn[0-9]*/.*")


def adamw(**overrides) -> ml_collections.ConfigDict:
  """A fine-tune's AdamW (`mae_jax.train.optim`): per-group rates, warmup then cosine."""
  return ml_collections.ConfigDict(dict(dict(
      name="adamw", lr_groups=((r".*", 1e-3),), lr_scaling="none", layer_decay=1.0, frozen=(),
      weight_decay=0.0, b1=0.9, b2=0.999, warmup_epochs=1.0, min_lr=0.0, grad_clip_norm=0.0,
      no_decay=_NO_DECAY), **overrides))


def lars(**overrides) -> ml_collections.ConfigDict:
  """A probe's LARS (MAE's: trust ratio and decay on >= 2-D params only)."""
  return ml_collections.ConfigDict(dict(dict(
      name="lars", lr_groups=((r".*", 1e-3),), lr_scaling="none", frozen=(), weight_decay=0.0,
      momentum=0.9, trust_coefficient=0.001, warmup_epochs=1.0, min_lr=0.0, grad_clip_norm=0.0,
      no_decay=_NO_DECAY), **overrides))
