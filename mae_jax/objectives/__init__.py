"""Pretraining objectives: what the MAE learns to predict, and everything that follows
from it (masking noise, targets, loss, config checks, what an export says).

`from_config(config.loss)` gives the objective the steps use; `problems(config)` gives
its config problems for `stages.validate`. The MAE reconstruction objective
(`reconstruction.py`) is the one there is; a new objective is a module here with the
`base.Objective` interface.
"""

from __future__ import annotations

from typing import Any

from mae_jax.objectives import base
from mae_jax.objectives import reconstruction

Objective = base.Objective


def from_config(loss: Any) -> Objective:
  """The objective of a pretraining config's `loss` (or of a saved config's dict)."""
  return reconstruction.Reconstruction.from_config(loss)


def problems(config: Any) -> list[str]:
  """Problems of a config's objective keys (none where it has no `loss`)."""
  return reconstruction.problems(config.get("loss", {}), config.get("model", {}))
