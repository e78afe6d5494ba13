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
  """MAE decoder: mask tokens, sin-cos positions, blocks, patch logits.

  It runs in the encoder's shuffled token order (CLS, the kept patches, then the
  removed ones), each token given its own position embedding: the blocks treat
  tokens alike whatever their order, so this is the reference's computation in
  image order with the tokens reordered, and the logits are put back in image order
  at the end. The removed patches form the tail, so with `removed_only` the last
  block computes those tokens alone (their queries still attend to every token), as
  do the final norm and the prediction: all an MAE loss on the removed patches reads,
  for about a quarter less work in that block.
  """
  encoder: vit.ViTConfig
  config: DecoderConfig
  dtype: vit.Dtype = jnp.float32

  @nn.compact
  def __call__(self, latent: jax.Array, ids_restore: jax.Array,
               removed_only: bool = False) -> jax.Array:
    """(N, 1 + kept, dim) encoder tokens and (N, L) `ids_restore` -> (N, L, patch*patch*C)
    patch logits in image order (float32); with `removed_only`, the kept patches' rows are 0."""
    enc, cfg = self.encoder, self.config
    x = dense.Dense(cfg.dim, kernel_init=vit.xavier, dtype=self.dtype, name="embed")(latent)
    n, kept = x.shape[0], x.shape[1] - 1
    token = self.param("mask_token", vit.token_init, (1, 1, cfg.dim)).astype(self.dtype)
    tokens = jnp.broadcast_to(token, (n, enc.num_patches - kept, cfg.dim))
    pos = jnp.asarray(masking.sincos_pos_embed(cfg.dim, enc.grid), self.dtype)
    ids_shuffle = jnp.argsort(ids_restore, axis=1)  # shuffled token j is patch ids_shuffle[j]
    patches = jnp.concatenate([x[:, 1:], tokens], axis=1)
    patches = patches + jnp.take(pos[1:], ids_shuffle, axis=0)
    x = jnp.concatenate([x[:, :1] + pos[None, :1], patches], axis=1)
    start = 1 + kept if removed_only else 1          # the first token whose output is read
    for i in range(cfg.depth):
      last = i == cfg.depth - 1
      x = vit.Block(cfg.dim, cfg.heads, cfg.mlp_ratio, 0.0, self.dtype, name=f"block_{i}")(
          x, query_start=start if last else 0)
    x = x if cfg.depth else x[:, start:]
    x = nn.LayerNorm(epsilon=vit.LN_EPS, dtype=self.dtype, name="norm")(x)
    out = enc.patch * enc.patch * enc.channels
    x = dense.Dense(out, kernel_init=vit.xavier, dtype=self.dtype, name="pred")(x)
    x = x.astype(jnp.float32)
    if removed_only:
      x = jnp.concatenate([jnp.zeros((n, kept, out), x.dtype), x], axis=1)
    return jnp.take_along_axis(x, ids_restore[:, :, None], axis=1)


class MAE(nn.Module):
  """Masked autoencoder: returns patch logits and the mask that produced them."""
  encoder: vit.ViTConfig
  decoder: DecoderConfig
  mask_ratio: float = 0.75
  dtype: vit.Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, noise: jax.Array,
               removed_only: bool = False) -> dict[str, jax.Array]:
    """Encodes the kept patches of `images` (chosen by `noise`) and predicts all patches,
    or with `removed_only` the removed ones alone (what a loss over them reads; less work).

    Returns:
      dict with `logits` (N, L, patch*patch*C) float32 (0 for kept patches with
      `removed_only`), `mask` (N, L) 1 = removed,
      `ids_restore` (N, L) and `latent` (N, 1 + kept, dim).
    """
    latent, mask, ids_restore = vit.Encoder(self.encoder, dtype=self.dtype, name="encoder")(
        images, noise, self.mask_ratio)
    logits = Decoder(self.encoder, self.decoder, self.dtype, name="decoder")(
        latent, ids_restore, removed_only)
    return {"logits": logits, "mask": mask.astype(jnp.float32), "ids_restore": ids_restore,
            "latent": latent}
