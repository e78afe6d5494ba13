"""Patchify, sin-cos embeddings and MAE random masking."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mae_jax.models import masking


def test_patchify_roundtrip_and_order():
  images = jnp.arange(2 * 8 * 8 * 3, dtype=jnp.float32).reshape(2, 8, 8, 3)
  patches = masking.patchify(images, 4)
  assert patches.shape == (2, 4, 4 * 4 * 3)
  # Patch 1 is the top-right block; its first values are pixel (0, 4), all channels.
  np.testing.assert_array_equal(patches[0, 1, :3], images[0, 0, 4])
  np.testing.assert_array_equal(patches[0, 2, :3], images[0, 4, 0])
  np.testing.assert_array_equal(masking.unpatchify(patches, 4, (2, 2), 3), images)
  with pytest.raises(ValueError, match="not divisible"):
    masking.patchify(images, 3)


@pytest.mark.parametrize("length, ratio, kept", [(256, 0.75, 64), (64, 0.75, 16),
                                                 (10, 0.75, 2), (16, 0.0, 16)])
def test_masking_keeps_exact_count_and_restores(length, ratio, kept):
  x = jnp.arange(3 * length, dtype=jnp.float32).reshape(3, length, 1) + 1.0
  noise = jax.random.uniform(jax.random.key(0), (3, length))
  x_kept, mask, ids_restore = masking.random_masking(x, noise, ratio)
  assert x_kept.shape == (3, kept, 1)
  np.testing.assert_array_equal(mask.sum(axis=1), length - kept)
  # Kept tokens are exactly the unmasked positions, in order of increasing noise.
  for n in range(3):
    visible = np.flatnonzero(np.asarray(mask[n]) == 0)
    order = visible[np.argsort(np.asarray(noise[n])[visible])]
    np.testing.assert_array_equal(np.asarray(x_kept[n, :, 0]), np.asarray(x[n, order, 0]))
  # ids_restore inverts the shuffle: gathering the shuffled sequence restores x.
  ids_shuffle = jnp.argsort(noise, axis=1)
  shuffled = jnp.take_along_axis(x, ids_shuffle[:, :, None], axis=1)
  np.testing.assert_array_equal(jnp.take_along_axis(shuffled, ids_restore[:, :, None], axis=1), x)


def test_different_keys_give_different_masks_same_key_same_mask():
  x = jnp.ones((4, 64, 2))
  masks = [masking.random_masking(x, jax.random.uniform(jax.random.key(k), (4, 64)), 0.75)[1]
           for k in (0, 0, 1)]
  np.testing.assert_array_equal(masks[0], masks[1])
  assert not np.array_equal(masks[0], masks[2])
  # and per example within a batch
  assert not np.array_equal(masks[0][0], masks[0][1])


def test_mask_ratio_is_validated():
  with pytest.raises(ValueError, match=r"\[0, 1\)"):
    masking.num_kept(16, 1.0)


def test_sincos_shapes_and_cls_row():
  emb = masking.sincos_pos_embed(16, (4, 4))
  assert emb.shape == (17, 16) and emb.dtype == np.float32
  np.testing.assert_array_equal(emb[0], 0.0)
  assert len({tuple(np.round(r, 6)) for r in emb[1:]}) == 16  # all positions distinct
  with pytest.raises(ValueError, match="divisible by 4"):
    masking.sincos_pos_embed(6, (2, 2))
