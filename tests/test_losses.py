"""Reconstruction losses: BCE and MSE, masked-only or all patches, norm_pix."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mae_jax.train import losses
from mae_jax.models import masking


@pytest.fixture
def batch():
  images = jax.random.uniform(jax.random.key(0), (2, 8, 8, 1))
  logits = jax.random.normal(jax.random.key(1), (2, 4, 16))
  mask = jnp.array([[1, 0, 1, 0], [0, 0, 1, 1]], jnp.float32)
  return images, logits, mask


def _bce(x, z):
  return np.maximum(x, 0) - x * z + np.log1p(np.exp(-np.abs(x)))


def test_bce_masked_only_matches_numpy(batch):
  images, logits, mask = batch
  target = np.asarray(masking.patchify(images, 4))
  per_patch = _bce(np.asarray(logits), target).mean(-1)
  expected = (per_patch * np.asarray(mask)).sum() / np.asarray(mask).sum()
  got = losses.reconstruction_loss(logits, images, mask, patch=4, loss="bce")
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  all_patches = losses.reconstruction_loss(logits, images, mask, patch=4, masked_only=False)
  np.testing.assert_allclose(all_patches, per_patch.mean(), rtol=1e-5)


def test_loss_ignores_visible_patches_when_masked_only(batch):
  images, logits, mask = batch
  changed = logits.at[0, 1].add(100.0)  # patch 1 of example 0 is visible
  a = losses.reconstruction_loss(logits, images, mask, patch=4)
  b = losses.reconstruction_loss(changed, images, mask, patch=4)
  assert float(a) == float(b)
  c = losses.reconstruction_loss(changed, images, mask, patch=4, masked_only=False)
  assert float(c) > float(a)


def test_mse_norm_pix_uses_unbiased_variance(batch):
  images, logits, mask = batch
  target = np.asarray(masking.patchify(images, 4))
  t = (target - target.mean(-1, keepdims=True)) / np.sqrt(target.var(-1, ddof=1,
                                                                      keepdims=True) + 1e-6)
  per_patch = ((np.asarray(logits) - t) ** 2).mean(-1)
  expected = (per_patch * np.asarray(mask)).sum() / np.asarray(mask).sum()
  got = losses.reconstruction_loss(logits, images, mask, patch=4, loss="mse", norm_pix=True)
  np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_example_mask_excludes_padding(batch):
  images, logits, mask = batch
  total, count = losses.reconstruction_loss_terms(logits, images, mask, patch=4,
                                                  example_mask=jnp.array([True, False]))
  alone = losses.reconstruction_loss(logits[:1], images[:1], mask[:1], patch=4)
  np.testing.assert_allclose(total / count, alone, rtol=1e-6)
  assert float(count) == 2.0


def test_bad_settings(batch):
  images, logits, mask = batch
  with pytest.raises(ValueError, match="loss must be"):
    losses.reconstruction_loss(logits, images, mask, patch=4, loss="l1")
  with pytest.raises(ValueError, match="norm_pix"):
    losses.reconstruction_loss(logits, images, mask, patch=4, loss="bce", norm_pix=True)
