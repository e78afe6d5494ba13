"""The MAE decoder and the masked autoencoder (encoder + decoder) of pretraining."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from mae_jax.models import dense
from mae_jax.models import masking
from mae_jax.models import vit


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  dim: int = 128
  depth: int = 4
  heads: int = 8
  mlp_ratio: float = 4.0


class Decoder(nn.Module):
  """MAE decoder: mask tokens, un-shuffle, sin-cos positions, blocks, patch logits."""
  encoder: vit.ViTConfig
  config: DecoderConfig
  dtype: vit.Dtype = jnp.float32

  @nn.compact
  def __call__(self, latent: jax.Array, ids_restore: jax.Array) -> jax.Array:
    enc, cfg = self.encoder, self.config
    x = dense.Dense(cfg.dim, kernel_init=vit.xavier, dtype=self.dtype, name="embed")(latent)
    n, visible = x.shape[0], x.shape[1] - 1
    token = self.param("mask_token", vit.token_init, (1, 1, cfg.dim)).astype(self.dtype)
    tokens = jnp.broadcast_to(token, (n, enc.num_patches - visible, cfg.dim))
    patches = jnp.concatenate([x[:, 1:], tokens], axis=1)
    patches = jnp.take_along_axis(patches, ids_restore[:, :, None], axis=1)
    x = jnp.concatenate([x[:, :1], patches], axis=1)
    x = x + jnp.asarray(masking.sincos_pos_embed(cfg.dim, enc.grid), self.dtype)[None]
    for i in range(cfg.depth):
      x = vit.Block(cfg.dim, cfg.heads, cfg.mlp_ratio, 0.0, self.dtype, name=f"block_{i}")(x)
    x = nn.LayerNorm(epsilon=vit.LN_EPS, dtype=self.dtype, name="norm")(x)
    out = enc.patch * enc.patch * enc.channels
    x = dense.Dense(out, kernel_init=vit.xavier, dtype=self.dtype, name="pred")(x)
    return x[:, 1:].astype(jnp.float32)


class MAE(nn.Module):
  """Masked autoencoder: returns patch logits and the mask that produced them."""
  encoder: vit.ViTConfig
  decoder: DecoderConfig
  mask_ratio: float = 0.75
  dtype: vit.Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, noise: jax.Array) -> dict[str, jax.Array]:
    """Encodes the kept patches of `images` (chosen by `noise`) and predicts all patches.

    Returns:
      dict with `logits` (N, L, patch*patch*C) float32, `mask` (N, L) 1 = removed,
      `ids_restore` (N, L) and `latent` (N, 1 + kept, dim).
    """
    latent, mask, ids_restore = vit.Encoder(self.encoder, dtype=self.dtype, name="encoder")(
        images, noise, self.mask_ratio)
    logits = Decoder(self.encoder, self.decoder, self.dtype, name="decoder")(latent, ids_restore)
    return {"logits": logits, "mask": mask.astype(jnp.float32), "ids_restore": ids_restore,
            "latent": latent}
