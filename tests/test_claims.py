"""Claims on shared work (runtime/claims.py): a run another process holds is deferred
with the runs that need it, and passes repeat until nothing is deferred."""

from __future__ import annotations

import pytest

from mae_jax.runtime import claims
from mae_jax.runtime import errors
from mae_jax.runtime import workdir as workdir_lib


def test_a_held_workdir_defers_its_run_and_the_pass_goes_on(tmp_path):
  held = tmp_path / "held"

  def run_in(folder):
    with workdir_lib.lock(folder):
      return folder.name

  pass_ = claims.Pass()
  with workdir_lib.lock(held):   # another worker holds it
    ok, out = pass_.attempt(claims.claimed, lambda: run_in(held), "held")
    assert (ok, out) == (False, None)
    assert pass_.attempt(claims.claimed, lambda: run_in(tmp_path / "free"), "free") == (True,
                                                                                        "free")
    pass_.wait_for("needs held")
  assert pass_.deferred == ["held", "needs held"]
  with pytest.raises(ValueError):   # other errors are not claims: they propagate
    pass_.attempt(lambda: (_ for _ in ()).throw(ValueError("boom")))


def test_passes_repeat_until_nothing_is_deferred():
  busy = [True, True, False]   # held for two passes, then free
  slept = []

  def one_pass(pass_):
    if busy.pop(0):
      pass_.attempt(claims.claimed, _raise_busy, "run a")
      return "incomplete"
    return "complete"

  assert claims.until_done(one_pass, 2.5, sleep=slept.append) == "complete"
  assert slept == [2.5, 2.5]


def _raise_busy():
  raise errors.WorkdirBusyError("held elsewhere")
