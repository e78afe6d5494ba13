"""What the training stages share: their data, feeds, chunked steps, evaluation passes
and metric writer."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from mae_jax.data import arrays
from mae_jax.data import feeds
from mae_jax.data import layout
from mae_jax.data import source
from mae_jax.runtime import errors
from mae_jax.runtime import syncs
from mae_jax.stages import writers
from mae_jax.train import loop
from mae_jax.train import steps


def load_dataset(data: source.DataSettings, image_size: int) -> arrays.Dataset:
  """The stage's data, every split as arrays (simulated first if so configured).

  Raises:
    ValueError: the data's images are not the model's size.
  """
  dataset = source.load(data, progress=loop.is_main_process())
  if tuple(dataset.image_shape) != (image_size,) * 2:
    raise ValueError(f"the data's images are {dataset.image_shape}, but "
                     f"model.image_size={image_size}")
  return dataset


def require(split: arrays.Split, at_least: int, what: str, data_dir: str) -> None:
  """Raises a one-line error when `split` holds fewer than `at_least` examples."""
  if len(split) < at_least:
    raise errors.InsufficientDataError(
        f"the {split.name} split holds {len(split)} {what} image(s) ({data_dir}), fewer than "
        f"the {at_least} needed; simulate more (data.sim.per_class) or lower the batch size")


def labelled_subset(split: arrays.Split, labels_per_class: int, seed: int) -> arrays.Split:
  """`labels_per_class` examples of each class, drawn without replacement from `seed`
  (stratified), in canonical order; 0 keeps the whole split.

  Raises:
    errors.InsufficientDataError: a class has fewer examples than asked for.
  """
  if labels_per_class <= 0:
    return split
  rng = np.random.default_rng([seed, 0x1abe1])
  chosen = []
  for label, name in enumerate(layout.CLASS_NAMES):
    members = np.flatnonzero(split.labels == label)
    if len(members) < labels_per_class:
      raise errors.InsufficientDataError(
          f"labels_per_class={labels_per_class}, but the {split.name} split holds only "
          f"{len(members)} {name} image(s); simulate more (data.sim.per_class) or ask for fewer")
    chosen.append(rng.choice(members, labels_per_class, replace=False))
  return split.take(np.sort(np.concatenate(chosen)))


def pool_subset(split: arrays.Split, size: int, seed: int) -> arrays.Split:
  """A seeded random `size` examples of `split` (0 or more than it holds: all of it)."""
  if size <= 0 or size >= len(split):
    return split
  rng = np.random.default_rng([seed, 0x9001])
  return split.take(np.sort(rng.choice(len(split), size, replace=False)))


def choose_feed(data: source.DataSettings, nbytes: int, what: str) -> str:
  """The feed of `nbytes` of `what` (data.feed, or 'auto''s choice), logged with why."""
  kind, why = feeds.choose(data.feed, nbytes, data.device_memory_share)
  feeds.log_choice(kind, why, what)
  return kind


class Chunks:
  """Runs chunks of training steps on a feed, one compiled function per (augmentation,
  number of steps)."""

  def __init__(self, body: steps.Body, mesh: jax.sharding.Mesh, feed: Any,
               feeding: steps.Feeding):
    self.body, self.mesh, self.feed, self.feeding = body, mesh, feed, feeding
    self._compiled: dict[tuple, Callable] = {}

  def __call__(self, state, epoch: int, first: int, num_steps: int, key,
               augmentation=None) -> tuple[Any, dict]:
    feeding = dataclasses.replace(self.feeding, augmentation=augmentation)
    cache_key = (augmentation, num_steps)
    if cache_key not in self._compiled:
      self._compiled[cache_key] = steps.FallbackJit(
          functools.partial(steps.make_chunk, self.body, self.mesh, feeding, num_steps),
          f"training chunk of {num_steps} steps")
    data = self.feed.chunk_data(epoch, first, num_steps, feeding.local_batch)
    return self._compiled[cache_key](state, data, np.int32(epoch), np.int32(first), key)


def _host(x: jax.Array) -> np.ndarray:
  if jax.process_count() == 1:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


class Evaluator:
  """Per-example outputs of a function over a whole split, in canonical order."""

  def __init__(self, fn: Callable, mesh: jax.sharding.Mesh, feed: Any, feeding: steps.Feeding):
    self.feed, self.feeding = feed, feeding
    size = feed.layout.size
    self.num_batches = -(-size // feeding.local_batch)
    self._pass = steps.FallbackJit(
        functools.partial(steps.make_eval_pass, fn, mesh, feeding,
                          self.num_batches if feed.source == "device" else 1), "evaluation pass")

  def __call__(self, tree: Any) -> Any:
    layout_ = self.feed.layout
    if self.feed.source == "device":
      syncs.note("evaluation")
      out = jax.tree.map(_host, self._pass(tree, self.feed.eval_data()))
      return jax.tree.map(lambda a: steps.canonical_rows(a, layout_.shards, layout_.num_examples),
                          out)
    parts = []
    for b in range(self.num_batches):
      syncs.note("evaluation")
      parts.append(jax.tree.map(_host, self._pass(
          tree, self.feed.eval_batch(b, self.feeding.local_batch), np.int32(b))))

    def join(*batches):
      stacked = np.stack(batches)                      # (batches, D * lb, ...)
      per_shard = stacked.reshape(len(batches), layout_.shards, -1, *stacked.shape[2:])
      rows = np.swapaxes(per_shard, 0, 1).reshape(-1, *stacked.shape[2:])
      return steps.canonical_rows(rows, layout_.shards, layout_.num_examples)

    return jax.tree.map(join, *parts)


def metric_writer(workdir: Path, config: ml_collections.ConfigDict) -> loop.MetricWriter:
  """The stage's writer: metrics.jsonl, logs, TensorBoard events (process 0 only)."""
  return writers.create(workdir, loop.is_main_process(), config.get("tensorboard", "auto"))


def log_split_sizes(what: str, named: dict[str, arrays.Split]) -> None:
  logging.info("%s: %s", what, "; ".join(f"{n} {len(s)} ({s.class_counts()})"
                                          for n, s in named.items()))


def class_names_of(classes: Sequence[str]) -> tuple[str, ...]:
  unknown = [c for c in classes if c not in layout.CLASS_NAMES]
  if unknown or not classes:
    raise ValueError(f"unknown class name(s) {unknown or list(classes)}; "
                     f"choose among {list(layout.CLASS_NAMES)}")
  return tuple(classes)
