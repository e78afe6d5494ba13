"""Stopping when a cluster asks: SIGTERM (Slurm's cancel and time limit, preemptible cloud
GPUs, Cloud TPU VMs), SIGINT (Ctrl-C) and one configurable signal (`stop_signal`, SIGUSR1
by default: Slurm sends it ahead of the end with `--signal=USR1@120`).

`watching(stop_signal)` installs the handlers for a whole run. Outside a training loop a
signal stops the process at once with `Preempted` (nothing unsaved is lost there). Inside
one (`training()`) the handler only sets a flag: the loop ends the chunk it is in, saves
a checkpoint at that step, waits for it, then raises `Preempted`; `main.py` says so in
one line with the command that resumes, and exits with `EXIT_STATUS`. On many hosts
`stop_requested` agrees across processes, so every host stops at the same step.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils

from mae_jax.runtime import errors

# The exit status of a run stopped on a signal with its checkpoint saved: EX_TEMPFAIL
# ("try again later"), what a requeueing job script tests for.
EXIT_STATUS = 75
DEFAULT_SIGNAL = "SIGUSR1"
ALWAYS = ("SIGTERM", "SIGINT")


class Preempted(errors.UserError):
  """The run stopped on a signal; `saved` says where its checkpoint is (None: nothing to
  save, the stop came outside training)."""

  def __init__(self, signal_name: str, step: int | None = None, saved: str | None = None):
    self.signal_name, self.step, self.saved = signal_name, step, saved
    where = (f" at step {step} with the checkpoint saved in {saved}" if saved is not None
             else " (outside training: nothing unsaved)")
    super().__init__(f"stopped on {signal_name}{where}")


class _State:
  received: str | None = None     # the name of the first signal received
  deferring: int = 0              # > 0 inside a training loop
  lock = threading.Lock()


def signal_names(stop_signal: str) -> tuple[str, ...]:
  """The signals a run stops on: SIGTERM, SIGINT and `stop_signal` ('' for none)."""
  names = ALWAYS + ((stop_signal,) if stop_signal and stop_signal not in ALWAYS else ())
  unknown = [n for n in names if not hasattr(signal, n)]
  if unknown:
    raise ValueError(f"stop_signal={stop_signal!r} is no signal of this system")
  return names


def _handle(signum: int, frame) -> None:
  del frame
  name = signal.Signals(signum).name
  with _State.lock:
    first = _State.received is None
    if first:
      _State.received = name
  if not _State.deferring:
    raise Preempted(name)


@contextlib.contextmanager
def watching(stop_signal: str = DEFAULT_SIGNAL) -> Iterator[None]:
  """Handlers for the run's stop signals while the context is open (main thread only;
  elsewhere it does nothing), the previous ones restored after."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  previous = {}
  for name in signal_names(stop_signal):
    number = getattr(signal, name)
    previous[number] = signal.signal(number, _handle)
  try:
    yield
  finally:
    for number, handler in previous.items():
      signal.signal(number, handler)
    _State.received = None


@contextlib.contextmanager
def training() -> Iterator[None]:
  """Within a training loop a stop signal only sets the flag the loop reads at its chunk
  boundaries (`stop_requested`)."""
  _State.deferring += 1
  try:
    yield
  finally:
    _State.deferring -= 1


def received() -> str | None:
  """The stop signal this process received, or None."""
  return _State.received


def stop_requested() -> str | None:
  """The signal a run stops on if any process received one, else None; every process of
  a multi-host run gets the same answer (one all-gather of a flag)."""
  mine = received()
  if jax.process_count() == 1:
    return mine
  codes = np.asarray(multihost_utils.process_allgather(
      np.asarray(getattr(signal, mine).value if mine else 0, np.int32)))
  code = int(codes.max())
  return signal.Signals(code).name if code else None


def send_to_self(name: str = "SIGTERM") -> None:
  """Sends this process a signal (the tests' deterministic stop points)."""
  os.kill(os.getpid(), getattr(signal, name))
