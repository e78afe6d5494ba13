"""tf.data input pipeline: tfds split -> per-process slice -> numpy batches.

Every epoch's batch order and augmentation are a pure function of
(seed, epoch, batch index), so a run can restart at any batch of any epoch and
see exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterator, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from mae_jax.data import layout

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """Label-preserving augmentations, drawn independently per image."""
  flip: bool = True          # random horizontal and vertical flips
  rot90: bool = True         # random multiple of 90 degrees
  max_shift: int = 0         # random translation in pixels per axis, zero-filled

  @property
  def enabled(self) -> bool:
    return self.flip or self.rot90 or self.max_shift > 0


def class_indices(classes: Sequence[str]) -> tuple[int, ...]:
  """Label indices of class names, with a clear error for unknown names."""
  unknown = [c for c in classes if c not in layout.CLASS_NAMES]
  if unknown or not classes:
    raise ValueError(f"unknown class name(s) {unknown or list(classes)}; "
                     f"choose among {list(layout.CLASS_NAMES)}")
  return tuple(layout.CLASS_NAMES.index(c) for c in classes)


def minmax_normalize(images: tf.Tensor) -> tf.Tensor:
  """Scales each image of a (B, H, W, C) batch to [0, 1]; constant images give 0."""
  lo = tf.reduce_min(images, axis=(1, 2, 3), keepdims=True)
  hi = tf.reduce_max(images, axis=(1, 2, 3), keepdims=True)
  span = hi - lo
  safe = tf.where(span > 0, span, tf.ones_like(span))
  return tf.where(span > 0, (images - lo) / safe, tf.zeros_like(images))


def augment_batch(images: tf.Tensor, seed: tf.Tensor, cfg: AugmentConfig) -> tf.Tensor:
  """Applies `cfg`'s augmentations to a square (B, H, W, C) batch, per image.

  Only moves pixels (or fills with 0), so values stay in [0, 1] and the label
  is untouched. `seed` is a stateless seed (shape [2]).
  """
  b, h, w = tf.shape(images)[0], images.shape[1], images.shape[2]
  seeds = tf.random.experimental.stateless_split(seed, 5)
  coin = lambda i: tf.random.stateless_uniform([b, 1, 1, 1], seeds[i]) < 0.5  # pylint: disable=unnecessary-lambda-assignment
  # Every element of the square's symmetry group is (transpose?) then (flip rows?)
  # then (flip columns?). Rotations by k*90 degrees are the elements whose flip
  # count matches the transpose: k=0 none, k=2 both flips, k=1/3 transpose + one.
  if cfg.rot90:
    if h != w:
      raise ValueError(f"rot90 augmentation needs square images, got {h}x{w}")
    transpose = coin(0)
    images = tf.where(transpose, tf.transpose(images, [0, 2, 1, 3]), images)
    flip_cols = coin(1)
    flip_rows = coin(2) if cfg.flip else tf.math.logical_xor(flip_cols, transpose)
  elif cfg.flip:
    flip_cols, flip_rows = coin(1), coin(2)
  if cfg.rot90 or cfg.flip:
    images = tf.where(flip_cols, tf.reverse(images, axis=[2]), images)
    images = tf.where(flip_rows, tf.reverse(images, axis=[1]), images)
  if cfg.max_shift > 0:
    s = cfg.max_shift
    padded = tf.pad(images, [[0, 0], [s, s], [s, s], [0, 0]])
    dy = tf.random.stateless_uniform([b], seeds[3], minval=0, maxval=2 * s + 1, dtype=tf.int32)
    dx = tf.random.stateless_uniform([b], seeds[4], minval=0, maxval=2 * s + 1, dtype=tf.int32)
    rows = dy[:, None] + tf.range(h)[None, :]
    cols = dx[:, None] + tf.range(w)[None, :]
    images = tf.gather(padded, rows, axis=1, batch_dims=1)
    images = tf.gather(images, cols, axis=2, batch_dims=1)
  return images


def epoch_seed(seed: int, epoch: int) -> int:
  """A 31-bit seed for one epoch, independent across (seed, epoch) pairs."""
  return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0] >> 1)


class InputPipeline:
  """Batches of one split for this process: train epochs and padded eval passes.

  The split is cut into `process_count` disjoint, covering slices
  (`tfds.even_splits`); this process reads slice `process_index`, keeps only
  `classes`, and caches the decoded images in memory (`cache=True`).
  """

  def __init__(self, builder: tfds.core.DatasetBuilder, split: str, *,
               classes: Sequence[str] = layout.CLASS_NAMES,
               process_index: int = 0, process_count: int = 1, cache: bool = True):
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if split not in builder.info.splits:
      raise ValueError(f"split {split!r} not in {list(builder.info.splits)}")
    self.split = split
    self.slice = tfds.even_splits(split, n=process_count, drop_remainder=False)[process_index]
    self._process = (process_index, process_count)
    self.image_shape = tuple(builder.info.features["image"].shape)
    keep = tf.constant(class_indices(classes), dtype=tf.int64)
    ds = builder.as_dataset(
        split=self.slice, shuffle_files=False,
        decoders={"file_name": tfds.decode.SkipDecoding(),
                  "axion_mass": tfds.decode.SkipDecoding()},
        read_config=tfds.ReadConfig(try_autocache=False))
    ds = ds.filter(lambda ex: tf.reduce_any(tf.equal(ex["label"], keep)))
    ds = ds.map(lambda ex: (ex["image"], tf.cast(ex["label"], tf.int32)),
                num_parallel_calls=tf.data.AUTOTUNE)
    self._ds = ds.cache() if cache else ds
    self._num_examples: int | None = None

  @property
  def num_examples(self) -> int:
    """Examples in this process's slice after the class filter."""
    if self._num_examples is None:
      self._num_examples = int(self._ds.reduce(np.int64(0), lambda n, _: n + 1).numpy())
    return self._num_examples

  def steps_per_epoch(self, batch_size: int) -> int:
    """Full training batches per epoch (the remainder is left for the next shuffle)."""
    return self.num_examples // batch_size

  def train_epoch(self, batch_size: int, *, seed: int, epoch: int, start_batch: int = 0,
                  augment: AugmentConfig | None = None) -> Iterator[Batch]:
    """One epoch of shuffled, normalised (and augmented) batches of `batch_size`.

    Batch order and augmentation depend only on (seed, epoch, batch index) and
    the process; `start_batch` resumes mid-epoch at exactly that batch.
    """
    n = self.num_examples
    if batch_size < 1 or n < batch_size:
      raise ValueError(f"batch size {batch_size} exceeds the {n} examples of {self.slice}")
    eseed = epoch_seed(seed, epoch)
    ds = self._ds.shuffle(n, seed=eseed, reshuffle_each_iteration=False)
    ds = ds.batch(batch_size, drop_remainder=True)
    ds = ds.enumerate().skip(start_batch)
    augment = augment if augment is not None and augment.enabled else None

    process, processes = self._process

    def finish(index, batch):
      images, labels = batch
      images = minmax_normalize(images)
      if augment is not None:  # each process's rows get their own transforms
        stream = index * processes + process
        images = augment_batch(images, tf.stack([tf.cast(eseed, tf.int64), stream]), augment)
      return {"image": images, "label": labels}

    ds = ds.map(finish, num_parallel_calls=tf.data.AUTOTUNE).prefetch(2)
    return ds.as_numpy_iterator()

  def eval_batches(self, batch_size: int, num_batches: int | None = None) -> Iterator[Batch]:
    """Every example once, in a fixed order, as normalised batches with a `mask`.

    The last batch is padded with masked-out zero images (mask False). Pass
    `num_batches` (>= the batches this slice needs) to pad further, so that
    every process of a multi-host run takes the same number of steps.
    """
    needed = math.ceil(self.num_examples / batch_size)
    num_batches = needed if num_batches is None else num_batches
    if num_batches < needed:
      raise ValueError(f"num_batches {num_batches} < the {needed} needed for {self.slice}")
    pad = num_batches * batch_size - self.num_examples
    h, w, c = self.image_shape
    real = self._ds.map(lambda x, y: (x, y, True))
    filler = tf.data.Dataset.from_tensors(
        (tf.zeros((h, w, c), tf.float32), tf.constant(0, tf.int32), False)).repeat(pad)
    ds = real.concatenate(filler).batch(batch_size)
    ds = ds.map(lambda x, y, m: {"image": minmax_normalize(x), "label": y, "mask": m},
                num_parallel_calls=tf.data.AUTOTUNE).prefetch(2)
    return ds.as_numpy_iterator()
