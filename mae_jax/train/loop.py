"""The epoch loop every training stage shares, and the host-side checks around it.

A stage supplies the step, its batches and what happens at the end of each epoch;
this loop steps, logs, checks for NaN/inf, checkpoints and resumes exactly. It
imports no data library and no logging framework: batches arrive from a callable
and metrics leave through a `MetricWriter` (clu's, or the TensorFlow-free one the
stages make when TensorFlow is absent).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Protocol

import jax
import numpy as np
import optax
from absl import logging
from flax import traverse_util
from jax.experimental import multihost_utils
from tqdm import tqdm

from mae_jax.runtime import checkpoint
from mae_jax.runtime import errors
from mae_jax.runtime import faults
from mae_jax.runtime import fileio
from mae_jax.runtime import preemption
from mae_jax.runtime import syncs
from mae_jax.runtime import workdir as workdir_lib

# How often (seconds) the loop logs steps/s and the time left.
REPORT_EVERY_SECONDS = 60.0


class MetricWriter(Protocol):
  """What the loop writes metrics through (the methods of clu's `MetricWriter` it uses)."""

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None: ...

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None: ...

  def write_hparams(self, hparams: Mapping[str, Any]) -> None: ...

  def flush(self) -> None: ...


# --- Host-side helpers -------------------------------------------------------------


def is_main_process() -> bool:
  return jax.process_index() == 0


def agree_max(value: int) -> int:
  """The maximum of `value` over all processes."""
  if jax.process_count() == 1:
    return int(value)
  return int(np.max(multihost_utils.process_allgather(np.asarray(value))))


def check_finite(metrics: dict, step: int) -> dict[str, float]:
  """Host values of a step's metrics; raises NonFiniteError naming the step and metric."""
  host = {k: float(v) for k, v in jax.device_get(metrics).items()}
  if not host.get("finite", 1.0):
    bad = [f"{k}={v}" for k, v in host.items() if k != "finite" and not np.isfinite(v)]
    raise errors.NonFiniteError(
        f"non-finite {', '.join(bad) or 'values'} at step {step}; the update was not applied "
        "and no checkpoint of it was written. Lower the learning rate or enable grad_clip_norm.")
  return host


def host_lr(schedule: optax.Schedule, step: int) -> float:
  """The learning rate after `step`, computed on the host's CPU: evaluating the schedule
  on the default device would queue an op behind the chunk just dispatched and wait."""
  with jax.default_device(jax.local_devices(backend="cpu")[0]):
    return float(schedule(max(step, 0)))


def load_history(workdir: Path, completed_epochs: int) -> list[dict]:
  """Per-epoch records of earlier runs, cut to the epochs the checkpoint completed."""
  path = workdir / workdir_lib.HISTORY_FILE
  if not path.exists():
    return []
  return [h for h in json.loads(path.read_text()) if h["epoch"] <= completed_epochs]


def hparams(config: Mapping[str, Any]) -> dict[str, Any]:
  """The config (a plain nested dict) as flat `a.b.c` scalars, for TensorBoard's hparams."""
  flat = traverse_util.flatten_dict(dict(config), sep=".")
  return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flat.items()}


# --- The epoch loop ----------------------------------------------------------------


def problems(config: Any) -> list[str]:
  """Problems of a training stage's loop keys (`LoopSettings`, `eval_every_epochs`)."""
  found = []
  if "steps_per_call" in config and (not isinstance(config.steps_per_call, int)
                                     or config.steps_per_call < 1):
    found.append(f"steps_per_call={config.steps_per_call} must be a whole number >= 1")
  profile = tuple(config.get("profile_steps", ()) or ())
  if profile and (len(profile) != 2 or not all(isinstance(s, int) for s in profile)
                  or not 0 <= profile[0] < profile[1]):
    found.append(f"profile_steps={profile} must be () or (first, last) steps, first < last")
  if "eval_every_epochs" in config and (not isinstance(config.eval_every_epochs, int)
                                        or config.eval_every_epochs < 1):
    found.append(f"eval_every_epochs={config.eval_every_epochs} must be a whole number >= 1")
  return found


@dataclasses.dataclass(frozen=True)
class LoopSettings:
  """The loop keys of a training stage's config (defaults in `configs/common.py`)."""
  seed: int                      # the run's PRNG seed (checked on resume)
  log_every_steps: int           # write the training metrics every N steps
  checkpoint_every_epochs: int   # save every N epochs (and after the last); 0: off
  checkpoint_every_steps: int    # also save every N steps; 0: off
  steps_per_call: int            # training steps per dispatch
  profile_steps: tuple[int, ...]  # (first, last) steps of a profiler trace, or ()

  @classmethod
  def from_config(cls, config: Any) -> "LoopSettings":
    """From a training stage's config (anything with the keys above)."""
    return cls(seed=int(config.seed), log_every_steps=int(config.log_every_steps),
               checkpoint_every_epochs=int(config.checkpoint_every_epochs),
               checkpoint_every_steps=int(config.checkpoint_every_steps),
               steps_per_call=int(config.steps_per_call),
               profile_steps=tuple(int(s) for s in config.profile_steps or ()))


@dataclasses.dataclass
class Loop:
  """A stage's training run: what to step, over which data, for how long."""
  settings: LoopSettings
  workdir: Path
  state: Any                          # replicated train state with `.step`
  # (state, epoch, first batch, number of steps, key) -> (state, per-step metrics): that
  # many steps of `epoch` from `first` on, in one dispatch. Batches depend only on
  # (seed, epoch, batch index), so a resumed run sees the same ones.
  run_chunk: Callable[[Any, int, int, int, jax.Array], tuple[Any, dict]]
  train_examples: int                 # the training split's size (resume check)
  global_batch: int
  steps_per_epoch: int
  total_epochs: int
  schedule: optax.Schedule
  describe: Callable[[int], str] = lambda e: ""             # epoch -> progress-bar suffix
  phase: Callable[[int], int] = lambda e: 1                 # epoch -> phase (1-based)
  name: str = "train"                                       # the progress bar's label
  watch: tuple[str, ...] = ()         # the epoch record's numbers the progress bar shows
  # (record key, lower is better): an epoch whose record is a new best of it is saved
  # with it as metrics, which the manager's BestN policy keeps (checkpoint.manager).
  keep_best: tuple[str, bool] | None = None


def best_metrics(loop: Loop, history: list[dict], record: dict) -> dict[str, float] | None:
  """The metrics of a save at `record`'s epoch: with `loop.keep_best`, its value if it
  is finite and beats every earlier record's (ties keep the first), else {}; None
  without it."""
  if loop.keep_best is None:
    return None
  key, lower = loop.keep_best
  finite = lambda v: v is not None and bool(np.isfinite(v))  # pylint: disable=unnecessary-lambda-assignment
  best = None
  for h in history:
    value = h.get(key)
    if h is not record and finite(value) and (
        best is None or (value < best if lower else value > best)):
      best = value
  value = record.get(key)
  if not finite(value) or (best is not None and not (value < best if lower else value > best)):
    return {}
  return checkpoint.best_metrics(key, value, lower)


def chunk_plan(epoch: int, first: int, loop: Loop) -> list[tuple[int, int]]:
  """(first batch, steps) of each dispatch of `epoch` from batch `first` on.

  Chunks hold `steps_per_call` steps, counted from the epoch's start, and also end
  where a checkpoint is due and at the epoch's end, so a resumed run (which starts at
  such a boundary) dispatches exactly the chunks of an uninterrupted one. The profile
  cuts nothing: it snaps to these boundaries (`_Profile`), so it costs no extra compile.
  """
  spe = loop.steps_per_epoch
  per_call = max(loop.settings.steps_per_call, 1)
  base = epoch * spe
  cuts = {b for b in range(per_call, spe, per_call)} | {spe}
  every = loop.settings.checkpoint_every_steps
  if every > 0:
    cuts |= {b for b in range(1, spe) if (base + b) % every == 0}
  cuts = sorted(c for c in cuts if c > first)
  plan, start = [], first
  for c in cuts:
    plan.append((start, c - start))
    start = c
  return plan


def open_run(workdir: Path, config: Mapping[str, Any], state: Any,
             steps_per_epoch: int, mngr, writer: MetricWriter
             ) -> tuple[Any, int, list[dict], dict | None]:
  """Resumes `state` from this workdir's latest checkpoint if there is one.

  A fresh run writes its hparams and `config.json` (`config`: the stage's whole
  config as a plain nested dict). Returns (state, step, history cut to that step,
  the checkpoint's progress record or None).
  """
  restored = checkpoint.restore_latest(mngr, state)
  step, progress = 0, None
  if restored is not None:
    state, step, progress = restored
    logging.info("resuming from checkpoint step %d (epoch %d, batch %d of %d)", step,
                 step // steps_per_epoch + 1, step % steps_per_epoch, steps_per_epoch)
  history = load_history(workdir, step // steps_per_epoch)
  if step == 0:
    writer.write_hparams(hparams(config))
    if is_main_process():
      fileio.write_json_atomic(workdir / workdir_lib.CONFIG_FILE, dict(config))
  return state, step, history, progress


def _progress(loop: Loop, step: int, key: jax.Array, losses: list[float]) -> dict[str, Any]:
  """Where a run stands after `step`: enough to continue it exactly (saved with the state).

  `epoch_losses` are the training losses not yet recorded in history.json.
  """
  epoch, batch = divmod(step, loop.steps_per_epoch)
  return {"step": step, "epoch": epoch, "batch_in_epoch": batch,
          "steps_per_epoch": loop.steps_per_epoch,
          "global_batch": loop.global_batch,
          "process_count": jax.process_count(), "train_examples": loop.train_examples,
          "seed": loop.settings.seed, "rng_key": np.asarray(jax.random.key_data(key)).tolist(),
          "phase": loop.phase(min(epoch, loop.total_epochs - 1)), "epoch_losses": list(losses)}


def _resume_key(loop: Loop, step: int, progress: dict | None, key: jax.Array) -> jax.Array:
  """The run's PRNG key from the checkpoint, after checking that the checkpoint's
  data position means the same batches now (else resuming would repeat or skip some)."""
  if progress is None:
    return key
  now = _progress(loop, step, key, [])
  keys = ["step", "steps_per_epoch", "global_batch", "process_count", "seed", "rng_key"]
  if is_main_process():
    keys.append("train_examples")
  diffs = [f"{k} {progress.get(k)} in the checkpoint, {now[k]} now" for k in keys
           if progress.get(k) != now[k]]
  if agree_max(int(bool(diffs))):
    raise errors.ResumeMismatchError(
        f"cannot resume {loop.workdir} at step {step} exactly: "
        f"{'; '.join(diffs) or 'another process differs'}. The batch order would change "
        "(repeating or skipping images); use the original data and batch_size/seed, or a new "
        "--workdir.")
  return jax.random.wrap_key_data(np.asarray(progress["rng_key"], np.uint32))


class _Pace:
  """Logs steps/s and the time left every REPORT_EVERY_SECONDS (and writes steps_per_sec)."""

  def __init__(self, total_steps: int, writer: MetricWriter):
    self.total, self.writer = total_steps, writer
    self.t0, self.s0 = time.time(), None

  def __call__(self, step: int) -> None:
    now = time.time()
    if self.s0 is None:  # the first step compiles: time from after it
      self.t0, self.s0 = now, step
      return
    if now - self.t0 < REPORT_EVERY_SECONDS:
      return
    rate = (step - self.s0) / (now - self.t0)
    left = (self.total - step) / rate if rate > 0 else float("inf")
    logging.vlog(1, "step %d/%d: %.2f steps/s, %.1f min left", step, self.total, rate, left / 60)
    self.writer.write_scalars(step, {"steps_per_sec": rate})
    self.t0, self.s0 = now, step


class _Profile:
  """A `jax.profiler` trace of the steps in `profile_steps` = (first, last), snapped
  to the loop's chunks: it starts at the first chunk that begins at or after step
  `first` and stops after the chunk that reaches step `last`, so a profile never
  splits a chunk (each new chunk length is one more compile of the step)."""

  def __init__(self, profile_steps: tuple[int, ...], workdir: Path):
    steps = tuple(profile_steps)
    self.first, self.last = (steps + (None, None))[:2] if steps else (None, None)
    self.folder, self.on, self.done, self.start = workdir / "profile", False, False, 0

  def before(self, step: int) -> None:
    if (self.first is not None and step >= self.first and not self.on and not self.done
        and is_main_process()):
      jax.profiler.start_trace(str(self.folder))
      self.on, self.start = True, step

  def after(self, step: int, state: Any) -> None:
    if self.on and step >= self.last:
      jax.block_until_ready(state)
      jax.profiler.stop_trace()
      self.on, self.done = False, True
      logging.info("profile of steps %d-%d (asked: %d-%d) written to %s", self.start, step,
                   self.first, self.last, self.folder)


def _catch_up(loop: Loop, step: int, history: list[dict], carried: list[float],
              end_epoch: Callable[[Any, int, dict], None], mngr, progress: dict | None) -> None:
  """A step checkpoint at an epoch's last step, then a stop before that epoch's
  evaluation: the resumed run evaluates and records the epoch first (and where it is a
  new best, saves that step again with its metrics)."""
  done = step // loop.steps_per_epoch
  if step and step % loop.steps_per_epoch == 0 and (not history or history[-1]["epoch"] < done):
    record = {"epoch": done, "step": step,
              "train_loss": float(np.mean(carried)) if carried else None,
              "lr": host_lr(loop.schedule, step - 1), "seconds": 0.0}
    end_epoch(loop.state, done - 1, record)
    history.append(record)
    ranked = best_metrics(loop, history, record)
    if ranked:   # saved before it was evaluated: saved again with its metrics, before the
      mngr.delete(step)   # record joins history.json (a kill in between repeats this)
      checkpoint.save(mngr, step, loop.state, progress, ranked)
      checkpoint.seal(mngr)
    if is_main_process():
      fileio.write_json_atomic(loop.workdir / workdir_lib.HISTORY_FILE, history)


def _record_epoch(loop: Loop, state: Any, epoch: int, step: int, losses: list[float],
                  seconds: float, history: list[dict], writer: MetricWriter,
                  end_epoch: Callable[[Any, int, dict], None], synced: dict[str, int]) -> None:
  """An epoch's record: its loss and rate, what `end_epoch` adds, and `host_syncs`, the
  host's waits on the device since `synced` (the previous record: its checkpoint, this
  epoch's metric fetches and what `end_epoch` fetched); logged, written as scalars and
  appended to history.json."""
  record = {"epoch": epoch + 1, "step": step,
            "train_loss": float(np.mean(losses)) if losses else None,
            "lr": host_lr(loop.schedule, step - 1), "seconds": round(seconds, 2)}
  faults.maybe_signal("eval", epoch + 1)
  end_epoch(state, epoch, record)
  record["host_syncs"] = sum(syncs.since(synced).values())
  history.append(record)
  writer.write_scalars(step, {k: v for k, v in record.items()
                              if isinstance(v, (int, float)) and k not in ("epoch", "step")})
  logging.vlog(1, "epoch %d/%d%s: %s", epoch + 1, loop.total_epochs, loop.describe(epoch),
               ", ".join(f"{k} {v:.5g}" for k, v in record.items()
                         if isinstance(v, float)))
  if is_main_process():
    fileio.write_json_atomic(loop.workdir / workdir_lib.HISTORY_FILE, history)


def _due(n: int, every: int) -> bool:
  return every > 0 and n % every == 0


class _Metrics:
  """An epoch's step metrics: those still on the device (fetched and checked for NaN/inf
  only when a log, the epoch's end or a checkpoint needs them), and the losses fetched."""

  def __init__(self, losses: list[float]):
    self.losses = losses                        # the epoch's training losses so far
    self.pending: list[tuple[int, dict]] = []   # (step after a chunk, its metrics on device)
    self.last: dict[str, float] = {}            # the latest fetched step's metrics

  def flush(self, keep_last: bool = False) -> None:
    """Fetches and checks pending metrics (raising on NaN/inf); keeps their losses."""
    ready = self.pending[:-1] if keep_last else self.pending[:]
    fetched = syncs.fetch([m for _, m in ready], "metrics") if ready else []
    for (end, _), host in zip(ready, fetched):
      n = len(host["loss"])
      for j in range(n):
        self.last = check_finite({k: v[j] for k, v in host.items()}, end - n + j + 1)
        self.losses.append(self.last["loss"])
    del self.pending[:len(ready)]

  def scalars(self, lr: float) -> dict[str, float]:
    """The latest step's training metrics and `lr`, as the writer gets them."""
    return {f"train_{k}": v for k, v in self.last.items() if k != "finite"} | {"lr": lr}


class _Bar:
  """The stage's one progress bar (process 0): steps of the whole run with the rate and
  the time left, and beside them the epoch, the current loss and the last value of each
  of `loop.watch` (the per-step metrics go to metrics.jsonl and TensorBoard only)."""

  def __init__(self, loop: Loop, step: int, history: list[dict]):
    self.loop = loop
    self.bar = tqdm(total=loop.total_epochs * loop.steps_per_epoch, initial=step, unit="step",
                    desc=loop.name, disable=not is_main_process(), dynamic_ncols=True)
    self.fields: dict[str, str] = {}
    for key in loop.watch:
      last = [h[key] for h in history if h.get(key) is not None]
      if last:
        self.fields[key] = f"{last[-1]:.4g}"

  def show(self, epoch: int, steps: int = 0, loss: float | None = None,
           record: dict | None = None) -> None:
    self.fields = {"epoch": f"{epoch + 1}/{self.loop.total_epochs}{self.loop.describe(epoch)}",
                   **{k: v for k, v in self.fields.items() if k != "epoch"}}
    if loss is not None:
      self.fields["loss"] = f"{loss:.4g}"
    for key in self.loop.watch:
      if record and record.get(key) is not None:
        self.fields[key] = f"{record[key]:.4g}"
    self.bar.set_postfix(self.fields, refresh=False)
    self.bar.update(steps)

  def close(self) -> None:
    self.bar.close()


@dataclasses.dataclass
class _Session:
  """What the epochs of one `run_epochs` call share."""
  loop: Loop
  mngr: Any
  writer: MetricWriter
  key: jax.Array
  pace: _Pace
  profile: _Profile
  bar: _Bar


def _crash_points(mngr, step: int, num: int) -> None:
  """The resume tests' crash points (MAE_JAX_KILL_AT) and stop signals
  (MAE_JAX_SIGNAL_AT) at the steps of one chunk."""
  for s in range(step + 1, step + num + 1):
    if faults.armed("step", s):
      checkpoint.seal(mngr)
    faults.maybe_kill("step", s)
    faults.maybe_signal("step", s)


def _stop_if_asked(run: "_Session", step: int, state: Any, metrics: "_Metrics | None") -> None:
  """Where a process received a stop signal (every process agrees, `stop_requested`):
  the state saved at this step (a chunk boundary, so the resumed run dispatches the same
  chunks), the save waited for, then `Preempted`."""
  name = preemption.stop_requested()
  if name is None:
    return
  losses = []
  if metrics is not None:
    metrics.flush()
    losses = metrics.losses
  checkpoint.save(run.mngr, step, state, _progress(run.loop, step, run.key, losses),
                  {} if run.loop.keep_best else None)
  checkpoint.seal(run.mngr)
  raise preemption.Preempted(name, step, str(run.mngr.directory / str(step)))


def _train_epoch(run: _Session, epoch: int, step: int, state: Any,
                 metrics: _Metrics) -> tuple[Any, int]:
  """The chunks of `epoch` from `step` on; returns the state and the step after them.

  A logging step's metrics are fetched while the next chunk runs; a checkpoint due
  inside the epoch saves after its metrics are checked."""
  loop, settings = run.loop, run.loop.settings
  first = step - epoch * loop.steps_per_epoch
  log_due = False
  for start, num in chunk_plan(epoch, first, loop):
    run.profile.before(step)
    state, chunk_metrics = loop.run_chunk(state, epoch, start, num, run.key)
    if log_due:   # the previous chunk's metrics, fetched while this one runs
      metrics.flush(keep_last=True)
      run.writer.write_scalars(step, metrics.scalars(host_lr(loop.schedule, step - 1)))
    _crash_points(run.mngr, step, num)
    log_due = any(_due(s, settings.log_every_steps) for s in range(step + 1, step + num + 1))
    step += num
    metrics.pending.append((step, chunk_metrics))
    run.profile.after(step, state)
    run.bar.show(epoch, num, metrics.losses[-1] if metrics.losses else None)
    run.pace(step)
    if _due(step, settings.checkpoint_every_steps) and start + num < loop.steps_per_epoch:
      metrics.flush()
      checkpoint.save(run.mngr, step, state, _progress(loop, step, run.key, metrics.losses),
                      {} if loop.keep_best else None)
    # One process: its own flag, every chunk. Many: they agree where the metrics are
    # fetched anyway (a log step), so the check adds no wait on the device.
    if (jax.process_count() == 1 and preemption.received() is not None) or (
        jax.process_count() > 1 and log_due):
      _stop_if_asked(run, step, state, metrics)
  return state, step


def run_epochs(loop: Loop, step: int, history: list[dict], mngr, writer: MetricWriter,
               end_epoch: Callable[[Any, int, dict], None],
               progress: dict | None = None) -> Any:
  """Trains from `step` to the end, epoch by epoch; returns the final state.

  Steps run in chunks (`chunk_plan`); their metrics stay on the device until a log,
  an epoch's end or a checkpoint needs them, and are then checked for NaN/inf: a
  non-finite step left the state unchanged, and the run stops, naming it, before
  anything after it is saved. The checkpoint's `progress` record (position, PRNG key,
  the epoch's losses so far) is checked against this run and continued, so a resumed
  run sees exactly the batches an uninterrupted one would. `end_epoch(state, epoch,
  record)` adds evaluation results to the epoch's record (and may draw or save); then
  the record joins `history.json` and a checkpoint is saved when due.
  """
  settings = loop.settings
  key = _resume_key(loop, step, progress, jax.random.fold_in(jax.random.key(settings.seed), 1))
  carried = list((progress or {}).get("epoch_losses", []))
  run = _Session(loop, mngr, writer, key, _Pace(loop.total_epochs * loop.steps_per_epoch, writer),
                 _Profile(settings.profile_steps, loop.workdir), _Bar(loop, step, history))
  try:
    with preemption.training():   # a stop signal waits for the catch-up's save, too
      _catch_up(loop, step, history, carried, end_epoch, mngr, progress)
      return _epochs(run, step, history, carried, end_epoch)
  finally:
    run.bar.close()


def _epochs(run: _Session, step: int, history: list[dict], carried: list[float],
            end_epoch: Callable[[Any, int, dict], None]) -> Any:
  """`run_epochs`' epochs; a stop signal ends them at the next chunk boundary or epoch end
  with a checkpoint there (`_stop_if_asked`)."""
  loop, settings, state = run.loop, run.loop.settings, run.loop.state
  synced = syncs.snapshot()
  for epoch in range(step // loop.steps_per_epoch, loop.total_epochs):
    metrics, t0 = _Metrics(carried if step - epoch * loop.steps_per_epoch else []), time.time()
    state, step = _train_epoch(run, epoch, step, state, metrics)
    metrics.flush()
    run.writer.write_scalars(step, metrics.scalars(host_lr(loop.schedule, step - 1)))
    _record_epoch(loop, state, epoch, step, metrics.losses, time.time() - t0, history,
                  run.writer, end_epoch, synced)
    run.bar.show(epoch, record=history[-1])
    synced = syncs.snapshot()
    best = best_metrics(loop, history, history[-1])
    if _due(epoch + 1, settings.checkpoint_every_epochs) or epoch + 1 == loop.total_epochs or \
        _due(step, settings.checkpoint_every_steps) or best:
      checkpoint.save(run.mngr, step, state, _progress(loop, step, run.key, []), best)
    if epoch + 1 < loop.total_epochs:
      _stop_if_asked(run, step, state, None)
  return state
