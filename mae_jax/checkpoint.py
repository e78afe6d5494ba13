"""Orbax checkpoints of a stage's train state in `<workdir>/checkpoints`.

Each step's checkpoint holds two items: `state` (params, optimiser state, step)
and `progress` (JSON: where the data iterator stands, the PRNG key, the phase,
the losses of the epoch so far), so a killed run resumes exactly. Saves are
asynchronous and finished before exit; orbax writes each step to a temporary
folder and renames it when complete, so a half-written checkpoint is never
taken as the latest (and leftover temporary folders are removed on start).
A state holding NaN or inf is never saved.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from mae_jax import faults

PyTree = Any
STATE, PROGRESS = "state", "progress"
LEGACY_STATE = "default"   # single-item checkpoints (mae_jax before progress records)


class NonFiniteError(FloatingPointError):
  """A loss, gradient or param became NaN/inf; nothing of it is saved."""


def manager(workdir: str | Path, max_to_keep: int = 3,
            folder: str = "checkpoints") -> ocp.CheckpointManager:
  """A checkpoint manager over `<workdir>/<folder>` keeping the last `max_to_keep`."""
  path = Path(workdir).absolute() / folder
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                         enable_async_checkpointing=True,
                                         cleanup_tmp_directories=True)
  return ocp.CheckpointManager(path, options=options)


@jax.jit
def _all_finite(leaves: list[jax.Array]) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves] or [jnp.array(True)]))


def all_finite(tree: PyTree) -> bool:
  """Whether every floating-point leaf of `tree` is finite."""
  leaves = [x for x in jax.tree.leaves(tree)
            if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)]
  return bool(_all_finite(leaves))


def save(mngr: ocp.CheckpointManager, step: int, state: PyTree,
         progress: dict[str, Any] | None = None) -> None:
  """Starts an asynchronous save of `state` (and its `progress` record) at `step`.

  A no-op if that step is already saved.

  Raises:
    NonFiniteError: `state` holds NaN or inf (the last good checkpoint stays the latest).
  """
  if step in mngr.all_steps():
    return
  if not all_finite(state):
    raise NonFiniteError(f"refusing to save the state of step {step}: it holds NaN or inf "
                         f"values; the latest checkpoint stays step {mngr.latest_step()}")
  items = {STATE: ocp.args.StandardSave(state)}
  if progress is not None:
    items[PROGRESS] = ocp.args.JsonSave(progress)
  mngr.save(step, args=ocp.args.Composite(**items))
  faults.maybe_kill("save", step)


def restore_latest(mngr: ocp.CheckpointManager, template: PyTree
                   ) -> tuple[PyTree, int, dict[str, Any] | None] | None:
  """The latest complete checkpoint, shaped and sharded like `template`.

  Returns:
    (state, step, progress record or None if the checkpoint has none), or None
    if there is no checkpoint.
  """
  step = mngr.latest_step()
  if step is None:
    return None
  folder = Path(mngr.directory) / str(step)
  if not (folder / STATE).is_dir():
    raise IncompatibleCheckpointError(
        f"checkpoint {folder} was written by an older mae_jax (no '{STATE}' item); "
        "start this stage in a new workdir")
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
  items = {STATE: ocp.args.StandardRestore(abstract)}
  if (folder / PROGRESS).is_dir():
    items[PROGRESS] = ocp.args.JsonRestore()
  restored = mngr.restore(step, args=ocp.args.Composite(**items))
  return restored[STATE], step, (restored[PROGRESS] if PROGRESS in items else None)


def latest_step(workdir: str | Path) -> int | None:
  """The latest checkpoint step in a workdir, without building a state."""
  path = Path(workdir).absolute() / "checkpoints"
  if not path.is_dir():
    return None
  with ocp.CheckpointManager(path) as mngr:
    return mngr.latest_step()


class MissingCheckpointError(FileNotFoundError):
  """The stage to start from has no checkpoint; says which command makes one."""


class IncompatibleCheckpointError(ValueError):
  """A checkpoint of another architecture; names the first mismatched param."""


def _flat(tree: PyTree, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    name = f"{prefix}/{k}" if prefix else str(k)
    if isinstance(v, dict):
      out.update(_flat(v, name))
    else:
      out[name] = v
  return out


def _merge(template: PyTree, loaded: dict[str, Any], dont_load: list, required: str,
           what: str, prefix: str = "") -> tuple[PyTree, list[str]]:
  """Template with leaves replaced by same-named loaded ones (shape-checked)."""
  import re  # pylint: disable=g-import-not-at-top
  fresh = []

  def walk(node, path):
    if isinstance(node, dict):
      return {k: walk(v, f"{path}/{k}" if path else k) for k, v in node.items()}
    name = f"{prefix}{path}"
    if any(re.fullmatch(p, name) for p in dont_load) or name not in loaded:
      if name not in loaded and re.fullmatch(required, name):
        raise IncompatibleCheckpointError(
            f"{what} has no param {name} (model shape {tuple(node.shape)}): it was made for "
            "another architecture")
      fresh.append(name)
      return node
    value = loaded[name]
    if tuple(value.shape) != tuple(node.shape):
      raise IncompatibleCheckpointError(
          f"{what}: param {name} has shape {tuple(value.shape)} there but "
          f"{tuple(node.shape)} in this model; the model config must match the source stage's")
    return jax.numpy.asarray(value, node.dtype)

  return walk(template, ""), fresh


def restore_on_one_device(item: Path) -> dict:
  """Restores a saved pytree onto this process's first device, whatever mesh wrote it
  (a stage may start from one that ran on another number of devices)."""
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  with ocp.StandardCheckpointer() as ckptr:
    tree = ckptr.metadata(item).item_metadata.tree
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                            tree, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))
    return ckptr.restore(item, abstract)


ENCODER_KEYS = ("image_size", "channels", "patch", "dim", "depth", "heads", "mlp_ratio")


def restore_from_stage(source_workdir: str | Path, params: PyTree, batch_stats: PyTree,
                       *, dont_load: list[str], required: str = r"encoder/.*",
                       make_it: str = "", model: dict | None = None
                       ) -> tuple[PyTree, PyTree, int, list[str]]:
  """Initialises params (and BatchNorm statistics) from another stage's latest checkpoint.

  Every param whose name is in the checkpoint with the same shape is taken,
  except those matching a `dont_load` pattern; the rest keep their fresh
  initialisation (listed in the result). Optimiser state is never taken.

  Raises:
    MissingCheckpointError: no checkpoint there (`make_it` says how to make one).
    IncompatibleCheckpointError: a `required` param is missing, any shape differs,
      the checkpoint has encoder params this model lacks (a deeper encoder), or the
      source's `config.json` names other encoder sizes than `model` (e.g. heads,
      which no shape reveals).

  Returns:
    (params, batch_stats, the source step, names left freshly initialised).
  """
  path = Path(source_workdir).absolute() / "checkpoints"
  step = None
  if path.is_dir():
    with ocp.CheckpointManager(path) as mngr:
      step = mngr.latest_step()
  if step is None:
    raise MissingCheckpointError(f"no checkpoint in {path}" + (f"; make one with:\n  {make_it}"
                                                                if make_it else ""))
  item = path / str(step) / STATE
  restored = restore_on_one_device(item if item.is_dir() else path / str(step) / LEGACY_STATE)
  what = f"checkpoint {path}/{step}"
  source_config = Path(source_workdir) / "config.json"
  if model is not None and source_config.exists():
    theirs = json.loads(source_config.read_text()).get("model", {})
    for key in ENCODER_KEYS:
      if key in theirs and key in model and theirs[key] != model[key]:
        raise IncompatibleCheckpointError(
            f"{what}: the source stage used model.{key}={theirs[key]}, this one "
            f"model.{key}={model[key]}; the encoder config must match")
  loaded = _flat(restored["params"])
  params, fresh = _merge(params, loaded, dont_load, required, what)
  ours = set(_flat(params))
  extra = sorted(n for n in loaded if n.startswith("encoder/") and n not in ours)
  if extra:
    raise IncompatibleCheckpointError(
        f"{what} has encoder param {extra[0]} that this model lacks ({len(extra)} in all): "
        "it was made for a deeper or different encoder")
  if batch_stats:
    stats = _flat(restored.get("batch_stats") or {})
    batch_stats, _ = _merge(batch_stats, stats, dont_load, r"$^", what)
  return params, batch_stats, step, fresh
