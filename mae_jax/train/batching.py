"""How a training batch is made from a split's raw images, in JAX, inside the step.

One definition serves both feeds: the epoch's order of each device's shard, then
per-image min-max normalisation and augmentation (flips, 90-degree rotations,
shifts), all pure functions of (seed, epoch, batch index, shard). The host feed
only moves raw images; the device feed gathers them from device memory; either
way the step computes the same batch.

A split is cut into one shard per device, strided: example i of the split (in
canonical order) lives on device i mod D, at row i div D. Each epoch every shard is
shuffled on its own (`shard_order`); batch b takes rows [b*lb, (b+1)*lb) of that
order on every device, lb = global batch / D. So a run's batches depend on the
device count, not on how many processes hold the devices.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

# Streams of the run's seed: each purpose draws from its own fold of the key.
_ORDER, _AUGMENT = 11, 12


@dataclasses.dataclass(frozen=True)
class Augment:
  """Label-preserving augmentations, drawn independently per image."""
  flip: bool = True          # random horizontal and vertical flips
  rot90: bool = True         # random multiple of 90 degrees
  max_shift: int = 0         # random translation in pixels per axis, zero-filled

  @property
  def enabled(self) -> bool:
    return self.flip or self.rot90 or self.max_shift > 0


def shard_sizes(num_examples: int, shards: int) -> list[int]:
  """Examples per shard under the strided layout (the first ones hold one more)."""
  return [len(range(d, num_examples, shards)) for d in range(shards)]


def steps_per_epoch(num_examples: int, shards: int, local_batch: int) -> int:
  """Full batches per epoch: every shard gives `local_batch` rows per step."""
  return min(shard_sizes(num_examples, shards)) // local_batch


def epoch_key(seed: int, epoch: jax.Array | int, stream: int) -> jax.Array:
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), stream), epoch)


def shard_order(seed: int, epoch: jax.Array | int, shard: jax.Array | int, valid: jax.Array | int,
                size: int) -> jax.Array:
  """A random order of a shard's rows for one epoch: its `valid` rows first, shuffled,
  then the padding rows. (size,) int32."""
  key = jax.random.fold_in(epoch_key(seed, epoch, _ORDER), shard)
  u = jax.random.uniform(key, (size,))
  u = jnp.where(jnp.arange(size) < valid, u, 2.0)
  return jnp.argsort(u).astype(jnp.int32)


def batch_rows(order: jax.Array, batch: jax.Array | int, local_batch: int) -> jax.Array:
  """Rows of the shard that batch `batch` of the epoch takes."""
  return lax.dynamic_slice_in_dim(order, batch * local_batch, local_batch)


def normalize(images: jax.Array) -> jax.Array:
  """Scales each image of a (B, H, W[, C]) batch to [0, 1] in float32; constant images give 0."""
  x = images.astype(jnp.float32)
  axes = tuple(range(1, x.ndim))
  lo = x.min(axis=axes, keepdims=True)
  hi = x.max(axis=axes, keepdims=True)
  span = hi - lo
  return jnp.where(span > 0, (x - lo) / jnp.where(span > 0, span, 1.0), 0.0)


def augment(images: jax.Array, key: jax.Array, cfg: Augment) -> jax.Array:
  """Applies `cfg`'s augmentations to a square (B, H, W) batch, drawn per image.

  Every element of the square's symmetry group is (transpose?) then (flip rows?)
  then (flip columns?); the rotations by k*90 degrees are those whose flip count
  matches the transpose. Shifts move pixels and fill with 0, so values stay in
  [0, 1] and the label is untouched.
  """
  b, h, w = images.shape
  coins = jax.random.bernoulli(key, 0.5, (3, b))
  x = images
  if cfg.rot90:
    if h != w:
      raise ValueError(f"rot90 augmentation needs square images, got {h}x{w}")
    transpose = coins[0]
    x = jnp.where(transpose[:, None, None], jnp.swapaxes(x, 1, 2), x)
    flip_cols = coins[1]
    flip_rows = coins[2] if cfg.flip else jnp.logical_xor(flip_cols, transpose)
  elif cfg.flip:
    flip_cols, flip_rows = coins[1], coins[2]
  if cfg.rot90 or cfg.flip:
    x = jnp.where(flip_cols[:, None, None], x[:, :, ::-1], x)
    x = jnp.where(flip_rows[:, None, None], x[:, ::-1, :], x)
  if cfg.max_shift > 0:
    s = cfg.max_shift
    shifts = jax.random.randint(jax.random.fold_in(key, 1), (2, b), 0, 2 * s + 1)
    padded = jnp.pad(x, ((0, 0), (s, s), (s, s)))
    x = jax.vmap(lambda im, dy, dx: lax.dynamic_slice(im, (dy, dx), (h, w)))(
        padded, shifts[0], shifts[1])
  return x


def prepare(raw: jax.Array, *, seed: int, epoch: jax.Array | int, batch: jax.Array | int,
            shard: jax.Array | int, augmentation: Augment | None, dtype=jnp.float32) -> jax.Array:
  """A batch of raw (B, H, W) images as the model takes it: normalised, augmented when
  asked (keyed by seed, epoch, batch and shard), (B, H, W, 1) in `dtype`."""
  x = normalize(raw)
  if augmentation is not None and augmentation.enabled:
    key = jax.random.fold_in(jax.random.fold_in(epoch_key(seed, epoch, _AUGMENT), batch), shard)
    x = augment(x, key, augmentation)
  return x[..., None].astype(dtype)
