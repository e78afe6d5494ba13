"""Config checks that run before any data is read or any function compiled.

Every problem found is reported at once, one line each, in a `ConfigError`. This module
gathers them: each owner checks its own keys (`models.build.problems`, `objectives`,
`data.source.problems`, `train.optim.problems`, `train.loop.problems`,
`eval.evaluators.problems`, `eval.online_probe.problems`); here are the checks of the
config as a whole (unknown or missing keys against the stock config, with the closest
valid key), of the stage's own keys, and of what lies outside the config (a missing or
mismatched source checkpoint, an unwritable workdir).
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Any, Sequence

import jax
import ml_collections
from absl import logging
from flax import traverse_util

from mae_jax import objectives
from mae_jax.data import source
from mae_jax.eval import evaluators
from mae_jax.eval import online_probe
from mae_jax.models import build
from mae_jax.runtime import checkpoint
from mae_jax.runtime import errors
from mae_jax.runtime import parallel
from mae_jax.runtime import workdir as workdir_lib
from mae_jax.train import loop
from mae_jax.train import optim

TRAINING_STAGES = ("pretrain", "probe", "finetune")
OPTION_CHANGED = " comes with its own keys"
ConfigError = errors.ConfigError


def flat_keys(config: ml_collections.ConfigDict | dict) -> dict[str, Any]:
  """`a.b.c` -> value for every leaf of a (nested) config."""
  if isinstance(config, ml_collections.ConfigDict):
    config = config.to_dict()
  return traverse_util.flatten_dict(config, sep=".")


def load_config_file(file: str, preset: str | None) -> ml_collections.ConfigDict:
  """`get_config(preset)` of a config file given by path (as `--config=FILE:PRESET` names it).

  Raises:
    errors.ConfigError: no such file, or it has no `get_config`, or refuses the preset.
  """
  path = Path(file)
  spec = importlib.util.spec_from_file_location(f"mae_jax_config_{path.stem}", path)
  if spec is None or not path.is_file():
    raise ConfigError(f"config file {file} not found")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config file {file} defines no get_config()")
  try:
    return module.get_config(preset)
  except ValueError as e:
    raise ConfigError(f"{file}: {e}") from None


# Keys that exist in some configs only: where a config lacks one, where it lives instead.
ELSEWHERE = {
    "model.cnn_widths": "the CNN's key: choose the CNN with the config argument, "
                        "--config=configs/finetune.py:PRESET,arch=cnn",
    "optim.momentum": "LARS's key (the probe's optimiser)",
    "optim.trust_coefficient": "LARS's key (the probe's optimiser)",
    "optim.b1": "AdamW's key (the fine-tune's optimiser)",
    "optim.b2": "AdamW's key (the fine-tune's optimiser)",
    "optim.layer_decay": "AdamW's key for the ViT's encoder (the fine-tune's)",
    "select_features": "the probe's key (its frozen features)",
    "trainable_blocks": "the ViT fine-tune's key",
}
ELSEWHERE["model.cnn_stem"] = ELSEWHERE["model.cnn_widths"]
# The study's keys that became entries of its arm table (configs/study.py).
ELSEWHERE.update({
    "partial_blocks": "renamed arm_table.mae_partial.trainable_blocks",
    "scratch_lrs": "renamed arm_table.scratch_finetune.lrs",
    "supervised_lrs.supervised": "renamed arm_table.supervised.lrs (a tuple of rates)",
    "supervised_lrs.supervised_cnn": "renamed arm_table.supervised_cnn.lrs (a tuple of rates)",
    "supervised_lrs": "renamed arm_table.supervised.lrs and arm_table.supervised_cnn.lrs",
})


def unknown_key_message(key: str, valid: dict[str, Any] | list[str]) -> str:
  """`unknown config key KEY; did you mean K?`: the closest valid key, siblings first;
  for a key other configs have (`ELSEWHERE`), where it lives."""
  leaf_path = next((k for k in ELSEWHERE if key == k or key.endswith("." + k)), None)
  if leaf_path:
    return f"unknown config key {key}: {ELSEWHERE[leaf_path]}"
  valid = list(valid)
  parent = key.rsplit(".", 1)[0] if "." in key else ""
  siblings = [v for v in valid if (v.rsplit(".", 1)[0] if "." in v else "") == parent]
  leaf = key.rsplit(".", 1)[-1]
  close = [parent + "." + c if parent else c for c in difflib.get_close_matches(
      leaf, [v.rsplit(".", 1)[-1] for v in siblings], n=1, cutoff=0.5)]
  close = close or difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
  hint = f"; did you mean {close[0]}?" if close else ""
  return f"unknown config key {key}{hint}"


def _config_module(stage: str) -> Any:
  try:
    return importlib.import_module(f"configs.{stage}")
  except ImportError:
    return None


def reference_config(stage: str, preset: str | None,
                     options: dict[str, str] | None = None) -> ml_collections.ConfigDict | None:
  """The stock config of `stage` (`configs/<stage>.py`) for `preset` and the config
  argument's `options` (`{"arch": "cnn"}`), or None if there is none."""
  get = getattr(_config_module(stage), "get_config", None)
  if get is None:
    return None
  return get(",".join([preset or "demo", *(f"{k}={v}" for k, v in (options or {}).items())]))


def option_keys(stage: str) -> tuple[str, ...]:
  """The dotted keys the config-argument options of `stage` set (`OPTION_KEYS`)."""
  return tuple(getattr(_config_module(stage), "OPTION_KEYS", {}).values())


def option_defaults(stage: str) -> dict[str, str]:
  """Each config-argument option of `stage` and its default value."""
  return {k: v[0] for k, v in getattr(_config_module(stage), "OPTIONS", {}).items()}


def options_of(config: ml_collections.ConfigDict) -> dict[str, str]:
  """The config-argument options a config was made with, read from the keys they set
  (`configs/<stage>.py`'s OPTION_KEYS: option -> dotted key)."""
  keys = getattr(_config_module(config.get("stage", "")), "OPTION_KEYS", {})
  out = {}
  for option, dotted in keys.items():
    node = config
    for part in dotted.split("."):
      node = node.get(part) if hasattr(node, "get") else None
    if node is not None:
      out[option] = node
  return out


def _reference_problems(config: ml_collections.ConfigDict) -> list[str]:
  """Unknown and missing keys against the stock config of the same stage, preset and
  options; one line where an option's key was changed without its keys (an override of
  `model.arch` instead of the config argument's `arch=cnn`)."""
  stage, preset = config.get("stage", ""), config.get("preset")
  module = _config_module(stage)
  options = options_of(config)
  try:
    reference = reference_config(stage, preset, options)
  except ValueError as e:   # an option's key set to a value no option has
    return [f"{e}"]
  if reference is None:
    return []
  found = key_problems(config, reference)
  if not found:
    return []
  for option, values in getattr(module, "OPTIONS", {}).items():
    for value in values:
      if value != options.get(option) and not key_problems(
          config, reference_config(stage, preset, {**options, option: value})):
        return [f"{module.OPTION_KEYS[option]}={options[option]!r}{OPTION_CHANGED}: "
                f"choose it in the config argument, --config=configs/{stage}.py:"
                f"{preset},{option}={options[option]}"]
  return found


def key_problems(config: ml_collections.ConfigDict,
                 reference: ml_collections.ConfigDict) -> list[str]:
  """Keys `config` has that `reference` lacks (with the closest valid one), and keys it misses."""
  ours, valid = flat_keys(config), flat_keys(reference)
  problems = []
  for key in sorted(set(ours) - set(valid)):
    problems.append(unknown_key_message(key, valid))
  for key in sorted(set(valid) - set(ours)):
    problems.append(f"missing config key {key} (default: {valid[key]!r})")
  return problems


def _partial_problems(config: ml_collections.ConfigDict) -> list[str]:
  """`trainable_blocks`: -1 (every param) or a count of the encoder's last blocks."""
  k = config.get("trainable_blocks", -1)
  depth = config.get("model", {}).get("depth", 0)
  if isinstance(k, bool) or not isinstance(k, int) or not -1 <= k <= depth:
    return [f"trainable_blocks={k!r} must be -1 (every param trains) or a whole number of "
            f"the encoder's last blocks, 0 to model.depth={depth}"]
  return []


def _cnn_problems(config: ml_collections.ConfigDict) -> list[str]:
  """The CNN is a supervised model trained from scratch: no pretrained encoder to freeze."""
  if config.get("model", {}).get("arch") == "cnn" and config.get("optim", {}).get("frozen"):
    return ["model.arch='cnn' has no pretrained encoder to freeze: set optim.frozen=()"]
  return []


def _batch_problems(config: ml_collections.ConfigDict) -> list[str]:
  found = [parallel.batch_problem(config[key], key)
           for key in ("batch_size", "eval_batch_size") if key in config]
  return [p for p in found if p]


def _micro_batch_problems(config: ml_collections.ConfigDict) -> list[str]:
  return [f"micro_batch.{backend}={size} must be a whole number >= 0 (0: the whole batch)"
          for backend, size in config.get("micro_batch", {}).items()
          if not isinstance(size, int) or isinstance(size, bool) or size < 0]


def _stage_problems(config: ml_collections.ConfigDict) -> list[str]:
  """The stage's own keys: phases, pool and label budgets, epochs, frozen features."""
  problems = []
  if "phase_epochs" in config:
    epochs, augment = tuple(config.phase_epochs), tuple(config.get("phase_augment", ()))
    if not epochs or len(epochs) != len(augment) or any(
        not isinstance(e, int) or e < 0 for e in epochs):
      problems.append(f"phase_epochs={epochs} and phase_augment={augment} must be equally "
                      "long (one entry per phase), with whole epochs >= 0")
  for key in ("labels_per_class", "pool_size"):
    if key in config and (not isinstance(config[key], int) or config[key] < 0):
      problems.append(f"{key}={config[key]} must be a whole number >= 0 (0: all)")
  if config.get("select_features") and (config.get("augment") or not any(
      p in ("encoder/.*", r"encoder/.*") for p in config.get("optim", {}).get("frozen", ()))):
    problems.append("select_features=True needs the encoder frozen (optim.frozen=('encoder/.*',)) "
                    "and augment=False: the features are computed once and chosen on validation")
  if "epochs" in config and (not isinstance(config.epochs, int) or config.epochs < 1):
    problems.append(f"epochs={config.epochs} must be a whole number >= 1")
  return problems


def _source_model(source: Path) -> dict:
  saved = source / workdir_lib.CONFIG_FILE
  return json.loads(saved.read_text()).get("model", {}) if saved.exists() else {}


def encoder_adaptations(model: ml_collections.ConfigDict, source: Path) -> list[str]:
  """How an encoder from the stage in `source` is adapted to `model`'s image size, in a
  line: the same patch on a new grid, its fixed sin-cos positions computed for that grid
  (one band adapted to several is `load.adapt_bands`', logged where it is done)."""
  theirs, notes = _source_model(source), []
  if theirs.get("image_size") not in (None, model.image_size):
    grid, old = model.image_size // model.patch, theirs["image_size"] // model.patch
    notes.append(f"the encoder of {source} ({theirs['image_size']} px, a {old}x{old} grid of "
                 f"patches) runs at {model.image_size} px: sin-cos positions of the {grid}x{grid} "
                 "grid")
  return notes


def encoder_problems(model: ml_collections.ConfigDict, source: Path) -> list[str]:
  """Each encoder key (`build.ENCODER_KEYS`) on which `model` differs from the model the
  stage in `source` saved in its config.json (none when it saved none), but for what
  `encoder_adaptations` adapts: another image size (the positions are fixed sin-cos, the
  params do not depend on it) and one band to several."""
  theirs = _source_model(source)
  adaptable = {"image_size"} | ({"channels"} if theirs.get("channels") == 1 else set())
  return [f"init_from: the source stage {source} used model.{k}={theirs[k]}, this one "
          f"model.{k}={model[k]}; the encoder config must match"
          + (" (only one band adapts to several)" if k == "channels" else "")
          for k in build.ENCODER_KEYS
          if k in theirs and k in model and theirs[k] != model[k] and k not in adaptable]


def check_source_encoder(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError when the stage in `config.init_from` used another encoder config.

  What a stage calls right before it takes params from `init_from`: `check` already
  compared a fresh run's source, but a chain (pipeline, study) makes its sources after
  it was checked, and a resumed probe reads its frozen encoder from there again.
  """
  found = encoder_problems(config.model, Path(config.init_from))
  if found:
    raise ConfigError("; ".join(found))
  for note in encoder_adaptations(config.model, Path(config.init_from)):
    logging.info("%s", note)


def _source_checkpoint_problems(config: ml_collections.ConfigDict, workdir: Path) -> list[str]:
  """A probe / fine-tune that starts fresh needs its `init_from` stage's checkpoint,
  made with the same encoder sizes."""
  if not config.get("init_from") or config.get("init_weights") or \
      checkpoint.latest_step(workdir) is not None:
    return []  # from scratch or public weights, or resuming this workdir's own checkpoint
  src = Path(config.init_from)
  if checkpoint.latest_step(src) is None:
    make = (f"python main.py --config=configs/{config.get('init_from_stage', 'pretrain')}.py:"
            f"{config.get('preset', 'demo')} --workdir={src}")
    return [f"init_from: no checkpoint in {src.absolute() / workdir_lib.CHECKPOINTS}; "
            f"make one with:\n  {make}"]
  return encoder_problems(config.model, src)


def _resume_loss_problems(config: ml_collections.ConfigDict, workdir: Path) -> list[str]:
  """A pretraining that resumes its own checkpoint under another loss would train on with
  the new loss (and a finished one would be recorded under it): refused, with the
  overrides that continue it as it began. The `demo` default changed from BCE on the
  removed patches to the high-pass loss, so an older demo workdir meets this."""
  saved = workdir / workdir_lib.CONFIG_FILE
  if "loss" not in config or not saved.exists() or checkpoint.latest_step(workdir) is None:
    return []
  theirs = json.loads(saved.read_text()).get("loss") or {}
  ours = config.loss.to_dict()
  changed = sorted(k for k in ours if k in theirs and theirs[k] != ours[k])
  if not changed:
    return []
  keep = " ".join(f"--config.loss.{k}={theirs[k]}" for k in changed)
  return [f"{workdir} was pretrained with " + ", ".join(f"loss.{k}={theirs[k]!r}" for k in changed)
          + "; this run asks " + ", ".join(f"loss.{k}={ours[k]!r}" for k in changed)
          + f" (the demo preset's loss changed: docs/training.md#loss). Continue it as it began "
          f"with {keep}, or pretrain in a new workdir"]


def problems(config: ml_collections.ConfigDict, workdir: str | os.PathLike[str]) -> list[str]:
  """Every problem of `config` for a run in `workdir`, cheapest checks first."""
  found = _reference_problems(config)
  option_changed = any(OPTION_CHANGED in p for p in found)   # says it all about the model
  if "model" in config and not option_changed:
    found += build.problems(config.model) + _cnn_problems(config) + _partial_problems(config)
  if config.get("stage") in TRAINING_STAGES:
    found += (_batch_problems(config) + _stage_problems(config) + _micro_batch_problems(config)
              + loop.problems(config) + objectives.problems(config)
              + online_probe.problems(config))
  if "name" in config.get("optim", {}):
    found += optim.problems(config.optim)
  if "evals" in config:
    found += evaluators.problems(config.evals, config.get("select_by"))
  if "data" in config:
    found += source.problems(config.data)
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
  elif config.get("stage") == "pretrain":
    found += _resume_loss_problems(config, Path(workdir))
  return found


def check(config: ml_collections.ConfigDict, workdir: str | os.PathLike[str],
          stages: tuple[str, ...] | None = None) -> None:
  """Raises ConfigError listing every problem found; returns quietly if none.

  With `stages` (the registered stage names), an unknown `config.stage` is refused
  first, with the closest name.
  """
  stage = config.get("stage")
  if stages is not None and stage not in stages:
    close = difflib.get_close_matches(str(stage), stages, n=1)
    raise ConfigError(f"unknown stage {stage!r}" + (f"; did you mean {close[0]}?" if close else "")
                      + f" Known: {', '.join(stages)}")
  found = problems(config, workdir)
  if found:
    lines = "\n".join(f"  - {p}" for p in found)
    raise ConfigError(f"{len(found)} config problem(s), nothing was run:\n{lines}")


def check_study(config: ml_collections.ConfigDict, arm_problems: Sequence[str]) -> None:
  """The study's own keys, before anything runs (each stage's are `check_chain`'s): the
  arms' (`arm_problems`, the study's check of its arm table), every variant one with a
  data folder, every `<stage>_budget_steps` entry a (labels per class, steps) pair."""
  found = list(arm_problems)
  found += [f"unknown variant {v!r}; choose among {', '.join(config.data_dirs)} (or add "
            f"data_dirs.{v})" for v in config.variants if v not in config.data_dirs]
  for stage in ("finetune", "probe"):
    for entry in config[f"{stage}_budget_steps"]:
      if not (isinstance(entry, (tuple, list)) and len(entry) == 2
              and all(isinstance(v, int) and not isinstance(v, bool) for v in entry)
              and entry[0] >= 0 and entry[1] >= 1):
        found.append(f"{stage}_budget_steps: {entry!r} is not a (labels per class, steps) pair "
                     "of whole numbers, labels ≥ 0 (0: every label), steps ≥ 1")
  if found:
    raise ConfigError(f"{len(found)} config problem(s), nothing was run:\n"
                      + "\n".join(f"  - {p}" for p in found))


def check_chain(stages: dict[str, ml_collections.ConfigDict], workdir: Path) -> None:
  """Every stage of a chain checked before anything runs, each problem listed once with
  the stages it concerns (`init_from` is not checked: the chain makes those sources)."""
  found: dict[str, list[str]] = {}
  for name, config in stages.items():
    config = config.copy_and_resolve_references()
    if "init_from" in config:
      config.init_from = ""
    for problem in problems(config, Path(workdir) / name):
      found.setdefault(problem, []).append(name)
  if found:
    lines = "\n".join(f"  - [{', '.join(names)}] {p}" for p, names in found.items())
    raise ConfigError(f"{len(found)} config problem(s), nothing was run:\n{lines}")
