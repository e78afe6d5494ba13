"""Schedules and optax chains, with parameters addressed by `/`-joined names.

Which parameters decay, train at which rate or stay frozen is decided here from
name patterns in the config, in one place, and logged.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
import optax
from absl import logging

PyTree = Any


def param_names(params: PyTree) -> PyTree:
  """A pytree like `params` whose leaves are their `/`-joined names."""
  def name(path, _):
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
  return jax.tree_util.tree_map_with_path(name, params)


def match(params: PyTree, patterns: Sequence[str]) -> PyTree:
  """Bool pytree: True where a parameter's name fully matches one of `patterns`."""
  compiled = [re.compile(p) for p in patterns]
  return jax.tree.map(lambda n: any(c.fullmatch(n) for c in compiled), param_names(params))


def _log_matches(what: str, params: PyTree, selected: PyTree) -> None:
  names = jax.tree.leaves(param_names(params))
  chosen = [n for n, s in zip(names, jax.tree.leaves(selected)) if s]
  logging.info("%s: %d of %d params: %s", what, len(chosen), len(names),
               ", ".join(chosen) if len(chosen) <= 12 else ", ".join(chosen[:12]) + ", ...")


def warmup_cosine(peak_lr: float, total_steps: int, warmup_steps: int,
                  min_lr: float = 0.0) -> optax.Schedule:
  """Linear warmup from 0 to `peak_lr`, then cosine decay to `min_lr` at `total_steps`."""
  if total_steps < 1:
    raise ValueError(f"total_steps must be >= 1, got {total_steps}")
  warmup_steps = min(warmup_steps, total_steps - 1) if total_steps > 1 else 0
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak_lr, warmup_steps=warmup_steps,
      decay_steps=total_steps, end_value=min_lr)


def decay_mask(params: PyTree, no_decay: Sequence[str]) -> PyTree:
  """True for params that take weight decay: every one not matching `no_decay`."""
  return jax.tree.map(lambda skip: not skip, match(params, no_decay))


def adamw(params: PyTree, optim: ml_collections.ConfigDict, total_steps: int,
          steps_per_epoch: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with warmup + cosine per step and no decay on `optim.no_decay` params.

  Reads `optim.lr`, `b1`, `b2`, `weight_decay`, `warmup_epochs`, `min_lr`,
  `no_decay` (name patterns) and `grad_clip_norm` (0: none).
  """
  schedule = warmup_cosine(optim.lr, total_steps, int(optim.warmup_epochs * steps_per_epoch),
                           optim.min_lr)
  mask = decay_mask(params, optim.no_decay)
  _log_matches("weight decay", params, mask)
  chain = []
  if optim.grad_clip_norm:
    chain.append(optax.clip_by_global_norm(optim.grad_clip_norm))
  chain.append(optax.adamw(schedule, b1=optim.b1, b2=optim.b2,
                           weight_decay=optim.weight_decay, mask=mask))
  return optax.chain(*chain), schedule


def count_params(params: PyTree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
