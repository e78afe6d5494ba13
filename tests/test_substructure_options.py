"""The options of the substructure work: the per-patch convolutional stem, the high-pass
reconstruction target, and partial fine-tuning. The MAE must stay honest with each: no
pixel of a removed patch may reach a visible token (or a visible patch's target)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import finetune as finetune_config
from configs import pretrain as pretrain_config
from mae_jax import objectives
from mae_jax.models import build
from mae_jax.models import convs
from mae_jax.models import masking
from mae_jax.objectives import reconstruction
from mae_jax.runtime import parallel
from mae_jax.stages import validate
from mae_jax.train import optim
from mae_jax.train import steps

_HP = reconstruction.Reconstruction(type="mse", target="highpass")
_HP_NORM = reconstruction.Reconstruction(type="mse", target="highpass", norm_pix=True)


def _mae(stem: str, patch: int = 8):
  config = pretrain_config.get_config("tiny")
  config.model.patch, config.model.stem = patch, stem
  mae = build.build_mae(config.model)
  return mae, build.init_mae(mae, jax.random.key(0))


def test_conv_stem_token_depends_on_its_own_patch_only():
  stem = convs.PatchConvStem(dim=24, patch=8, width=4)
  patches = jax.random.uniform(jax.random.key(0), (2, 16, 64))
  params = stem.init(jax.random.key(1), patches)
  base = stem.apply(params, patches)
  assert base.shape == (2, 16, 24)
  for j in (0, 5, 15):
    changed = stem.apply(params, patches.at[:, j].add(jax.random.normal(jax.random.key(j), (64,))))
    moved = np.abs(np.asarray(changed - base)).max(axis=-1)   # (2, 16)
    assert (moved[:, j] > 1e-4).all()
    np.testing.assert_array_equal(np.delete(moved, j, axis=1), 0.0)


@pytest.mark.parametrize("stem", ["linear", "conv"])
def test_a_removed_patch_reaches_no_visible_token(stem):
  """Any change inside a removed patch leaves every encoder output (the visible tokens
  and CLS) and so every decoder output bit-identical, with either stem."""
  mae, params = _mae(stem)
  enc = mae.encoder
  images = jax.random.uniform(jax.random.key(1), (2, 64, 64, 1))
  noise = jax.random.uniform(jax.random.key(2), (2, enc.num_patches))
  out = mae.apply({"params": params}, images, noise)
  removed = np.argwhere(np.asarray(out["mask"][0]) > 0)[:, 0]
  patches = masking.patchify(images, enc.patch)
  for j in removed[:3]:
    poked = patches.at[0, j].set(jax.random.uniform(jax.random.key(int(j)), (enc.patch ** 2,)))
    again = mae.apply({"params": params},
                      masking.unpatchify(poked, enc.patch, enc.grid, 1), noise)
    np.testing.assert_array_equal(again["latent"], out["latent"])
    np.testing.assert_array_equal(again["logits"], out["logits"])
  # A visible patch does reach the tokens: the test can see a leak.
  visible = np.argwhere(np.asarray(out["mask"][0]) == 0)[0, 0]
  poked = patches.at[0, visible].add(0.5)
  again = mae.apply({"params": params}, masking.unpatchify(poked, enc.patch, enc.grid, 1), noise)
  assert not np.array_equal(again["latent"], out["latent"])


def test_conv_stem_mae_masks_before_it_embeds():
  """The encoder embeds only the kept patches: its tokens equal the stem applied to the
  kept patches (in the masking's order) plus their own position embeddings."""
  mae, params = _mae("conv")
  enc = mae.encoder
  images = jax.random.uniform(jax.random.key(3), (2, 64, 64, 1))
  noise = jax.random.uniform(jax.random.key(4), (2, enc.num_patches))
  captured = mae.apply({"params": params}, images, noise,
                       capture_intermediates=lambda m, _: m.name == "patch_embed",
                       mutable=["intermediates"])[1]["intermediates"]
  tokens = captured["encoder"]["patch_embed"]["__call__"][0]
  assert tokens.shape == (2, masking.num_kept(enc.num_patches, 0.75), enc.dim)
  kept = jnp.argsort(noise, axis=1)[:, :tokens.shape[1]]
  patches = jnp.take_along_axis(masking.patchify(images, enc.patch), kept[:, :, None], axis=1)
  stem = convs.PatchConvStem(enc.dim, enc.patch, 1, enc.stem_width)
  expected = stem.apply({"params": params["encoder"]["patch_embed"]}, patches)
  np.testing.assert_allclose(tokens, expected, rtol=1e-6, atol=1e-6)


def test_highpass_target_is_each_patch_minus_its_own_blur():
  images = jax.random.uniform(jax.random.key(0), (2, 16, 16, 1))
  target = _HP.targets(images, 8)
  patches = np.asarray(masking.patchify(images, 8)).reshape(2, 4, 8, 8)
  kernel = reconstruction.gaussian_kernel(1.0)
  r = len(kernel) // 2
  padded = np.pad(patches, ((0, 0), (0, 0), (r, r), (r, r)), mode="edge")
  blur = np.zeros_like(patches)
  for a, wa in enumerate(kernel):
    for b, wb in enumerate(kernel):
      blur += wa * wb * padded[:, :, a:a + 8, b:b + 8]
  np.testing.assert_allclose(target, (patches - blur).reshape(2, 4, 64), atol=1e-6)
  flat = jnp.full((1, 16, 16, 1), 0.7)
  np.testing.assert_allclose(_HP.targets(flat, 8), 0.0, atol=1e-6)


def test_highpass_target_and_loss_read_no_removed_pixel_for_a_visible_patch():
  """A change inside one patch changes that patch's high-pass target only; with the loss on
  the removed patches, a change inside a visible patch leaves the loss's terms alone."""
  images = jax.random.uniform(jax.random.key(5), (1, 16, 16, 1))
  patches = masking.patchify(images, 8)
  poked = masking.unpatchify(patches.at[0, 2].add(0.3), 8, (2, 2), 1)
  a = _HP_NORM.targets(images, 8)
  b = _HP_NORM.targets(poked, 8)
  moved = np.abs(np.asarray(a - b)).max(-1)[0]
  assert moved[2] > 0 and (np.delete(moved, 2) == 0).all()
  mask = jnp.array([[1.0, 1.0, 0.0, 1.0]])   # patch 2 visible
  logits = jax.random.normal(jax.random.key(6), (1, 4, 64))
  np.testing.assert_array_equal(_HP_NORM.loss(logits, images, mask, 8),
                                _HP_NORM.loss(logits, poked, mask, 8))


def test_highpass_with_bce_and_unknown_options_are_refused():
  with pytest.raises(ValueError, match="highpass"):
    reconstruction.Reconstruction(type="bce", target="highpass")
  with pytest.raises(ValueError, match="target='hog' must be one of"):
    reconstruction.Reconstruction(type="mse", target="hog")
  config = pretrain_config.get_config("tiny")
  config.loss.target, config.model.stem, config.loss.highpass_sigma = "highpass", "convo", 0.0
  found = "\n".join(validate.problems(config, "/tmp/unused_workdir"))
  assert "BCE cannot score" in found and "loss.type='mse'" in found
  assert "model.stem='convo' must be one of linear, conv" in found
  assert "loss.highpass_sigma=0.0" in found
  config = finetune_config.get_config("tiny")
  config.trainable_blocks = 5
  config.init_from = ""
  assert any("trainable_blocks=5" in p for p in validate.problems(config, "/tmp/unused_workdir"))


def test_highpass_reconstruction_figure_is_in_pixels():
  """With a high-pass target (and norm_pix) the figure's reconstruction adds each patch's
  blur back: a decoder that predicts the target exactly redraws the image."""
  config = pretrain_config.get_config("tiny")
  config.loss.update(type="mse", norm_pix=True, target="highpass")
  mae = build.build_mae(config.model)
  images = jax.random.uniform(jax.random.key(7), (2, 64, 64, 1))
  target = _HP_NORM.targets(images, mae.encoder.patch)

  class Exact:   # stands in for the MAE: predicts the loss's target perfectly
    encoder = mae.encoder

    @staticmethod
    def apply(variables, imgs, noise):
      del variables
      return {"logits": target, "mask": jnp.ones(noise.shape)}

  rows = steps.make_reconstruct(Exact, objectives.from_config(config.loss))(
      None, images, jax.random.key(0))
  np.testing.assert_allclose(rows["reconstruction"], images, atol=1e-5)


def test_partial_finetune_trains_the_last_blocks_and_the_head_only():
  config = finetune_config.get_config("tiny")   # depth 2
  depth = config.model.depth
  model = build.build_classifier(config.model, 3, parallel.AXIS, frozen_blocks=depth - 1)
  params, stats = build.init_classifier(model, jax.random.key(0))
  settings = optim.ClassifierOptimSettings.from_config(config.optim)
  frozen = settings.frozen + optim.frozen_below(depth, 1)
  tx, peaks = optim.classifier_optimizer(params, dataclasses.replace(settings, frozen=frozen),
                                         total_steps=4, steps_per_epoch=2, global_batch=8,
                                         depth=depth)
  assert all(v == 0 for v in jax.tree.leaves(peaks["encoder"]["block_0"]))
  assert all(v == 0 for v in jax.tree.leaves(peaks["encoder"]["patch_embed"]))
  assert peaks["encoder"]["cls_token"] == 0
  assert all(v > 0 for v in jax.tree.leaves(peaks["encoder"][f"block_{depth - 1}"]))
  assert all(v > 0 for v in jax.tree.leaves(peaks["encoder"]["norm"]))
  mesh = parallel.make_mesh()
  state = parallel.replicate(steps.ClassifierState.create(
      apply_fn=model.apply, params=params, tx=tx, batch_stats=stats), mesh)
  step = steps.make_classifier_step(model, mesh, frozen_encoder=False)
  rng = np.random.default_rng(0)
  batch = parallel.global_batch({"image": rng.random((8, 64, 64, 1), dtype=np.float32),
                                 "label": rng.integers(0, 3, 8).astype(np.int32)}, mesh)
  before = jax.device_get(state.params)
  for i in range(2):
    state, _ = step(state, batch["image"], batch["label"], jax.random.key(i))
  after = jax.device_get(state.params)
  for name in ("patch_embed", "block_0"):
    for a, b in zip(jax.tree.leaves(before["encoder"][name]),
                    jax.tree.leaves(after["encoder"][name])):
      np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(before["encoder"]["cls_token"], after["encoder"]["cls_token"])
  for name in (f"block_{depth - 1}", "norm"):
    assert any(not np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(before["encoder"][name]), jax.tree.leaves(after["encoder"][name])))
