"""Config checks that run before any data is read or any function compiled.

Every problem found is reported at once, one line each, in a `ConfigError`:
unknown or missing keys (with the closest valid key), impossible model or batch
settings, a missing or mismatched source checkpoint, an unwritable workdir, a
data folder without the class folders.
"""

from __future__ import annotations

import difflib
import importlib
import json
import os
from pathlib import Path
from typing import Any

import ml_collections

from mae_jax.data import layout

TRAINING_STAGES = ("pretrain", "probe", "finetune")
_DTYPES = ("float32", "bfloat16")


class ConfigError(ValueError):
  """One or more config problems; the message lists them all."""


def flat_keys(config: ml_collections.ConfigDict | dict, prefix: str = "") -> dict[str, Any]:
  """`a.b.c` -> value for every leaf of a (nested) config."""
  out = {}
  for k, v in config.items():
    name = f"{prefix}{k}"
    if isinstance(v, (dict, ml_collections.ConfigDict)):
      out.update(flat_keys(v, name + "."))
    else:
      out[name] = v
  return out


def reference_config(stage: str, preset: str | None) -> ml_collections.ConfigDict | None:
  """The stock config of `stage` (`configs/<stage>.py`), or None if there is none."""
  try:
    module = importlib.import_module(f"configs.{stage}")
  except ImportError:
    return None
  get = getattr(module, "get_config", None)
  return get(preset) if get else None


def key_problems(config: ml_collections.ConfigDict,
                 reference: ml_collections.ConfigDict) -> list[str]:
  """Keys `config` has that `reference` lacks (with the closest valid one), and keys it misses."""
  ours, valid = flat_keys(config), flat_keys(reference)
  problems = []
  for key in sorted(set(ours) - set(valid)):
    siblings = [v for v in valid if v.rsplit(".", 1)[0] == key.rsplit(".", 1)[0]] or list(valid)
    close = difflib.get_close_matches(key, siblings, n=1, cutoff=0.5) or \
        difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]}?" if close else ""
    problems.append(f"unknown config key {key}{hint}")
  for key in sorted(set(valid) - set(ours)):
    problems.append(f"missing config key {key} (default: {valid[key]!r})")
  return problems


def _model_problems(model: ml_collections.ConfigDict) -> list[str]:
  problems = []
  get = model.get
  if get("image_size") and get("patch") and model.image_size % model.patch:
    problems.append(f"model.image_size={model.image_size} is not divisible by "
                    f"model.patch={model.patch}")
  for dim, heads in (("dim", "heads"), ("decoder_dim", "decoder_heads")):
    if get(dim) and get(heads) and model[dim] % model[heads]:
      problems.append(f"model.{dim}={model[dim]} is not divisible by model.{heads}={model[heads]}")
  if "mask_ratio" in model and not 0.0 <= model.mask_ratio < 1.0:
    problems.append(f"model.mask_ratio={model.mask_ratio} must lie in [0, 1)")
  if "dtype" in model and model.dtype not in _DTYPES:
    problems.append(f"model.dtype={model.dtype!r} must be one of {', '.join(_DTYPES)}")
  return problems


def _batch_problems(config: ml_collections.ConfigDict) -> list[str]:
  import jax  # pylint: disable=g-import-not-at-top
  devices, processes = jax.device_count(), jax.process_count()
  problems = []
  for key in ("batch_size", "eval_batch_size"):
    if key in config:
      b = config[key]
      if not isinstance(b, int) or b < 1 or b % devices or b % processes:
        problems.append(f"{key}={b} must be a positive multiple of the device count "
                        f"({devices}), e.g. {max(devices, (b if isinstance(b, int) else 0) // devices * devices)}")
  return problems


def _schedule_problems(config: ml_collections.ConfigDict) -> list[str]:
  problems = []
  if "phase_epochs" in config:
    epochs, augment = tuple(config.phase_epochs), tuple(config.get("phase_augment", ()))
    if not epochs or len(epochs) != len(augment) or any(
        not isinstance(e, int) or e < 0 for e in epochs):
      problems.append(f"phase_epochs={epochs} and phase_augment={augment} must be equally "
                      "long (one entry per phase), with whole epochs >= 0")
  if "epochs" in config and (not isinstance(config.epochs, int) or config.epochs < 1):
    problems.append(f"epochs={config.epochs} must be a whole number >= 1")
  return problems


def _data_problems(data: ml_collections.ConfigDict) -> list[str]:
  from mae_jax.data import source  # pylint: disable=g-import-not-at-top
  problems = []
  if data.get("source") not in source.SOURCES:
    problems.append(f"data.source={data.get('source')!r} must be one of {', '.join(source.SOURCES)}")
  fraction = data.get("validation_fraction")
  if fraction is not None and not 0.0 < fraction < 1.0:
    problems.append(f"data.validation_fraction={fraction} must lie in (0, 1)")
  from mae_jax.data import simulate  # pylint: disable=g-import-not-at-top
  variant = data.get("sim", {}).get("variant")
  if variant is not None and variant not in simulate.VARIANTS:
    problems.append(f"data.sim.variant={variant!r} must be one of {', '.join(simulate.VARIANTS)}")
  if data.get("on_bad_file") not in (None, "error", "skip"):
    problems.append(f"data.on_bad_file={data.on_bad_file!r} must be 'error' or 'skip'")
  if data.get("source") == "deeplense":
    root = Path(data.dir)
    missing = [c for c in layout.CLASS_NAMES if not (root / c).is_dir()]
    if missing:
      what = "does not exist" if not root.is_dir() else f"lacks the class folder(s) {', '.join(missing)}"
      problems.append(f"data folder {root} {what}.\n" + layout.expected_layout_message(root))
  return problems


def _source_checkpoint_problems(config: ml_collections.ConfigDict, workdir: Path) -> list[str]:
  """A probe / fine-tune that starts fresh needs its `init_from` stage's checkpoint,
  made with the same encoder sizes."""
  from mae_jax import checkpoint  # pylint: disable=g-import-not-at-top
  if not config.get("init_from") or config.get("init_weights") or \
      checkpoint.latest_step(workdir) is not None:
    return []  # from scratch or public weights, or resuming this workdir's own checkpoint
  source = Path(config.init_from)
  if checkpoint.latest_step(source) is None:
    make = (f"python main.py --config=configs/{config.get('init_from_stage', 'pretrain')}.py:"
            f"{config.get('preset', 'demo')} --workdir={source}")
    return [f"init_from: no checkpoint in {source.absolute() / 'checkpoints'}; make one with:\n"
            f"  {make}"]
  saved = source / "config.json"
  if not saved.exists():
    return []
  theirs = json.loads(saved.read_text()).get("model", {})
  return [f"init_from: the source stage {source} used model.{k}={theirs[k]}, this one "
          f"model.{k}={config.model[k]}; the encoder config must match"
          for k in checkpoint.ENCODER_KEYS
          if k in theirs and k in config.model and theirs[k] != config.model[k]]


def problems(config: ml_collections.ConfigDict, workdir: str | os.PathLike[str]) -> list[str]:
  """Every problem of `config` for a run in `workdir`, cheapest checks first."""
  found = []
  reference = reference_config(config.get("stage", ""), config.get("preset"))
  if reference is not None:
    found += key_problems(config, reference)
  if "model" in config:
    found += _model_problems(config.model)
  if config.get("stage") in TRAINING_STAGES:
    found += _batch_problems(config) + _schedule_problems(config)
  if "data" in config:
    found += _data_problems(config.data)
  from mae_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  # Process 0 writes the run's files (other processes only join collective saves).
  unwritable = workdir_lib.writable_problem(workdir) if jax.process_index() == 0 else None
  weights = config.get("init_weights")
  if weights and not Path(weights).exists():
    found.append(f"init_weights={weights}: no such file or folder (a facebookresearch/mae .pth, "
                 "a Hugging Face ViTMAE folder or .safetensors)")
  if unwritable:
    found.append(unwritable)
  elif config.get("stage") in ("probe", "finetune"):
    found += _source_checkpoint_problems(config, Path(workdir))
  return found


def check(config: ml_collections.ConfigDict, workdir: str | os.PathLike[str]) -> None:
  """Raises ConfigError listing every problem found; returns quietly if none."""
  found = problems(config, workdir)
  if found:
    lines = "\n".join(f"  - {p}" for p in found)
    raise ConfigError(f"{len(found)} config problem(s), nothing was run:\n{lines}")
