"""Orbax checkpoints of a stage's train state in `<workdir>/checkpoints`.

Each step's checkpoint holds two items: `state` (params, optimiser state, step)
and `progress` (JSON: where the data iterator stands, the PRNG key, the phase,
the losses of the epoch so far), so a killed run resumes exactly. Saves are
asynchronous and finished before exit; orbax writes each step to a temporary
folder and renames it when complete, so a half-written checkpoint is never
taken as the latest (and leftover temporary folders are removed on start).
A state holding NaN or inf is never saved.

A classifier stage's manager also keeps the step of its best validation score: such a
save carries metrics (`best_metrics`: the score and its `rank`, the score negated where
lower is better), and orbax's `BestN` policy keeps the highest-ranked step beside the
latest ones (`LatestN`), in the same folder; `restore_best` and
`restore_latest_on_one_device(best=True)` read it. orbax reads every step's metrics when
it opens a folder, so a step whose metrics file does not parse is set aside first (or,
in another stage's workdir, skipped) instead of failing the whole folder.

Once a save has finished, a manifest of its files (size and CRC-32 each) is written in
its folder, last and atomically (`seal`). Every restore checks it first: a step whose
files differ from it (truncated, missing, or bit rot at the same size), or that has none
in a folder whose steps have one (a save killed before its manifest), is skipped without
orbax reading it; restored values are checked finite. Checkpoints written before
manifests existed are checked the old way (by reading them). Damage is survived: resuming
takes the newest checkpoint that restores, says in one line which step it skipped and
why, and sets the damaged step aside in `<workdir>/damaged_checkpoints/` (never deleted;
it would otherwise stay the latest step and block the save of that step again). A save
that fails (a full disk) stops the run with one line; the older checkpoints stand.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import logging as std_logging
import sys
import traceback
import zlib
from pathlib import Path
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from mae_jax.runtime import errors
from mae_jax.runtime import faults
from mae_jax.runtime import fileio
from mae_jax.runtime import syncs
from mae_jax.runtime import workdir as workdir_lib

PyTree = Any
STATE, PROGRESS = "state", "progress"
LEGACY_STATE = "default"   # single-item checkpoints (mae_jax before progress records)
DAMAGED = workdir_lib.DAMAGED_CHECKPOINTS   # where resume sets aside steps that do not restore
# In each step folder, written last (atomically) once its save has finished: every file's
# size and CRC-32. In the checkpoints folder, the marker of a folder whose steps have
# one, naming the steps older than it (checked the old way, by reading them).
MANIFEST, MANIFESTED = "manifest.json", "manifests.json"
# The metric a best-keeping manager ranks its steps by (higher is better), and orbax's
# item of a save's metrics (`<step>/metrics/metrics`).
RANK, METRICS = "rank", "metrics"


def _rank(metrics: dict[str, Any] | None) -> float:
  """A step's rank: its metrics' RANK, or -inf (a save that was not a new best, or a
  rank that is not a finite number)."""
  rank = metrics.get(RANK) if isinstance(metrics, dict) else None
  try:
    rank = float(rank)
  except (TypeError, ValueError):
    return float("-inf")
  return rank if math.isfinite(rank) else float("-inf")


def best_metrics(name: str, value: float, lower_is_better: bool) -> dict[str, float]:
  """The metrics of a save that is a new best `name`: the value and its rank."""
  return {name: float(value), RANK: -float(value) if lower_is_better else float(value)}


def _step_dirs(folder: Path) -> list[int]:
  """The steps of a checkpoints folder by its listing (a step's folder is named by its
  number once orbax finished writing it; the manifest check catches the rest)."""
  if not folder.is_dir():
    return []
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit() and p.is_dir())


def _metrics_of(step_dir: Path) -> tuple[dict[str, Any] | None, str | None]:
  """(a step's saved metrics or None, what is wrong with its metrics file or None)."""
  file = step_dir / METRICS / METRICS
  if not file.exists():
    return None, None
  try:
    return json.loads(file.read_text()), None
  except (OSError, ValueError) as e:
    return None, f"{METRICS}/{METRICS} does not parse ({type(e).__name__})"


def ranked_steps(folder: str | Path) -> list[int]:
  """The steps of a checkpoints folder that were a new best, best first (read from each
  step's metrics file; one that does not parse is left out)."""
  ranks = {}
  for step in _step_dirs(Path(folder)):
    rank = _rank(_metrics_of(Path(folder) / str(step))[0])
    if rank != float("-inf"):
      ranks[step] = rank
  return sorted(ranks, key=lambda s: (-ranks[s], s))


def _set_aside_unreadable_metrics(folder: Path) -> None:
  """Before orbax opens this stage's own folder (it reads every step's metrics and would
  fail on one): steps whose metrics file does not parse are set aside, one line each."""
  bad = {step: why for step in _step_dirs(folder)
         for why in [_metrics_of(folder / str(step))[1]] if why}
  if jax.process_count() > 1:   # every process lists before any moves
    multihost_utils.sync_global_devices("mae_jax listed checkpoint metrics")
  for step, why in bad.items():
    target = _set_aside_folder(folder, step)
    logging.warning("checkpoint step %d skipped: %s is damaged (%s); moved to %s, not deleted",
                    step, folder / str(step), why, target)


def manager(workdir: str | Path, max_to_keep: int = 3,
            folder: str = workdir_lib.CHECKPOINTS,
            keep_best: bool = False) -> ocp.CheckpointManager:
  """A checkpoint manager over `<workdir>/<folder>` keeping the last `max_to_keep`
  (orbax's `LatestN` preservation policy) and, with `keep_best`, the best-ranked step
  (`BestN` on the saves' metrics); its steps get manifests (`seal`)."""
  path = Path(workdir).absolute() / folder
  _set_aside_unreadable_metrics(path)
  policy = ocp.checkpoint_managers.LatestN(n=max_to_keep)
  best = {}
  if keep_best:
    policy = ocp.checkpoint_managers.AnyPreservationPolicy([policy, ocp.checkpoint_managers.BestN(
        get_metric_fn=_rank, n=1, keep_checkpoints_without_metrics=False)])
    best = {"best_fn": _rank, "best_mode": "max"}
  options = ocp.CheckpointManagerOptions(
      preservation_policy=policy, create=True, enable_async_checkpointing=True,
      cleanup_tmp_directories=True, **best)
  mngr = ocp.CheckpointManager(path, options=options)
  _mark(mngr)
  return mngr


def _mark(mngr: ocp.CheckpointManager) -> None:
  """Marks a checkpoints folder as one whose finished steps have manifests, naming the
  steps already there without one (written before manifests existed)."""
  folder = Path(mngr.directory)
  if jax.process_index() == 0 and not (folder / MANIFESTED).exists():
    legacy = sorted(s for s in mngr.all_steps() if not (folder / str(s) / MANIFEST).exists())
    fileio.write_json_atomic(folder / MANIFESTED, {"version": 1, "older_steps": legacy})


def _crc32(path: Path) -> int:
  crc = 0
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      crc = zlib.crc32(block, crc)
  return crc


def write_manifest(step_dir: Path) -> None:
  """`manifest.json`: the size and CRC-32 of every file under a finished step's folder."""
  files = sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != MANIFEST)
  fileio.write_json_atomic(step_dir / MANIFEST, {"version": 1, "files": {
      str(p.relative_to(step_dir)): {"size": p.stat().st_size, "crc32": _crc32(p)}
      for p in files}})


def seal(mngr: ocp.CheckpointManager) -> None:
  """Waits for the manager's saves, then writes the manifest of each finished step that
  has none (process 0). Also where a save failed: raises its one-line error."""
  try:
    mngr.wait_until_finished()
  except (OSError, ValueError, RuntimeError) as e:   # an asynchronous save failed
    raise _save_failed(mngr, None, e) from None
  if jax.process_index() != 0:
    return
  folder = Path(mngr.directory)
  for step in mngr.all_steps():
    if (folder / str(step)).is_dir() and not (folder / str(step) / MANIFEST).exists():
      write_manifest(folder / str(step))


def manifest_problem(step_dir: Path) -> str | None:
  """What is wrong with a step's files against its manifest, without reading them as a
  checkpoint: None where they match (or the step predates manifests: checked the old
  way), else one phrase (a missing manifest in a folder that has them is a save that did
  not finish)."""
  marker = step_dir.parent / MANIFESTED
  path = step_dir / MANIFEST
  if not path.exists():
    older = fileio.read_json(marker).get("older_steps", []) if marker.exists() else None
    if older is None or int(step_dir.name) in older:
      return None
    return "it has no manifest: its save did not finish"
  for name, want in fileio.read_json(path)["files"].items():
    file = step_dir / name
    if not file.is_file():
      return f"{name} is missing"
    size = file.stat().st_size
    if size != want["size"]:
      return f"{name} is {size} bytes, {want['size']} when saved"
    if _crc32(file) != want["crc32"]:
      return f"{name} changed since it was saved (CRC-32 differs at the same size)"
  return None


@contextlib.contextmanager
def finishing(*managers: ocp.CheckpointManager) -> Iterator[None]:
  """Waits for the managers' asynchronous saves on the way out, also when an error
  (a non-finite step, an interrupt) ends the run: a save in flight completes, and its
  manifest is written (`seal`)."""
  try:
    yield
  finally:
    for mngr in managers:
      seal(mngr)


@jax.jit
def _all_finite(leaves: list[jax.Array]) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves] or [jnp.array(True)]))


def all_finite(tree: PyTree) -> bool:
  """Whether every floating-point leaf of `tree` is finite."""
  leaves = [x for x in jax.tree.leaves(tree)
            if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)]
  return bool(syncs.fetch(_all_finite(leaves), "finite check"))


def _save_failed(mngr: ocp.CheckpointManager, step: int | None,
                 e: BaseException) -> errors.CheckpointSaveError:
  """The one-line error of a failed save: what failed, and that the older checkpoints
  stand and a rerun resumes from them."""
  older = [s for s in mngr.all_steps() if step is None or s < step]
  what = f"step {step}" if step is not None else "a checkpoint"
  stand = (f"the older checkpoints ({', '.join(map(str, sorted(older)[-3:]))}) are intact"
           if older else "no older checkpoint exists")
  return errors.CheckpointSaveError(
      f"saving {what} to {mngr.directory} failed ({damage(e)}); {stand}: free space (or fix "
      "the folder) and rerun the same command to resume")


def save(mngr: ocp.CheckpointManager, step: int, state: PyTree,
         progress: dict[str, Any] | None = None,
         metrics: dict[str, float] | None = None) -> None:
  """Starts an asynchronous save of `state` (and its `progress` record) at `step`;
  a best-keeping manager's saves carry `metrics` ({} where the step is not a new best).

  A no-op if that step is already saved.

  Raises:
    errors.NonFiniteError: `state` holds NaN or inf (the last good checkpoint stays the latest).
    errors.CheckpointSaveError: the save (or the previous one, still in flight) failed.
  """
  if step in mngr.all_steps():
    return
  if not all_finite(state):
    raise errors.NonFiniteError(f"refusing to save the state of step {step}: it holds NaN or inf "
                         f"values; the latest checkpoint stays step {mngr.latest_step()}")
  seal(mngr)   # the previous save finished (orbax would wait for it here anyway)
  syncs.note("checkpoint save")   # orbax copies the state to the host before it returns
  items = {STATE: ocp.args.StandardSave(state)}
  if progress is not None:
    items[PROGRESS] = ocp.args.JsonSave(progress)
  try:
    faults.maybe_fail("save", step)
    mngr.save(step, args=ocp.args.Composite(**items), metrics=metrics)
  except (OSError, ValueError, RuntimeError) as e:
    raise _save_failed(mngr, step, e) from None
  faults.maybe_kill("save", step)
  faults.maybe_signal("save", step)


def damage(e: BaseException) -> str:
  """What an orbax / TensorStore restore error says is wrong, in one line: the innermost
  cause's first line (which names the array and the byte range), without the spec dump."""
  causes, seen = [], set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    causes.append(e)
    e = e.__cause__ or e.__context__
  for cause in reversed(causes):
    line = (str(cause).strip().splitlines() or [""])[0]
    line = line.split(" See full TensorStore details")[0].strip()
    if line:
      return f"{type(cause).__name__}: {line}"[:300]
  return type(causes[0]).__name__


def _late_read_completion(unraisable) -> bool:
  """A read TensorStore finished after orbax's event loop closed: it reports `RuntimeError:
  Event loop is closed`, raised in `loop.call_soon_threadsafe`, with no object."""
  if not (unraisable.object is None and isinstance(unraisable.exc_value, RuntimeError)
          and str(unraisable.exc_value) == "Event loop is closed"):
    return False
  frames = traceback.extract_tb(unraisable.exc_traceback)
  return any(frame.name == "call_soon_threadsafe" for frame in frames)


class _AbandonedReadTasks(std_logging.Filter):
  """Drops asyncio's reports of an orbax read task (`async_deserialize`) abandoned when
  another array's failed read ended the restore: "Task exception was never retrieved"
  (it failed too; with a traceback and the whole TensorStore spec) or "Task was destroyed
  but it is pending!". They come when the task is collected, at any later time."""

  REPORTS = ("Task exception was never retrieved", "Task was destroyed but it is pending")

  def filter(self, record: std_logging.LogRecord) -> bool:
    message = record.getMessage()
    return not (message.startswith(self.REPORTS)
                and ("async_deserialize" in message or "_read_array_index" in message))


_ASYNCIO_LOGGER = std_logging.getLogger("asyncio")


def _drop_late_read_completions() -> None:
  """After a damaged read, TensorStore goes on with the abandoned reads of the other
  arrays on its own threads, and each one that finishes after orbax's event loop has
  closed prints a traceback, at any later time; a read task that fails is reported by
  asyncio when collected. From the first damaged read on, this process drops those
  reports, and only those (the hook installed again if another one has replaced it)."""
  if not any(isinstance(f, _AbandonedReadTasks) for f in _ASYNCIO_LOGGER.filters):
    _ASYNCIO_LOGGER.addFilter(_AbandonedReadTasks())
  previous = sys.unraisablehook
  if getattr(previous, "drops_late_read_completions", False):
    return

  def hook(unraisable):
    if not _late_read_completion(unraisable):
      previous(unraisable)

  hook.drops_late_read_completions = True
  sys.unraisablehook = hook


@contextlib.contextmanager
def _quiet_failed_reads() -> Iterator[None]:
  """When one array of a damaged checkpoint fails to read, orbax leaves the reads of the
  others as coroutines or tasks that raise the same error when collected, or as reads that
  finish later; Python would print each with a traceback and the whole TensorStore spec. Within
  this context (and a collection at its end) those are dropped, and after a failed read
  the late ones for good: the caller reports the damage in one line."""
  previous = sys.unraisablehook

  def hook(unraisable):
    if "_read_array_index" not in repr(unraisable.object) and not _late_read_completion(
        unraisable):
      previous(unraisable)

  sys.unraisablehook = hook
  abandoned = _AbandonedReadTasks()
  _ASYNCIO_LOGGER.addFilter(abandoned)
  failed = False
  try:
    yield
  except Exception:
    failed = True
    raise
  finally:
    gc.collect()
    sys.unraisablehook = previous
    _ASYNCIO_LOGGER.removeFilter(abandoned)
    if failed:
      _drop_late_read_completions()


def _set_aside(mngr: ocp.CheckpointManager, step: int) -> Path:
  """Moves a damaged step out of the manager's folder (`_set_aside_folder`)."""
  target = _set_aside_folder(Path(mngr.directory), step)
  mngr.reload()
  return target


def _set_aside_folder(folder: Path, step: int) -> Path:
  """Moves a damaged step out of `folder` into
  `<workdir>/damaged_checkpoints/<folder>_<step>` (process 0; the others wait)."""
  target = folder.parent / DAMAGED / f"{folder.name}_{step}"
  if jax.process_index() == 0:
    target.parent.mkdir(parents=True, exist_ok=True)
    n = 1
    while target.exists():
      n += 1
      target = target.with_name(f"{folder.name}_{step}.{n}")
    (folder / str(step)).rename(target)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"mae_jax set aside checkpoint {step}")
  return target


def _restore_step(mngr: ocp.CheckpointManager, step: int, abstract: PyTree
                  ) -> tuple[PyTree, dict[str, Any] | None] | str:
  """(state, progress) of one step, or what is wrong with it: its manifest's verdict
  first (orbax never reads a step that fails it), then orbax's read, then a finite check."""
  folder = Path(mngr.directory) / str(step)
  problem = manifest_problem(folder)
  if problem:
    return problem
  items = {STATE: ocp.args.StandardRestore(abstract)}
  if (folder / PROGRESS).is_dir():
    items[PROGRESS] = ocp.args.JsonRestore()
  try:
    with _quiet_failed_reads():
      restored = mngr.restore(step, args=ocp.args.Composite(**items))
  except Exception as e:  # pylint: disable=broad-except
    return damage(e)
  if not all_finite(restored[STATE]):
    return "it holds NaN or inf values"
  return restored[STATE], (restored[PROGRESS] if PROGRESS in items else None)


def restore_latest(mngr: ocp.CheckpointManager, template: PyTree
                   ) -> tuple[PyTree, int, dict[str, Any] | None] | None:
  """The newest checkpoint that restores, shaped and sharded like `template`. A newer
  one that does not (its files differ from its manifest, a truncated or missing file,
  values that are not finite) is logged in one line and set aside in
  `<workdir>/damaged_checkpoints/`, never deleted.

  Returns:
    (state, step, progress record or None if the checkpoint has none), or None
    if there is no checkpoint.

  Raises:
    errors.DamagedCheckpointError: there are checkpoints, but none restores.
  """
  return _restore_first(mngr, template, sorted(mngr.all_steps(), reverse=True))


def restore_best(mngr: ocp.CheckpointManager, template: PyTree
                 ) -> tuple[PyTree, int, dict[str, Any] | None] | None:
  """The best-ranked checkpoint that restores (`restore_latest`'s checks; a damaged one
  is set aside and the next best taken), or None if no save was a new best."""
  return _restore_first(mngr, template, ranked_steps(mngr.directory), "next best")


def _restore_first(mngr: ocp.CheckpointManager, template: PyTree, steps: list[int],
                   then: str = "one before") -> tuple[PyTree, int, dict[str, Any] | None] | None:
  """The first of `steps` that restores; the damaged ones before it set aside."""
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
  skipped = []
  for step in steps:
    folder = Path(mngr.directory) / str(step)
    if not (folder / STATE).is_dir() and (folder / LEGACY_STATE).is_dir():
      raise errors.IncompatibleCheckpointError(
          f"checkpoint {folder} was written by an older mae_jax (no '{STATE}' item); "
          "start this stage in a new workdir")
    out = _restore_step(mngr, step, abstract)
    if isinstance(out, str):
      moved = _set_aside(mngr, step)
      logging.warning("checkpoint step %d skipped: %s is damaged (%s); moved to %s, not "
                      "deleted; trying the %s", step, folder, out, moved, then)
      skipped.append(f"step {step} ({out}; now in {moved})")
      continue
    return out[0], step, out[1]
  if skipped:
    raise errors.DamagedCheckpointError(
        f"no checkpoint in {mngr.directory} restores: {'; '.join(skipped)}. Start this stage "
        "in a new workdir, or copy an intact checkpoint back")
  return None


def latest_step(workdir: str | Path) -> int | None:
  """The latest checkpoint step in a workdir, without building a state."""
  path = Path(workdir).absolute() / workdir_lib.CHECKPOINTS
  if not path.is_dir():
    return None
  try:
    with ocp.CheckpointManager(path) as mngr:
      return mngr.latest_step()
  except ValueError:   # a step's metrics file does not parse: orbax cannot open the folder
    return max(_step_dirs(path), default=None)


class _NoItemMetadataNote(std_logging.Filter):
  """Drops orbax's "Metadata file does not exist" warning: a checkpoint item read on its
  own (`restore_on_one_device`) never has the step-level metadata file it looks for, so
  the warning came with every healthy restore and read like damage."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Metadata file does not exist")


@contextlib.contextmanager
def _quiet_item_metadata() -> Iterator[None]:
  """Within this context orbax's absl logger drops `_NoItemMetadataNote`'s warning."""
  quiet, absl_logger = _NoItemMetadataNote(), logging.get_absl_logger()
  absl_logger.addFilter(quiet)
  try:
    yield
  finally:
    absl_logger.removeFilter(quiet)


def restore_on_one_device(item: Path) -> dict:
  """Restores a saved pytree onto this process's first device, whatever mesh wrote it
  (a stage may start from one that ran on another number of devices)."""
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  with _quiet_item_metadata(), ocp.StandardCheckpointer() as ckptr:
    tree = ckptr.metadata(item).item_metadata.tree
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                            tree, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))
    return ckptr.restore(item, abstract)


def restore_latest_on_one_device(folder: str | Path, best: bool = False) -> tuple[dict, int]:
  """(the newest checkpoint's state that restores, its step) of a checkpoint manager's
  directory (`<workdir>/checkpoints`), on one device; with `best`, the best-ranked
  one's (the epoch a classifier stage chose on validation). One that does not restore is
  skipped with one warning (and left where it is: this reads another stage's workdir).

  Raises:
    errors.MissingCheckpointError: there is no complete checkpoint there (with `best`:
      none that was a new best).
    errors.DamagedCheckpointError: there are checkpoints, but none restores.
  """
  folder = Path(folder).absolute()
  # Listed, and ranked, without orbax opening the folder: it would read every step's
  # metrics and fail on one that does not parse.
  listed = _step_dirs(folder)
  unreadable = {s: why for s in listed for why in [_metrics_of(folder / str(s))[1]] if why}
  steps = sorted(listed, reverse=True)
  if best:   # a step whose metrics file does not parse might have been the best: tried first
    steps = sorted(unreadable, reverse=True) + ranked_steps(folder)
  if not steps:
    raise errors.MissingCheckpointError(
        f"no {'checkpoint chosen on validation' if best else 'complete checkpoint'} in {folder}")
  skipped = []
  for step in steps:
    item = folder / str(step) / STATE
    why = unreadable.get(step) or manifest_problem(item.parent)
    if why is None:
      try:
        with _quiet_failed_reads():
          tree = restore_on_one_device(item if item.is_dir() else item.with_name(LEGACY_STATE))
        if all_finite(tree):
          return tree, step
        why = "it holds NaN or inf values"
      except Exception as e:  # pylint: disable=broad-except
        why = damage(e)
    logging.warning("checkpoint %s skipped: it is damaged (%s); trying the %s",
                    item.parent, why, "next best" if best else "one before")
    skipped.append(f"step {step}: {item.parent} ({why})")
  raise errors.DamagedCheckpointError(
      f"no checkpoint in {folder} restores: {'; '.join(skipped)}. Rerun the stage that "
      "wrote it (its resume sets the damaged steps aside) or point at another workdir")
