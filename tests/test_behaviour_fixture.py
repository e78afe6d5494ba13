"""The tiny chain (pipeline, predict, high-pass pretraining, exports) against the fixture
recorded before the library was reorganised (`tests/chain_fixture.py`).

On a machine like the one that recorded it (same jax, same CPU vector units) every
param, exported tensor and prediction must be bit-identical and every number of
`eval_metrics.json` equal. Elsewhere XLA may round differently, so params are compared
by shape and norm and metrics to a tolerance.
"""

from __future__ import annotations

import json
import math

import pytest

from tests import chain_fixture


def _close(a, b, rel: float, abs_: float) -> bool:
  if a is None or b is None:
    return a is b
  return math.isclose(a, b, rel_tol=rel, abs_tol=abs_)


@pytest.mark.slow
def test_tiny_chain_matches_the_recorded_fixture(tmp_path):
  expected = json.loads(chain_fixture.FIXTURE.read_text())
  chain_fixture.run_chain(tmp_path / "chain")
  got = chain_fixture.summarise(tmp_path / "chain")
  exact = chain_fixture.machine() == expected["machine"]
  problems = []
  for stage, want in expected["params"].items():
    have = got["params"][stage]
    if have["step"] != want["step"]:
      problems.append(f"{stage}: step {have['step']} != {want['step']}")
    if set(have["leaves"]) != set(want["leaves"]):
      problems.append(f"{stage}: param names differ: "
                      f"{sorted(set(have['leaves']) ^ set(want['leaves']))}")
      continue
    for name, leaf in want["leaves"].items():
      mine = have["leaves"][name]
      same = (mine["sha256"] == leaf["sha256"] if exact else
              mine["shape"] == leaf["shape"] and _close(mine["l2"], leaf["l2"], 1e-3, 1e-6))
      if not same:
        problems.append(f"{stage}: {name} differs")
  for stage, want in expected["eval_metrics"].items():
    for key, value in want.items():
      if key not in got["eval_metrics"][stage]:
        problems.append(f"{stage} eval_metrics: {key} is missing")
      elif not (got["eval_metrics"][stage][key] == value if exact else
                _close(got["eval_metrics"][stage][key], value, 0.0, 0.05)):
        problems.append(f"{stage} eval_metrics: {key} = {got['eval_metrics'][stage][key]}, "
                        f"recorded {value}")
  for key, value in expected["predict"]["metrics"].items():
    mine = got["predict"]["metrics"].get(key, "missing")
    if mine != value if exact else not (mine != "missing" and _close(mine, value, 0.0, 0.05)):
      problems.append(f"predict metrics: {key} = {mine}, recorded {value}")
  if exact:
    if got["predict"]["predictions_sha256"] != expected["predict"]["predictions_sha256"]:
      problems.append("predictions.csv differs")
    for name, tensors in expected["export"].items():
      if got["export"][name] != tensors:
        problems.append(f"export {name}: tensors differ")
  assert not problems, "\n".join(problems[:40])
