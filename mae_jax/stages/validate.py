"""Config checks that run before any data is read or any function compiled.

Every problem found is reported at once, one line each, in a `ConfigError`:
unknown or missing keys (with the closest valid key), impossible model or batch
settings, a missing or mismatched source checkpoint, an unwritable workdir, a
data folder without the class folders.
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
from flax import traverse_util

from mae_jax import objectives
from mae_jax.data import feeds
from mae_jax.data import layout
from mae_jax.data import simulate
from mae_jax.data import source
from mae_jax.data import splits
from mae_jax.eval import evaluators
from mae_jax.models import build
from mae_jax.models import convs
from mae_jax.runtime import checkpoint
from mae_jax.runtime import errors
from mae_jax.runtime import parallel
from mae_jax.runtime import workdir as workdir_lib

TRAINING_STAGES = ("pretrain", "probe", "finetune")
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


def unknown_key_message(key: str, valid: dict[str, Any] | list[str]) -> str:
  """`unknown config key KEY; did you mean K?`: the closest valid key, siblings first."""
  valid = list(valid)
  parent = key.rsplit(".", 1)[0] if "." in key else ""
  siblings = [v for v in valid if (v.rsplit(".", 1)[0] if "." in v else "") == parent]
  leaf = key.rsplit(".", 1)[-1]
  close = [parent + "." + c if parent else c for c in difflib.get_close_matches(
      leaf, [v.rsplit(".", 1)[-1] for v in siblings], n=1, cutoff=0.5)]
  close = close or difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
  hint = f"; did you mean {close[0]}?" if close else ""
  return f"unknown config key {key}{hint}"


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
    problems.append(unknown_key_message(key, valid))
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
  if "dtype" in model and model.dtype not in build.DTYPES:
    problems.append(f"model.dtype={model.dtype!r} must be one of {', '.join(build.DTYPES)}")
  if get("stem", "linear") not in convs.STEMS:
    problems.append(f"model.stem={model.stem!r} must be one of {', '.join(convs.STEMS)}")
  elif get("stem") == "conv" and get("patch") and model.patch % 2:
    problems.append(f"model.stem='conv' needs an even model.patch, got {model.patch}")
  if "stem_width" in model and (not isinstance(model.stem_width, int) or model.stem_width < 1):
    problems.append(f"model.stem_width={model.stem_width!r} must be a whole number >= 1")
  if get("arch", "vit") not in build.ARCHS:
    problems.append(f"model.arch={model.arch!r} must be one of {', '.join(build.ARCHS)}")
  if get("arch") == "cnn" and (not get("cnn_widths") or any(
      not isinstance(w, int) or w < 1 for w in model.cnn_widths)
      or 2 ** (len(model.cnn_widths) - 1) > model.image_size):
    problems.append(f"model.cnn_widths={get('cnn_widths')} must be positive channel counts, "
                    f"at most {model.image_size.bit_length()} stages (each halves the image)")
  return problems


def _partial_problems(config: ml_collections.ConfigDict) -> list[str]:
  """`trainable_blocks`: -1 (every param) or a count of the encoder's last blocks."""
  k = config.get("trainable_blocks", -1)
  depth = config.get("model", {}).get("depth", 0)
  if isinstance(k, bool) or not isinstance(k, int) or not -1 <= k <= depth:
    return [f"trainable_blocks={k!r} must be -1 (every param trains) or a whole number of "
            f"the encoder's last blocks, 0 to model.depth={depth}"]
  if k >= 0 and config.get("model", {}).get("arch", "vit") == "cnn":
    return ["trainable_blocks applies to the ViT encoder: set it to -1 with model.arch='cnn'"]
  return []


def _cnn_problems(config: ml_collections.ConfigDict) -> list[str]:
  """The CNN is a supervised model trained from scratch: nothing pretrained to start from,
  no frozen encoder to probe."""
  if config.get("model", {}).get("arch") != "cnn":
    return []
  problems = []
  if config.get("init_from") or config.get("init_weights"):
    problems.append("model.arch='cnn' trains from scratch: set init_from='' and "
                    "init_weights='' (the MAE pretrains a ViT, not the CNN)")
  if config.get("select_features") or config.get("optim", {}).get("frozen"):
    problems.append("model.arch='cnn' has no pretrained encoder to freeze or probe: set "
                    "select_features=False and optim.frozen=()")
  return problems


def _batch_problems(config: ml_collections.ConfigDict) -> list[str]:
  found = [parallel.batch_problem(config[key], key)
           for key in ("batch_size", "eval_batch_size") if key in config]
  return [p for p in found if p]


def _micro_batch_problems(config: ml_collections.ConfigDict) -> list[str]:
  return [f"micro_batch.{backend}={size} must be a whole number >= 0 (0: the whole batch)"
          for backend, size in config.get("micro_batch", {}).items()
          if not isinstance(size, int) or isinstance(size, bool) or size < 0]


def _schedule_problems(config: ml_collections.ConfigDict) -> list[str]:
  problems = []
  if "phase_epochs" in config:
    epochs, augment = tuple(config.phase_epochs), tuple(config.get("phase_augment", ()))
    if not epochs or len(epochs) != len(augment) or any(
        not isinstance(e, int) or e < 0 for e in epochs):
      problems.append(f"phase_epochs={epochs} and phase_augment={augment} must be equally "
                      "long (one entry per phase), with whole epochs >= 0")
  if "steps_per_call" in config and (not isinstance(config.steps_per_call, int)
                                     or config.steps_per_call < 1):
    problems.append(f"steps_per_call={config.steps_per_call} must be a whole number >= 1")
  profile = tuple(config.get("profile_steps", ()) or ())
  if profile and (len(profile) != 2 or not all(isinstance(s, int) for s in profile)
                  or not 0 <= profile[0] < profile[1]):
    problems.append(f"profile_steps={profile} must be () or (first, last) steps, first < last")
  if "eval_every_epochs" in config and (not isinstance(config.eval_every_epochs, int)
                                        or config.eval_every_epochs < 1):
    problems.append(f"eval_every_epochs={config.eval_every_epochs} must be a whole number >= 1")
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


def _data_problems(data: ml_collections.ConfigDict) -> list[str]:
  problems = []
  if data.get("source") not in source.SOURCES:
    problems.append(f"data.source={data.get('source')!r} must be one of {', '.join(source.SOURCES)}")
  if "validation_fraction" in data:
    try:
      splits.SplitRule(data.validation_fraction, data.get("test_fraction", 0.0))
    except ValueError as e:
      problems.append(f"data.{e}")
  if data.get("reader", "files") not in source.READERS:
    problems.append(f"data.reader={data.reader!r} must be one of {', '.join(source.READERS)}")
  if data.get("feed", "auto") not in feeds.FEEDS:
    problems.append(f"data.feed={data.feed!r} must be one of {', '.join(feeds.FEEDS)}")
  share = data.get("device_memory_share", 0.5)
  if not 0.0 < share <= 1.0:
    problems.append(f"data.device_memory_share={share} must lie in (0, 1]")
  variant = data.get("sim", {}).get("variant")
  if variant is not None and variant not in simulate.VARIANTS:
    problems.append(f"data.sim.variant={variant!r} must be one of {', '.join(simulate.VARIANTS)}")
  spread = data.get("sim", {}).get("source_spread", 0)
  if isinstance(spread, bool) or not isinstance(spread, int) \
      or not 0 <= spread <= simulate.SOURCE_SPREAD_MAX:
    problems.append(f"data.sim.source_spread={spread!r} must be an integer in "
                    f"[0, {simulate.SOURCE_SPREAD_MAX}]")
  elif spread and variant != "substructure":
    problems.append(f"data.sim.source_spread={spread} applies to the substructure variant "
                    f"only (data.sim.variant={variant!r})")
  if data.get("on_bad_file") not in (None, "error", "skip"):
    problems.append(f"data.on_bad_file={data.on_bad_file!r} must be 'error' or 'skip'")
  if data.get("source") == "deeplense":
    root = Path(data.dir)
    missing = [c for c in layout.CLASS_NAMES if not (root / c).is_dir()]
    if missing:
      what = "does not exist" if not root.is_dir() else f"lacks the class folder(s) {', '.join(missing)}"
      problems.append(f"data folder {root} {what}.\n" + layout.expected_layout_message(root))
  return problems


def encoder_problems(model: ml_collections.ConfigDict, source: Path) -> list[str]:
  """Each encoder key (`build.ENCODER_KEYS`) on which `model` differs from the model the
  stage in `source` saved in its config.json (none when it saved none)."""
  saved = source / workdir_lib.CONFIG_FILE
  if not saved.exists():
    return []
  theirs = json.loads(saved.read_text()).get("model", {})
  return [f"init_from: the source stage {source} used model.{k}={theirs[k]}, this one "
          f"model.{k}={model[k]}; the encoder config must match"
          for k in build.ENCODER_KEYS if k in theirs and k in model and theirs[k] != model[k]]


def check_source_encoder(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError when the stage in `config.init_from` used another encoder config.

  What a stage calls right before it takes params from `init_from`: `check` already
  compared a fresh run's source, but a chain (pipeline, study) makes its sources after
  it was checked, and a resumed probe reads its frozen encoder from there again.
  """
  found = encoder_problems(config.model, Path(config.init_from))
  if found:
    raise ConfigError("; ".join(found))


def _source_checkpoint_problems(config: ml_collections.ConfigDict, workdir: Path) -> list[str]:
  """A probe / fine-tune that starts fresh needs its `init_from` stage's checkpoint,
  made with the same encoder sizes."""
  if not config.get("init_from") or config.get("init_weights") or \
      checkpoint.latest_step(workdir) is not None:
    return []  # from scratch or public weights, or resuming this workdir's own checkpoint
  source = Path(config.init_from)
  if checkpoint.latest_step(source) is None:
    make = (f"python main.py --config=configs/{config.get('init_from_stage', 'pretrain')}.py:"
            f"{config.get('preset', 'demo')} --workdir={source}")
    return [f"init_from: no checkpoint in {source.absolute() / workdir_lib.CHECKPOINTS}; "
            f"make one with:\n  {make}"]
  return encoder_problems(config.model, source)


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
  found = []
  reference = reference_config(config.get("stage", ""), config.get("preset"))
  if reference is not None:
    found += key_problems(config, reference)
  if "model" in config:
    found += _model_problems(config.model) + _cnn_problems(config) + _partial_problems(config)
  if config.get("stage") in TRAINING_STAGES:
    found += _batch_problems(config) + _schedule_problems(config) + _micro_batch_problems(config)
    found += objectives.problems(config)
  if "evals" in config:
    found += evaluators.problems(config.evals, config.get("select_by"))
  if "data" in config:
    found += _data_problems(config.data)
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


def check_study(config: ml_collections.ConfigDict, arms: Sequence[str]) -> None:
  """The study's own keys, before anything runs (each stage's are `check_chain`'s):
  every arm one of `arms`, every variant one with a data folder, every
  `<stage>_budget_steps` entry a (labels per class, steps) pair."""
  found = [f"unknown arm {a!r}; choose among {', '.join(arms)}"
           for a in dict.fromkeys((*config.arms, *(a for v in config.variant_arms.values()
                                                   for a in v))) if a not in arms]
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
