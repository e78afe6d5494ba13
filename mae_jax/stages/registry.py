"""The stage registry: a stage's name -> the function that runs it.

Each stage module registers its entry point with `@register("name")`; `main.py`
(through `launch.py`) and the pipeline look stages up here, so there is one table.
A stage function takes `(config, workdir)` and returns its summary.
"""

from __future__ import annotations

from typing import Any, Callable

import ml_collections

Stage = Callable[[ml_collections.ConfigDict, str], Any]
_STAGES: dict[str, Stage] = {}


def register(*names: str) -> Callable[[Stage], Stage]:
  """Registers the decorated function as the stage(s) `names`."""
  def add(fn: Stage) -> Stage:
    for name in names:
      if name in _STAGES and _STAGES[name] is not fn:
        raise ValueError(f"stage {name!r} is registered twice")
      _STAGES[name] = fn
    return fn
  return add


def names() -> tuple[str, ...]:
  """Every registered stage name, in registration order."""
  return tuple(_STAGES)


def get(name: str) -> Stage:
  """The function of stage `name`.

  Raises:
    KeyError: no such stage (the message lists the known ones).
  """
  if name not in _STAGES:
    raise KeyError(f"unknown stage {name!r}; known: {', '.join(_STAGES)}")
  return _STAGES[name]
