"""Orbax checkpoints of a stage's train state in `<workdir>/checkpoints`.

Saves are asynchronous and finished before exit; orbax writes each step to a
temporary folder and renames it when complete, so a half-written checkpoint is
never listed as the latest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

PyTree = Any


def manager(workdir: str | Path, max_to_keep: int = 3) -> ocp.CheckpointManager:
  """A checkpoint manager over `<workdir>/checkpoints` keeping the last `max_to_keep`."""
  path = Path(workdir).absolute() / "checkpoints"
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
