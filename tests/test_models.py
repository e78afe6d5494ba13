"""MAE modules: shapes, parameter counts, determinism, masking behaviour."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import pretrain as pretrain_config
from mae_jax.models import build
from mae_jax.models import dense
from mae_jax.models import masking
from mae_jax.models import vit
from mae_jax.objectives import reconstruction
from mae_jax.train import optim


def test_seed_model_sizes_match_the_design():
  config = pretrain_config.get_config("seed")
  mae = build.build_mae(config.model)
  params = jax.eval_shape(lambda k: build.init_mae(mae, k), jax.random.key(0))
  n_encoder = optim.count_params(params["encoder"])
  assert 6.2e6 < n_encoder < 6.6e6, n_encoder  # the seed recipe (docs/design.md): ~6.4M
  assert params["encoder"]["patch_embed"]["kernel"].shape == (4, 4, 1, 256)
  assert params["decoder"]["pred"]["kernel"].shape == (128, 16)
  assert len([k for k in params["encoder"] if k.startswith("block_")]) == 8
  assert len([k for k in params["decoder"] if k.startswith("block_")]) == 4


@pytest.fixture
def tiny():
  mae = build.build_mae(pretrain_config.get_config("tiny").model)
  return mae, build.init_mae(mae, jax.random.key(0))


def test_mae_outputs(tiny):
  mae, params = tiny
  enc = mae.encoder
  images = jax.random.uniform(jax.random.key(1), (3, 64, 64, 1))
  noise = jax.random.uniform(jax.random.key(2), (3, enc.num_patches))
  out = mae.apply({"params": params}, images, noise)
  kept = int(enc.num_patches * 0.25)
  assert out["logits"].shape == (3, enc.num_patches, enc.patch ** 2)
  assert out["latent"].shape == (3, 1 + kept, enc.dim)
  np.testing.assert_array_equal(out["mask"].sum(1), enc.num_patches - kept)
  again = mae.apply({"params": params}, images, noise)
  np.testing.assert_array_equal(out["logits"], again["logits"])


@pytest.mark.parametrize("preset", ["tiny", "demo"])
def test_removed_only_decoder_predicts_the_removed_patches_as_the_full_one(preset):
  """`removed_only` (the last decoder block, norm and prediction on the removed patches
  alone) gives the full decoder's logits there, 0 on kept patches, and the same loss
  gradient; the full decoder's output does not depend on the tokens' order in it."""
  config = pretrain_config.get_config(preset)
  mae = build.build_mae(config.model)
  params = build.init_mae(mae, jax.random.key(0))
  enc = mae.encoder
  images = jax.random.uniform(jax.random.key(1), (3, 64, 64, 1))
  noise = jax.random.uniform(jax.random.key(2), (3, enc.num_patches))
  full = mae.apply({"params": params}, images, noise)
  part = mae.apply({"params": params}, images, noise, removed_only=True)
  removed = np.asarray(full["mask"])[..., None] == 1
  np.testing.assert_allclose(np.where(removed, part["logits"], 0),
                             np.where(removed, full["logits"], 0), atol=2e-5)
  np.testing.assert_array_equal(np.where(removed, 0, part["logits"]), 0.0)

  def loss(p, removed_only):
    out = mae.apply({"params": p}, images, noise, removed_only=removed_only)
    return reconstruction.Reconstruction().loss(out["logits"], images, out["mask"], enc.patch)

  grads = [jax.grad(loss)(params, r) for r in (False, True)]
  for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
    np.testing.assert_allclose(a, b, atol=2e-6 + 1e-4 * float(np.abs(a).max()))

  # The decoder in image order (its old form): embed, un-shuffle, add positions, blocks.
  dparams = params["decoder"]
  x = dense.Dense(mae.decoder.dim).apply({"params": dparams["embed"]}, full["latent"])
  tokens = jnp.broadcast_to(dparams["mask_token"], (3, enc.num_patches + 1 - x.shape[1],
                                                    mae.decoder.dim))
  patches = jnp.concatenate([x[:, 1:], tokens], axis=1)
  patches = jnp.take_along_axis(patches, full["ids_restore"][:, :, None], axis=1)
  x = jnp.concatenate([x[:, :1], patches], axis=1) + masking.sincos_pos_embed(
      mae.decoder.dim, enc.grid)[None]
  for i in range(mae.decoder.depth):
    x = vit.Block(mae.decoder.dim, mae.decoder.heads).apply({"params": dparams[f"block_{i}"]}, x)
  x = nn.LayerNorm(epsilon=vit.LN_EPS).apply({"params": dparams["norm"]}, x)
  logits = dense.Dense(enc.patch ** 2).apply({"params": dparams["pred"]}, x)[:, 1:]
  np.testing.assert_allclose(full["logits"], logits, atol=2e-5)


def test_encoder_sees_only_kept_patches(tiny):
  """Changing a removed patch cannot change the latent; changing a kept one does."""
  mae, params = tiny
  enc = mae.encoder
  images = jax.random.uniform(jax.random.key(1), (1, 64, 64, 1))
  noise = jax.random.uniform(jax.random.key(2), (1, enc.num_patches))
  out = mae.apply({"params": params}, images, noise)
  mask = np.asarray(out["mask"][0])
  p, g = enc.patch, enc.grid[1]
  removed, kept = int(np.flatnonzero(mask == 1)[0]), int(np.flatnonzero(mask == 0)[0])

  def bump(idx):
    r, c = divmod(idx, g)
    return images.at[0, r * p:(r + 1) * p, c * p:(c + 1) * p, 0].add(0.5)

  same = mae.apply({"params": params}, bump(removed), noise)
  np.testing.assert_allclose(same["latent"], out["latent"], atol=1e-6)
  diff = mae.apply({"params": params}, bump(kept), noise)
  assert np.abs(np.asarray(diff["latent"] - out["latent"])).max() > 1e-4


def test_encoder_without_noise_encodes_every_patch(tiny):
  mae, params = tiny
  enc = mae.encoder
  latent, mask, _ = vit.Encoder(enc).apply({"params": params["encoder"]},
                                              jnp.zeros((2, 64, 64, 1)))
  assert latent.shape == (2, 1 + enc.num_patches, enc.dim) and mask is None


def test_wrong_image_shape_is_refused(tiny):
  mae, params = tiny
  with pytest.raises(ValueError, match="expected images of shape"):
    mae.apply({"params": params}, jnp.zeros((1, 32, 32, 1)), jnp.zeros((1, 4)))


def test_initialisation_follows_mae(tiny):
  _, params = tiny
  enc = params["encoder"]
  assert float(jnp.std(enc["cls_token"])) < 0.1
  np.testing.assert_array_equal(enc["block_0"]["attn"]["qkv"]["bias"], 0.0)
  np.testing.assert_array_equal(enc["norm"]["scale"], 1.0)
  # xavier-uniform bound for the fused qkv kernel (32 -> 96): sqrt(6 / (32 + 96))
  bound = (6 / (32 + 96)) ** 0.5
  k = np.asarray(enc["block_0"]["attn"]["qkv"]["kernel"])
  assert np.abs(k).max() <= bound and np.abs(k).max() > 0.8 * bound


@pytest.mark.parametrize("train", [False, True])
def test_cls_only_last_block_gives_the_full_encoders_cls_token(train):
  """The classifier's CLS feature skips the last block's other tokens: the same
  values and gradients as the full encoder's first token, drop path included."""
  cfg = vit.ViTConfig(image_size=16, patch=4, dim=32, depth=3, heads=4)
  encoder = vit.Encoder(cfg, drop_path=0.2)
  images = jax.random.normal(jax.random.key(0), (5, 16, 16, 1))
  params = encoder.init(jax.random.key(1), images)
  rngs = {"dropout": jax.random.key(2)}
  g = jax.random.normal(jax.random.key(3), (5, 32))

  def cls(p, cls_only):
    tokens, _, _ = encoder.apply(p, images, deterministic=not train, cls_only=cls_only,
                                 rngs=rngs)
    assert tokens.shape[1] == (1 if cls_only else 1 + cfg.num_patches)
    return tokens[:, 0]

  full, fast = cls(params, False), cls(params, True)
  np.testing.assert_allclose(fast, full, rtol=1e-5, atol=1e-5)
  grad_full = jax.grad(lambda p: (cls(p, False) * g).sum())(params)
  grad_fast = jax.grad(lambda p: (cls(p, True) * g).sum())(params)
  for a, b in zip(jax.tree.leaves(grad_fast), jax.tree.leaves(grad_full)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="cls_only"):
    encoder.apply(params, images, cls_only=True, return_blocks=True)


def test_patch_embed_is_the_strided_convolution():
  """vit.PatchEmbed (patchify + one matmul) has nn.Conv's parameters and outputs."""
  images = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  embed = vit.PatchEmbed(8, 4, channels=3)
  conv = nn.Conv(8, (4, 4), strides=(4, 4), padding="VALID")
  patches = masking.patchify(images, 4)
  variables = embed.init(jax.random.key(1), patches)
  assert jax.tree.map(jnp.shape, variables) == jax.tree.map(
      jnp.shape, conv.init(jax.random.key(1), images))
  np.testing.assert_allclose(embed.apply(variables, patches),
                             conv.apply(variables, images).reshape(2, 16, 8), atol=1e-5)
