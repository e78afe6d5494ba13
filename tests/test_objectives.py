"""The MAE reconstruction objective: BCE and MSE, masked-only or all patches, norm_pix,
its masking noise, its config checks and what its export says."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mae_jax.models import masking
from mae_jax.objectives import reconstruction

Recon = reconstruction.Reconstruction


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
  got = Recon(type="bce").loss(logits, images, mask, 4)
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  all_patches = Recon(masked_only=False).loss(logits, images, mask, 4)
  np.testing.assert_allclose(all_patches, per_patch.mean(), rtol=1e-5)


def test_loss_ignores_visible_patches_when_masked_only(batch):
  images, logits, mask = batch
  changed = logits.at[0, 1].add(100.0)  # patch 1 of example 0 is visible
  a = Recon().loss(logits, images, mask, 4)
  b = Recon().loss(changed, images, mask, 4)
  assert float(a) == float(b)
  c = Recon(masked_only=False).loss(changed, images, mask, 4)
  assert float(c) > float(a)


def test_mse_norm_pix_uses_unbiased_variance(batch):
  images, logits, mask = batch
  target = np.asarray(masking.patchify(images, 4))
  t = (target - target.mean(-1, keepdims=True)) / np.sqrt(target.var(-1, ddof=1,
                                                                      keepdims=True) + 1e-6)
  per_patch = ((np.asarray(logits) - t) ** 2).mean(-1)
  expected = (per_patch * np.asarray(mask)).sum() / np.asarray(mask).sum()
  got = Recon(type="mse", norm_pix=True).loss(logits, images, mask, 4)
  np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_example_mask_excludes_padding(batch):
  images, logits, mask = batch
  total, count = Recon().loss_terms(logits, images, mask, 4,
                                   example_mask=jnp.array([True, False]))
  alone = Recon().loss(logits[:1], images[:1], mask[:1], 4)
  np.testing.assert_allclose(total / count, alone, rtol=1e-6)
  assert float(count) == 2.0


def test_bad_settings():
  with pytest.raises(ValueError, match="loss.type='l1' must be one of bce, mse"):
    Recon(type="l1")
  with pytest.raises(ValueError, match="norm_pix=True makes targets outside"):
    Recon(type="bce", norm_pix=True)


def test_training_noise_is_one_draw_for_the_batch_evaluation_noise_one_per_example():
  objective = Recon()
  key = jax.random.key(3)
  np.testing.assert_array_equal(objective.noise(key, 4, 16), jax.random.uniform(key, (4, 16)))
  rows = objective.example_noise(key, jnp.array([5, 2, 9]), 16)
  alone = objective.example_noise(key, jnp.array([2]), 16)
  np.testing.assert_array_equal(rows[1], alone[0])   # a row's mask follows its index only
  assert not np.array_equal(rows[0], rows[1])


def test_a_target_added_to_the_table_is_checked_computed_and_exported(monkeypatch):
  """Adding a target is one entry in `TARGETS` (and its export phrase): the config check,
  the loss and the figure's inverse take it from there."""
  monkeypatch.setitem(reconstruction.TARGETS, "double",
                      lambda patches, patch, channels, sigma: 2 * patches)
  monkeypatch.setitem(reconstruction._TARGET_NOTES, "double", "twice the pixels")  # pylint: disable=protected-access
  assert reconstruction.problems({"type": "mse", "target": "double"}, {}) == []
  objective = Recon(type="mse", target="double")
  images = jax.random.uniform(jax.random.key(0), (1, 8, 8, 1))
  pixels = masking.patchify(images, 4)
  np.testing.assert_allclose(objective.targets(images, 4), 2 * pixels)
  np.testing.assert_allclose(objective.to_pixels(2 * pixels, images, 4), pixels, atol=1e-6)
  assert "twice the pixels" in objective.export_note()
  assert "target='hog'" in " ".join(reconstruction.problems({"type": "mse", "target": "hog"}, {}))


def test_saved_configs_lacking_keys_take_the_defaults_and_exports_say_what_decoders_output():
  old = Recon.from_config({"type": "bce", "norm_pix": False, "masked_only": True})
  assert old == Recon()
  assert old.export_note() == "decoder outputs are logits of [0, 1] pixels (apply a sigmoid)"
  assert old.export_fields() == {"norm_pix_loss": False}
  demo = Recon(type="mse", norm_pix=True, masked_only=False, target="highpass")
  assert demo.export_note().startswith("decoder outputs are each patch minus its own Gaussian "
                                       "blur (sigma 1.0 px), normalised per patch")
  assert demo.export_fields() == {"norm_pix_loss": True}
  assert demo.describe() == "MSE on the highpass of every patch, normalised per patch"


def test_masked_only_with_a_ratio_that_removes_nothing_is_refused():
  found = reconstruction.problems({"type": "bce", "masked_only": True},
                                  {"mask_ratio": 0.0, "image_size": 16, "patch": 8})
  assert len(found) == 1 and "removes no patch of 4" in found[0]
