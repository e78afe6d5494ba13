"""Counting the host's waits on the device (syncs).

A training loop that dispatches chunks of steps asynchronously keeps the accelerator
busy only while the host does not wait on it. Every place where the project's loop
blocks on device results (fetching metrics, a validation pass, a figure, the finite
check before a checkpoint) goes through `fetch` or `note`, so a run can say how many
syncs each epoch cost (`history.json`'s `host_syncs`) and tests can bound them.
"""

from __future__ import annotations

import collections
from typing import Any

import jax

_COUNTS: collections.Counter = collections.Counter()


def note(what: str) -> None:
  """Counts one sync of kind `what` that happened elsewhere (e.g. inside orbax)."""
  _COUNTS[what] += 1


def fetch(tree: Any, what: str) -> Any:
  """`jax.device_get(tree)`, counted as one sync of kind `what`."""
  note(what)
  return jax.device_get(tree)


def total() -> int:
  """Syncs counted so far in this process."""
  return sum(_COUNTS.values())


def snapshot() -> dict[str, int]:
  """Syncs counted so far, by kind."""
  return dict(_COUNTS)


def since(before: dict[str, int]) -> dict[str, int]:
  """Syncs by kind since `snapshot()` returned `before` (kinds with none left out)."""
  return {k: v - before.get(k, 0) for k, v in _COUNTS.items() if v - before.get(k, 0)}
