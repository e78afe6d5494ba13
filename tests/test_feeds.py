"""Batches: the epoch order of each device's shard, normalisation and augmentation in
JAX (train/batching.py), and the two feeds (data/feeds.py) that deliver them."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mae_jax.data import feeds
from mae_jax.runtime import parallel
from mae_jax.stages import common
from mae_jax.train import batching
from mae_jax.train import steps

ROOT = Path(__file__).resolve().parents[1]


def test_normalize_scales_each_image_and_maps_constant_images_to_zero():
  x = np.stack([np.full((4, 4), 7.0), np.arange(16.0).reshape(4, 4)]).astype(np.float32)
  y = np.asarray(batching.normalize(x))
  assert not np.isnan(y).any()
  np.testing.assert_array_equal(y[0], 0.0)
  assert y[1].min() == 0.0 and y[1].max() == 1.0
  np.testing.assert_allclose(y[1], np.arange(16.0).reshape(4, 4) / 15.0, rtol=1e-6)


def _group(src: np.ndarray) -> list[np.ndarray]:
  return [np.rot90(src, k) for k in range(4)] + [np.rot90(src.T, k) for k in range(4)]


def test_flips_and_rotations_draw_the_whole_symmetry_group_per_image():
  src = (np.arange(16.0).reshape(4, 4) / 15.0).astype(np.float32)
  out = np.asarray(batching.augment(jnp.tile(src, (400, 1, 1)), jax.random.key(3),
                                    batching.Augment(flip=True, rot90=True)))
  found = {next(i for i, g in enumerate(_group(src)) if np.array_equal(o, g)) for o in out}
  assert found == set(range(8))
  again = np.asarray(batching.augment(jnp.tile(src, (400, 1, 1)), jax.random.key(3),
                                      batching.Augment(flip=True, rot90=True)))
  np.testing.assert_array_equal(out, again)   # a pure function of the key


def test_rotation_only_draws_rotations():
  src = np.arange(16.0, dtype=np.float32).reshape(4, 4)
  out = np.asarray(batching.augment(jnp.tile(src, (200, 1, 1)), jax.random.key(1),
                                    batching.Augment(flip=False, rot90=True)))
  rots = [np.rot90(src, k) for k in range(4)]
  ks = [next(k for k, r in enumerate(rots) if np.array_equal(o, r)) for o in out]
  assert set(ks) == {0, 1, 2, 3}


def test_shifts_move_pixels_and_fill_with_zero():
  rng = np.random.default_rng(0)
  src = rng.uniform(0.1, 1.0, (50, 8, 8)).astype(np.float32)
  out = np.asarray(batching.augment(jnp.asarray(src), jax.random.key(2),
                                    batching.Augment(False, False, max_shift=2)))
  assert out.min() >= 0.0 and out.max() <= 1.0
  moved = 0
  for s, o in zip(src, out):
    shifts = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
              if np.array_equal(o, _shifted(s, dy, dx))]
    assert shifts, "not a zero-filled translation of at most 2 pixels"
    moved += shifts[0] != (0, 0)
  assert moved > 30


def _shifted(image, dy, dx):
  out = np.zeros_like(image)
  h, w = image.shape
  out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
      image[max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
  return out


def test_shard_layout_is_strided_and_canonical_rows_invert_it():
  layout = feeds.ShardLayout.of(10, 4)
  assert layout.counts == (3, 3, 2, 2) and layout.size == 3
  values = np.arange(10)
  sharded = layout.shard(values)
  assert sharded.tolist() == [[0, 4, 8], [1, 5, 9], [2, 6, 0], [3, 7, 0]]
  np.testing.assert_array_equal(steps.canonical_rows(sharded.reshape(-1), 4, 10), values)
  assert batching.steps_per_epoch(10, 4, 2) == 1 and batching.steps_per_epoch(10, 4, 3) == 0


def test_shard_order_puts_each_valid_row_once_before_the_padding():
  order = np.asarray(batching.shard_order(7, 3, 1, 5, 8))
  assert sorted(order[:5].tolist()) == [0, 1, 2, 3, 4] and sorted(order[5:].tolist()) == [5, 6, 7]
  assert not np.array_equal(order, np.asarray(batching.shard_order(7, 4, 1, 5, 8)))  # epoch
  assert not np.array_equal(order, np.asarray(batching.shard_order(7, 3, 2, 5, 8)))  # shard
  np.testing.assert_array_equal(order, np.asarray(batching.shard_order(7, 3, 1, 5, 8)))


def test_evaluator_sees_every_example_once_in_canonical_order():
  mesh = parallel.make_mesh()
  values = np.arange(23, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
  feeding = steps.Feeding(source="device", local_batch=4, seed=0, images=False)
  fn = lambda tree, x, valid, examples: x[:, 0] * tree + 0 * examples  # pylint: disable=unnecessary-lambda-assignment
  for kind in ("device", "host"):
    feed = feeds.make(kind, values, np.zeros(23, np.int32), mesh, seed=0)
    out = common.Evaluator(fn, mesh, feed, dataclasses.replace(feeding, source=kind))(
        jnp.float32(2.0))
    np.testing.assert_array_equal(out, 2.0 * np.arange(23))


@pytest.mark.slow
def test_feeds_give_identical_batches_on_one_and_four_devices():
  """The host and the device feed give the same normalised, augmented batches, every
  batch of an epoch, and a chunk that starts mid-epoch sees the batches an epoch from
  its start would; on 1 device and on 4 (forced CPU devices, in a subprocess)."""
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
         "JAX_PLATFORMS": "cpu"}
  result = subprocess.run([sys.executable, str(ROOT / "tests" / "feeds_run.py")], env=env,
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report == {"1": "same", "4": "same"}, report
