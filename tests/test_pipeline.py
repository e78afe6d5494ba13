"""Input pipeline: coverage, per-process slices, determinism, augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from mae_jax.data import builder
from mae_jax.data import layout
from mae_jax.data import input_pipeline as pipeline
from tests.conftest import image_id


@pytest.fixture
def prepared(small_folder, tmp_path):
  root, classes = small_folder
  return builder.prepare(root, tmp_path / "cache", progress=False), classes


def _ids(batches, use_mask=True):
  out = []
  for b in batches:
    keep = b["mask"] if use_mask else np.ones(len(b["label"]), bool)
    out += [image_id(img) for img in b["image"][keep]]
  return out


def test_eval_covers_every_example_once_with_padding(prepared):
  prep, classes = prepared
  n_val = prep.builder.info.splits["validation"].num_examples
  ip = pipeline.InputPipeline(prep.builder, "validation")
  batches = list(ip.eval_batches(batch_size=5))
  assert len(batches) == -(-n_val // 5)
  assert all(b["image"].shape == (5, 16, 16, 1) for b in batches)
  ids = _ids(batches)
  assert len(ids) == len(set(ids)) == n_val
  assert sum(int(b["mask"].sum()) for b in batches) == n_val
  padded = batches[-1]
  assert not padded["image"][~padded["mask"]].any()  # padding is zeros
  for b in batches:
    for img, label, real in zip(b["image"], b["label"], b["mask"]):
      if real:
        assert layout.CLASS_NAMES[label] == classes[image_id(img)]
  extra = list(ip.eval_batches(batch_size=5, num_batches=len(batches) + 2))
  assert len(extra) == len(batches) + 2 and _ids(extra) == ids
  with pytest.raises(ValueError, match="num_batches"):
    list(ip.eval_batches(batch_size=5, num_batches=1))


@pytest.mark.parametrize("split", ["train", "validation"])
def test_process_slices_are_disjoint_and_cover(prepared, split):
  prep, _ = prepared
  everything = set(_ids(pipeline.InputPipeline(prep.builder, split).eval_batches(7)))
  parts = [set(_ids(pipeline.InputPipeline(prep.builder, split, process_index=i,
                                           process_count=3).eval_batches(7)))
           for i in range(3)]
  assert set.union(*parts) == everything
  assert sum(len(p) for p in parts) == len(everything)
  with pytest.raises(ValueError, match="process_index"):
    pipeline.InputPipeline(prep.builder, split, process_index=3, process_count=3)


def test_train_epochs_are_deterministic_and_resumable(prepared):
  prep, _ = prepared
  ip = pipeline.InputPipeline(prep.builder, "train")
  aug = pipeline.AugmentConfig(flip=True, rot90=True, max_shift=2)
  a = list(ip.train_epoch(8, seed=3, epoch=0, augment=aug))
  b = list(ip.train_epoch(8, seed=3, epoch=0, augment=aug))
  resumed = list(ip.train_epoch(8, seed=3, epoch=0, augment=aug, start_batch=4))
  other_epoch = list(ip.train_epoch(8, seed=3, epoch=1, augment=aug))
  other_seed = list(ip.train_epoch(8, seed=4, epoch=0, augment=aug))
  assert len(a) == ip.steps_per_epoch(8) == ip.num_examples // 8
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])
  assert len(resumed) == len(a) - 4
  for x, y in zip(a[4:], resumed):
    np.testing.assert_array_equal(x["image"], y["image"])
  assert not np.array_equal(a[0]["image"], other_epoch[0]["image"])
  assert not np.array_equal(a[0]["image"], other_seed[0]["image"])
  plain = list(ip.train_epoch(8, seed=3, epoch=0))
  seen = _ids(plain, use_mask=False)
  assert len(seen) == len(set(seen)) == len(a) * 8  # no example twice in an epoch


def test_class_filter(prepared):
  prep, classes = prepared
  ip = pipeline.InputPipeline(prep.builder, "train", classes=["no_sub"])
  ids = _ids(ip.eval_batches(16))
  assert ids and all(classes[i] == "no_sub" for i in ids)
  assert ip.num_examples == len(ids)
  assert all((b["label"] == 0).all() for b in ip.train_epoch(4, seed=0, epoch=0))
  with pytest.raises(ValueError, match="unknown class"):
    pipeline.InputPipeline(prep.builder, "train", classes=["wdm"])


def test_augmentation_preserves_labels_and_range(prepared):
  prep, _ = prepared
  ip = pipeline.InputPipeline(prep.builder, "train")
  plain = list(ip.train_epoch(8, seed=5, epoch=2))
  dihedral = list(ip.train_epoch(8, seed=5, epoch=2,
                                 augment=pipeline.AugmentConfig(flip=True, rot90=True)))
  shifted = list(ip.train_epoch(8, seed=5, epoch=2,
                                augment=pipeline.AugmentConfig(False, False, max_shift=3)))
  moved = 0
  for p, d, s in zip(plain, dihedral, shifted):
    np.testing.assert_array_equal(p["label"], d["label"])
    np.testing.assert_array_equal(p["label"], s["label"])
    for images in (p["image"], d["image"], s["image"]):
      assert images.min() >= 0.0 and images.max() <= 1.0
    for src, aug in zip(p["image"][..., 0], d["image"][..., 0]):
      group = [np.rot90(src, k) for k in range(4)] + [np.rot90(src.T, k) for k in range(4)]
      assert any(np.array_equal(aug, g) for g in group)
      moved += not np.array_equal(aug, src)
    for src, aug in zip(p["image"], s["image"]):
      assert aug.sum() <= src.sum() + 1e-4  # translation only drops pixels (zero fill)
  assert moved > 0


def test_rotation_only_draws_rotations():
  img = tf.reshape(tf.range(16, dtype=tf.float32), (1, 4, 4, 1))
  out = pipeline.augment_batch(tf.tile(img, [200, 1, 1, 1]), tf.constant([1, 2], tf.int64),
                               pipeline.AugmentConfig(flip=False, rot90=True)).numpy()
  rots = [np.rot90(img.numpy()[0, ..., 0], k) for k in range(4)]
  ks = [next(k for k, r in enumerate(rots) if np.array_equal(o[..., 0], r)) for o in out]
  assert set(ks) == {0, 1, 2, 3}


def test_minmax_normalize_constant_image_gives_zeros():
  x = tf.constant(np.stack([np.full((4, 4, 1), 7.0), np.arange(16.0).reshape(4, 4, 1)]),
                  tf.float32)
  y = pipeline.minmax_normalize(x).numpy()
  assert not np.isnan(y).any()
  np.testing.assert_array_equal(y[0], 0.0)
  assert y[1].min() == 0.0 and y[1].max() == 1.0


def test_batch_larger_than_slice_is_refused(prepared):
  prep, _ = prepared
  ip = pipeline.InputPipeline(prep.builder, "validation")
  with pytest.raises(ValueError, match="exceeds"):
    next(ip.train_epoch(10_000, seed=0, epoch=0))
