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

import contextlib
from pathlib import Path
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from mae_jax.runtime import errors
from mae_jax.runtime import faults
from mae_jax.runtime import syncs
from mae_jax.runtime import workdir as workdir_lib

PyTree = Any
STATE, PROGRESS = "state", "progress"
LEGACY_STATE = "default"   # single-item checkpoints (mae_jax before progress records)


def manager(workdir: str | Path, max_to_keep: int = 3,
            folder: str = workdir_lib.CHECKPOINTS) -> ocp.CheckpointManager:
  """A checkpoint manager over `<workdir>/<folder>` keeping the last `max_to_keep`."""
  path = Path(workdir).absolute() / folder
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                         enable_async_checkpointing=True,
                                         cleanup_tmp_directories=True)
  return ocp.CheckpointManager(path, options=options)


@contextlib.contextmanager
def finishing(*managers: ocp.CheckpointManager) -> Iterator[None]:
  """Waits for the managers' asynchronous saves on the way out, also when an error
  (a non-finite step, an interrupt) ends the run: a save in flight completes."""
  try:
    yield
  finally:
    for mngr in managers:
      mngr.wait_until_finished()


@jax.jit
def _all_finite(leaves: list[jax.Array]) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves] or [jnp.array(True)]))


def all_finite(tree: PyTree) -> bool:
  """Whether every floating-point leaf of `tree` is finite."""
  leaves = [x for x in jax.tree.leaves(tree)
            if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)]
  return bool(syncs.fetch(_all_finite(leaves), "finite check"))


def save(mngr: ocp.CheckpointManager, step: int, state: PyTree,
         progress: dict[str, Any] | None = None) -> None:
  """Starts an asynchronous save of `state` (and its `progress` record) at `step`.

  A no-op if that step is already saved.

  Raises:
    errors.NonFiniteError: `state` holds NaN or inf (the last good checkpoint stays the latest).
  """
  if step in mngr.all_steps():
    return
  if not all_finite(state):
    raise errors.NonFiniteError(f"refusing to save the state of step {step}: it holds NaN or inf "
                         f"values; the latest checkpoint stays step {mngr.latest_step()}")
  syncs.note("checkpoint save")   # orbax copies the state to the host before it returns
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
    raise errors.IncompatibleCheckpointError(
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
  path = Path(workdir).absolute() / workdir_lib.CHECKPOINTS
  if not path.is_dir():
    return None
  with ocp.CheckpointManager(path) as mngr:
    return mngr.latest_step()


def restore_on_one_device(item: Path) -> dict:
  """Restores a saved pytree onto this process's first device, whatever mesh wrote it
  (a stage may start from one that ran on another number of devices)."""
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  with ocp.StandardCheckpointer() as ckptr:
    tree = ckptr.metadata(item).item_metadata.tree
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                            tree, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))
    return ckptr.restore(item, abstract)


def restore_latest_on_one_device(folder: str | Path) -> tuple[dict, int]:
  """(the latest complete checkpoint's state, its step) of a checkpoint manager's
  directory (`<workdir>/checkpoints`, `<workdir>/best_checkpoint`), on one device.

  Raises:
    errors.MissingCheckpointError: there is no complete checkpoint there.
  """
  folder = Path(folder).absolute()
  step = None
  if folder.is_dir():
    with ocp.CheckpointManager(folder) as mngr:
      step = mngr.latest_step()
  if step is None:
    raise errors.MissingCheckpointError(f"no complete checkpoint in {folder}")
  item = folder / str(step) / STATE
  return restore_on_one_device(item if item.is_dir() else item.with_name(LEGACY_STATE)), step
