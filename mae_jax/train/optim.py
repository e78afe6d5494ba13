"""Schedules and optax chains, with parameters addressed by `/`-joined names.

Which parameters decay, train at which rate or stay frozen is decided here from
name patterns in the optimiser settings (`AdamWSettings`, `ClassifierOptimSettings`,
made from a config's `optim` by the stage), in one place, and logged.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

import jax
import numpy as np
import optax
from absl import logging
from flax import traverse_util

PyTree = Any


def param_names(params: PyTree) -> PyTree:
  """A pytree like `params` (nested dicts) whose leaves are their `/`-joined names."""
  return traverse_util.path_aware_map(lambda path, _: "/".join(path), params)


def match(params: PyTree, patterns: Sequence[str]) -> PyTree:
  """Bool pytree: True where a parameter's name fully matches one of `patterns`."""
  compiled = [re.compile(p) for p in patterns]
  return jax.tree.map(lambda n: any(c.fullmatch(n) for c in compiled), param_names(params))


def _log_matches(what: str, params: PyTree, selected: PyTree) -> None:
  """How many params a name pattern selected (their names at absl verbosity 1)."""
  names = jax.tree.leaves(param_names(params))
  chosen = [n for n, s in zip(names, jax.tree.leaves(selected)) if s]
  logging.info("%s: %d of %d params", what, len(chosen), len(names))
  logging.vlog(1, "%s: %s", what, ", ".join(chosen))


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


@dataclasses.dataclass(frozen=True)
class AdamWSettings:
  """Pretraining's AdamW: a pretraining config's `optim` (defaults in `configs/pretrain.py`)."""
  lr: float                   # peak learning rate
  b1: float
  b2: float
  weight_decay: float
  warmup_epochs: float        # linear warmup, then cosine to `min_lr`
  min_lr: float
  grad_clip_norm: float       # clip the global gradient norm; 0: none
  no_decay: tuple[str, ...]   # name patterns of params without weight decay

  @classmethod
  def from_config(cls, optim: Any) -> "AdamWSettings":
    """From a config's `optim` (anything with the keys above)."""
    return cls(lr=float(optim.lr), b1=float(optim.b1), b2=float(optim.b2),
               weight_decay=float(optim.weight_decay), warmup_epochs=float(optim.warmup_epochs),
               min_lr=float(optim.min_lr), grad_clip_norm=float(optim.grad_clip_norm),
               no_decay=tuple(optim.no_decay))


def adamw(params: PyTree, optim: AdamWSettings, total_steps: int,
          steps_per_epoch: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with warmup + cosine per step and no decay on `optim.no_decay` params."""
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


def _ndim_at_least_2(params: PyTree) -> PyTree:
  return jax.tree.map(lambda p: p.ndim > 1, params)


def lars(learning_rate: optax.ScalarOrSchedule, weight_decay: float = 0.0,
         momentum: float = 0.9, trust_coefficient: float = 0.001) -> optax.GradientTransformation:
  """LARS as in the MAE reference (`util/lars.py`), for params of any pytree.

  For params with ndim >= 2 only: add weight decay, then scale the update by
  `trust_coefficient * |p| / |update|` (1 where either norm is 0). Then, for all
  params, momentum `mu = momentum * mu + update` and `p -= lr * mu`; the learning
  rate multiplies the accumulated momentum, as in the reference (optax.lars
  scales before accumulating, which differs when the rate changes).
  """
  return optax.chain(
      optax.add_decayed_weights(weight_decay, mask=_ndim_at_least_2),
      optax.masked(optax.scale_by_trust_ratio(trust_coefficient=trust_coefficient, eps=0.0),
                   _ndim_at_least_2),
      optax.trace(decay=momentum),
      optax.scale_by_learning_rate(learning_rate),
  )


def layer_id(name: str, depth: int) -> int:
  """MAE's layer index for layer-wise lr decay: 0 for the patch embedding and
  tokens, i + 1 for encoder block i, depth + 1 for everything after the blocks."""
  m = re.fullmatch(r"encoder/block_(\d+)/.*", name)
  if m:
    return int(m.group(1)) + 1
  if re.fullmatch(r"encoder/(patch_embed/.*|cls_token)", name):
    return 0
  return depth + 1


def frozen_below(depth: int, trainable_blocks: int) -> tuple[str, ...]:
  """Name patterns of the encoder params a partial fine-tune freezes: the patch embedding,
  the CLS token and every block but the last `trainable_blocks` (the final norm trains);
  () for -1 (every param trains)."""
  if trainable_blocks < 0:
    return ()
  below = depth - trainable_blocks
  return (r"encoder/patch_embed/.*", r"encoder/cls_token",
          *(rf"encoder/block_{i}/.*" for i in range(below)))


# Each classifier optimiser's own keys: a config carries those of its optimiser only.
OWN_KEYS = {"lars": ("momentum", "trust_coefficient"), "adamw": ("b1", "b2", "layer_decay")}


def problems(optim: Any) -> list[str]:
  """Problems of a classifier config's `optim` keys, one line each."""
  name = optim.get("name")
  if name not in OWN_KEYS:
    return [f"optim.name={name!r} must be one of {', '.join(OWN_KEYS)}"]
  other = next((n for n, keys in OWN_KEYS.items() if n != name
                and any(k in optim for k in keys)), None)
  if other:
    return [f"optim.name={name!r}, but optim holds {other.upper()}'s keys "
            f"({', '.join(k for k in OWN_KEYS[other] if k in optim)}): a config's optimiser is "
            f"its stage's (the probe's LARS, the fine-tune's AdamW); freeze params with "
            f"optim.frozen instead"]
  return []


@dataclasses.dataclass(frozen=True)
class ClassifierOptimSettings:
  """The probe / fine-tune optimiser: a classifier config's `optim` (`configs/common.py`:
  `lars`, `adamw`). Keys of the other optimiser are absent from a config and keep the
  defaults here."""
  name: str                                   # 'lars' or 'adamw'
  lr_groups: tuple[tuple[str, float], ...]    # (name pattern, base lr); first match wins
  lr_scaling: str                             # 'linear': rates x global batch / 256; 'none'
  frozen: tuple[str, ...]                     # name patterns of params that never change
  weight_decay: float
  warmup_epochs: float
  min_lr: float
  grad_clip_norm: float                       # 0: none
  no_decay: tuple[str, ...]                   # name patterns of params without weight decay
  layer_decay: float = 1.0                    # AdamW: MAE's layer-wise decay; 1: off
  b1: float = 0.9                             # AdamW
  b2: float = 0.999
  momentum: float = 0.9                       # LARS
  trust_coefficient: float = 0.001

  @classmethod
  def from_config(cls, optim: Any) -> "ClassifierOptimSettings":
    """From a config's `optim` (the keys above; its optimiser's own ones where it has them)."""
    own = {k: float(optim[k]) for keys in OWN_KEYS.values() for k in keys if k in optim}
    return cls(name=str(optim.name),
               lr_groups=tuple((str(p), float(lr)) for p, lr in optim.lr_groups),
               lr_scaling=str(optim.lr_scaling), frozen=tuple(optim.frozen),
               weight_decay=float(optim.weight_decay), warmup_epochs=float(optim.warmup_epochs),
               min_lr=float(optim.min_lr), grad_clip_norm=float(optim.grad_clip_norm),
               no_decay=tuple(optim.no_decay), **own)


def classifier_optimizer(params: PyTree, optim: ClassifierOptimSettings, *,
                         total_steps: int, steps_per_epoch: int, global_batch: int,
                         depth: int) -> tuple[optax.GradientTransformation, PyTree]:
  """The probe / fine-tune optimiser from its settings, with frozen params in it.

  `optim.name` is 'lars' or 'adamw'. Params matching `optim.frozen`
  patterns get `optax.set_to_zero()` (no update, no optimiser state). The rest
  are split by `optim.lr_groups` (pattern, base lr) pairs, first match wins,
  every param must match one; with `layer_decay` < 1, encoder params' rates are
  scaled by layer_decay ** (depth + 1 - layer_id) as in MAE. With `lr_scaling`
  'linear', rates are multiplied by global_batch / 256. Each distinct (rate,
  decays?) pair becomes one `optax.partition` group, named by an integer id, with
  its own warmup + cosine schedule; weight decay skips `optim.no_decay` params.

  Returns:
    The transformation and a pytree of each param's peak learning rate (0 when frozen).
  """
  if optim.name not in ("lars", "adamw"):
    raise ValueError(f"optim.name must be 'lars' or 'adamw', got {optim.name!r}")
  names = param_names(params)
  frozen = match(params, optim.frozen)
  decays = decay_mask(params, optim.no_decay)
  groups = [(re.compile(p), lr) for p, lr in optim.lr_groups]
  scale = global_batch / 256.0 if optim.lr_scaling == "linear" else 1.0

  def peak(name: str, is_frozen: bool) -> float:
    if is_frozen:
      return 0.0
    for pattern, lr in groups:
      if pattern.fullmatch(name):
        factor = 1.0
        if optim.layer_decay != 1.0 and name.startswith("encoder/"):
          factor = optim.layer_decay ** (depth + 1 - layer_id(name, depth))
        return lr * scale * factor
    raise ValueError(f"param {name} matches no optim.lr_groups pattern "
                     f"{[p for p, _ in optim.lr_groups]}; add a catch-all such as '.*'")

  peaks = jax.tree.map(peak, names, frozen)
  # One optimiser group per distinct (peak rate, decays?) pair; group 0 is the frozen
  # params. `groups` is the table: group id -> (peak rate, weight decay).
  table: dict[tuple[float, bool], int] = {}
  for lr, d, f in zip(jax.tree.leaves(peaks), jax.tree.leaves(decays), jax.tree.leaves(frozen)):
    if not f:
      table.setdefault((lr, d), len(table) + 1)
  ids = jax.tree.map(lambda lr, d, f: 0 if f else table[(lr, d)], peaks, decays, frozen)
  warmup = int(optim.warmup_epochs * steps_per_epoch)
  transforms = {0: optax.set_to_zero()}
  for (lr, decays_here), gid in table.items():
    wd = optim.weight_decay if decays_here else 0.0
    schedule = warmup_cosine(lr, total_steps, warmup, min(optim.min_lr, lr))
    if optim.name == "lars":
      transforms[gid] = lars(schedule, wd, optim.momentum, optim.trust_coefficient)
    else:
      transforms[gid] = optax.adamw(schedule, b1=optim.b1, b2=optim.b2, weight_decay=wd)
  describe = {0: "frozen"} | {gid: f"lr {lr:.3g}, weight decay "
                              f"{optim.weight_decay if d else 0.0:g}"
                              for (lr, d), gid in table.items()}
  for gid in sorted(describe):
    chosen = jax.tree.map(lambda i, g=gid: i == g, ids)
    _log_matches(f"optimiser group {gid} ({describe[gid]})", params, chosen)
  chain = [optax.partition(transforms, ids)]
  if optim.grad_clip_norm:
    chain.insert(0, optax.clip_by_global_norm(optim.grad_clip_norm))
  return optax.chain(*chain), peaks
