"""Deterministic crash points, so tests can kill a run exactly where they mean to.

`MAE_JAX_KILL_AT="step:5,save:8"` makes the process SIGKILL itself right after
training step 5 (once checkpoints already being written have finished, so the
point is the same every run), or right after the save of step 8 has started (its
files half written). `MAE_JAX_FAIL_SAVE_AT` makes a save fail as a full disk would.
`MAE_JAX_SIGNAL_AT="step:5"` (or `save:8`, `eval:2`: as an epoch's evaluation starts)
sends the process `MAE_JAX_SIGNAL` (SIGTERM by default), as a cluster would.
Unset, every call is a no-op. Only the tests set them.
"""

from __future__ import annotations

import errno
import os
import signal

ENV = "MAE_JAX_KILL_AT"
POINTS = ("step", "save")
SIGNAL_ENV, SIGNAL_NAME_ENV = "MAE_JAX_SIGNAL_AT", "MAE_JAX_SIGNAL"
# `MAE_JAX_FAIL_SAVE_AT="8"`: the save of step 8 fails as a full disk would (ENOSPC).
FAIL_ENV = "MAE_JAX_FAIL_SAVE_AT"


def maybe_fail(point: str, step: int) -> None:
  """Raises OSError(ENOSPC) at the save of a step listed in $MAE_JAX_FAIL_SAVE_AT (tests of
  a failed save; a real full disk fails the same way inside orbax)."""
  spec = os.environ.get(FAIL_ENV)
  if point == "save" and spec and str(step) in (s.strip() for s in spec.split(",")):
    raise OSError(errno.ENOSPC, f"No space left on device (injected at step {step})")


def armed(point: str, step: int) -> bool:
  """Whether `point:step` is listed in $MAE_JAX_KILL_AT."""
  spec = os.environ.get(ENV)
  return bool(spec) and f"{point}:{step}" in (s.strip() for s in spec.split(","))


def maybe_kill(point: str, step: int) -> None:
  """SIGKILLs this process if `point:step` is listed in $MAE_JAX_KILL_AT."""
  spec = os.environ.get(ENV)
  if not spec:
    return
  if point not in POINTS:
    raise ValueError(f"unknown crash point {point!r}; known: {POINTS}")
  if f"{point}:{step}" in (s.strip() for s in spec.split(",")):
    os.kill(os.getpid(), signal.SIGKILL)


def maybe_signal(point: str, step: int) -> None:
  """Sends this process $MAE_JAX_SIGNAL (default SIGTERM) if `point:step` is listed in
  $MAE_JAX_SIGNAL_AT (points: step, save, eval)."""
  spec = os.environ.get(SIGNAL_ENV)
  if spec and f"{point}:{step}" in (s.strip() for s in spec.split(",")):
    os.kill(os.getpid(), getattr(signal, os.environ.get(SIGNAL_NAME_ENV, "SIGTERM")))
