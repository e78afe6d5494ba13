"""Orbax checkpoints of a stage's train state in `<workdir>/checkpoints`.

Saves are asynchronous and finished before exit; orbax writes each step to a
temporary folder and renames it when complete, so a half-written checkpoint is
never listed as the latest.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

PyTree = Any


def manager(workdir: str | Path, max_to_keep: int = 3,
            folder: str = "checkpoints") -> ocp.CheckpointManager:
  """A checkpoint manager over `<workdir>/<folder>` keeping the last `max_to_keep`."""
  path = Path(workdir).absolute() / folder
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                         enable_async_checkpointing=True)
  return ocp.CheckpointManager(path, options=options)


def save(mngr: ocp.CheckpointManager, step: int, state: PyTree) -> None:
  """Starts an asynchronous save of `state` at `step` (a no-op if already saved)."""
  if step in mngr.all_steps():
    return
  mngr.save(step, args=ocp.args.StandardSave(state))


def restore_latest(mngr: ocp.CheckpointManager, template: PyTree) -> tuple[PyTree, int] | None:
  """The latest saved state, shaped and sharded like `template`, and its step; None if none."""
  step = mngr.latest_step()
  if step is None:
    return None
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
  return mngr.restore(step, args=ocp.args.StandardRestore(abstract)), step


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


def _restore_on_one_device(item: Path) -> dict:
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
  restored = _restore_on_one_device(path / str(step) / "default")
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
