"""Claims on shared work: any number of processes (one per GPU, a Slurm job array) working
through the same list of runs in one workdir.

A run is claimed by the process that holds its workdir lock (`runtime.workdir.lock`, which
raises `WorkdirBusyError` in any other); `claimed` turns that into `Deferred`. One pass
goes over the whole list in its fixed order, attempting each run (`Pass.attempt`); a run
another process holds is deferred, and so is a run that needs its result
(`Pass.wait_for`). `until_done` repeats the pass every `poll_seconds` until nothing is
deferred. A dead process's lock ends with it, so its run is taken over on a later pass
(and resumes from its checkpoint); every process ends with the same complete pass.
"""

from __future__ import annotations

import time
from typing import Any, Callable, TypeVar

from absl import logging

from mae_jax.runtime import errors

T = TypeVar("T")


class Deferred(Exception):
  """A run another process holds, or one waiting for such a run."""


def claimed(fn: Callable[[], T], what: str) -> T:
  """`fn()`, which takes the workdir lock of `what`; `Deferred` where another process
  holds it."""
  try:
    return fn()
  except errors.WorkdirBusyError:
    logging.info("%s is being run by another worker; on to the next run", what)
    raise Deferred(str(what)) from None


class Pass:
  """One pass over the runs: the ones it could not do now (held by another process, or
  waiting for one that is)."""

  def __init__(self):
    self.deferred: list[str] = []

  def attempt(self, fn: Callable[..., T], *args, **kwargs) -> tuple[bool, T | None]:
    """(True, fn(...)), or (False, None) where the run (or one it needs) is deferred."""
    try:
      return True, fn(*args, **kwargs)
    except Deferred as e:
      self.deferred.append(str(e))
      return False, None

  def wait_for(self, what: str) -> tuple[bool, None]:
    """Defers a run that needs `what` (a deferred run's result)."""
    self.deferred.append(what)
    return False, None


def until_done(one_pass: Callable[[Pass], T], poll_seconds: float,
               sleep: Callable[[float], Any] = time.sleep) -> T:
  """`one_pass(Pass())` again every `poll_seconds` until a pass defers nothing; its result."""
  while True:
    pass_ = Pass()
    out = one_pass(pass_)
    if not pass_.deferred:
      return out
    logging.info("%d run(s) wait for other workers (%s); looking again in %g s",
                 len(pass_.deferred), ", ".join(pass_.deferred[:3]), poll_seconds)
    sleep(poll_seconds)
