"""Running one stage from the command line: what `main.py` calls.

The config is checked before any data is read or anything compiled
(`validate.check`), process 0 holds the workdir's lock, and the stage is looked up
in the registry. A newcomer's mistakes (a misspelled override, an unknown preset,
a missing data folder) end in one line naming the closest valid choice, never a
traceback.
"""

from __future__ import annotations

import contextlib
import os
import re
from typing import Any, Sequence

import jax
import ml_collections
from absl import flags

from mae_jax.runtime import errors
from mae_jax.runtime import workdir as workdir_lib
from mae_jax.stages import classify  # pylint: disable=unused-import (registers probe, finetune)
from mae_jax.stages import data  # pylint: disable=unused-import (registers data)
from mae_jax.stages import pipeline  # pylint: disable=unused-import (registers pipeline)
from mae_jax.stages import predict  # pylint: disable=unused-import (registers predict)
from mae_jax.stages import pretrain  # pylint: disable=unused-import (registers pretrain)
from mae_jax.stages import registry
from mae_jax.stages import study  # pylint: disable=unused-import (registers study)
from mae_jax.stages import validate


# Stages whose workdir many processes share: the study's workers each claim its runs
# (every run's own workdir lock), so the study's folder itself is not locked.
SHARED_WORKDIR = ("study",)


def run(config: ml_collections.ConfigDict, workdir: str) -> Any:
  """Checks `config`, then runs its stage in `workdir` under the workdir's lock (but for
  the stages in SHARED_WORKDIR).

  Raises:
    errors.UserError: a problem with the config, data or workdir, or a diverging run.
  """
  # Before any data is read or anything compiled.
  validate.check(config, workdir, stages=registry.names())
  # Process 0 holds the lock for the run (a shared filesystem may not share flocks).
  exclusive = jax.process_index() == 0 and config.stage not in SHARED_WORKDIR
  hold = workdir_lib.lock(workdir) if exclusive else contextlib.nullcontext()
  with hold:
    return registry.get(config.stage)(config, workdir)


def enable_compilation_cache(folder: str) -> None:
  """Keeps XLA's compiled steps in `folder` across runs ('' turns it off): a rerun, a
  resume or the next stage of a pipeline reuses them instead of compiling again."""
  if not folder:
    return
  path = os.path.expanduser(folder)
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _config_argument(argv: Sequence[str], name: str) -> str | None:
  for i, arg in enumerate(argv):
    if arg == f"--{name}" and i + 1 < len(argv):
      return argv[i + 1]
    if arg.startswith(f"--{name}="):
      return arg.split("=", 1)[1]
  return None


def override_problems(argv: Sequence[str], config: ml_collections.ConfigDict,
                      name: str = "config") -> list[str]:
  """`--config.KEY=...` overrides in `argv` naming no key of `config` (the config file as
  loaded), each with the closest valid key."""
  valid = validate.flat_keys(config)
  prefixes = {k.rsplit(".", i)[0] for k in valid for i in range(k.count(".") + 1)}
  problems = []
  for a in argv:
    m = re.match(rf"--(?:no)?{name}\.([\w.]+)", a)
    if m and m.group(1) not in valid and m.group(1) not in prefixes:
      problems.append(validate.unknown_key_message(m.group(1), valid))
  return problems


def parse_flags(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
  """absl's flag parsing, with config mistakes reported in one line each (exit 1).

  config_flags loads the config file once; only when that fails (or was deferred) is
  the file loaded again (`config_file_problems`), to say what is wrong.
  """
  try:
    rest = flag_values(argv)
  except errors.UserError as e:
    raise SystemExit(f"error: {e}") from None
  except (flags.Error, AttributeError, KeyError, ValueError, TypeError, OSError) as e:
    found = config_file_problems(argv)
    if found:
      raise SystemExit("error: " + "; ".join(found)) from None
    if isinstance(e, flags.Error):
      raise SystemExit(f"error: {e}") from None
    raise
  # config_flags defers some failures (a missing file) until the config is read: its
  # value is then no ConfigDict.
  if _config_argument(argv, "config") and \
      not isinstance(flag_values["config"].value, ml_collections.ConfigDict):
    found = config_file_problems(argv)
    if found:
      raise SystemExit("error: " + "; ".join(found))
  return rest


def config_file_problems(argv: Sequence[str], name: str = "config") -> list[str]:
  """What is wrong with `--config=FILE:PRESET` and its `--config.KEY` overrides in `argv`
  (the file loaded once more, by `validate.load_config_file`)."""
  arg = _config_argument(argv, name)
  if not arg:
    return []
  file, _, preset = arg.partition(":")
  try:
    config = validate.load_config_file(file, preset or None)
  except errors.UserError as e:
    return [str(e)]
  return override_problems(argv, config, name)


def describe_config(config: ml_collections.ConfigDict) -> str:
  """What the console shows of a config: the keys that differ from its stock config (the
  same stage, preset and options), one `key = value` each; the whole config is in the
  workdir's config.json."""
  stage, preset = config.get("stage"), config.get("preset")
  try:
    reference = validate.reference_config(stage, preset, validate.options_of(config))
  except ValueError:   # an unknown preset or option: the config checks say so in one line
    return f"configs/{stage}.py:{preset}"
  ours = validate.flat_keys(config.copy_and_resolve_references())
  stock = validate.flat_keys(reference) if reference is not None else {}
  changed = [f"  {k} = {v!r}" for k, v in ours.items() if stock.get(k, object()) != v]
  defaults = validate.option_defaults(stage)
  name = ",".join([f"configs/{stage}.py:{preset}",
                   *(f"{k}={v}" for k, v in validate.options_of(config).items()
                     if defaults.get(k) != v)])
  return f"{name}" + (" with\n" + "\n".join(changed) if changed else " as it stands")
