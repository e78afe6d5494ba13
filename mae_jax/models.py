"""Linen modules: patch embedding, ViT encoder, MAE decoder.

Modules are functional: parameters live outside them (`model.init` / `model.apply`),
and they know nothing about optimisers, stages or files. Layer layout and
initialisation follow the MAE reference (pre-norm blocks, LayerNorm eps 1e-6,
qkv bias, exact GELU, xavier-uniform linear layers, N(0, 0.02) tokens, fixed
sin-cos position embeddings).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mae_jax import attention
from mae_jax import masking

Dtype = Any

_xavier = nn.initializers.xavier_uniform()
_token_init = nn.initializers.normal(stddev=0.02)
# Conv kernel (p, p, C, D) initialised as MAE does: xavier on its (C*p*p, D) view.
_patch_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform",
                                               in_axis=(0, 1, 2), out_axis=3)
LN_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """Sizes of a ViT encoder on square single- or multi-channel images."""
  image_size: int = 64
  channels: int = 1
  patch: int = 4
  dim: int = 256
  depth: int = 8
  heads: int = 8
  mlp_ratio: float = 4.0

  @property
  def grid(self) -> tuple[int, int]:
    return (self.image_size // self.patch, self.image_size // self.patch)

  @property
  def num_patches(self) -> int:
    return self.grid[0] * self.grid[1]


class Attention(nn.Module):
  """Multi-head self-attention with a fused qkv projection (softmax in float32)."""
  dim: int
  heads: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.dim % self.heads:
      raise ValueError(f"dim {self.dim} is not divisible by heads {self.heads}")
    qkv = nn.Dense(3 * self.dim, kernel_init=_xavier, dtype=self.dtype, name="qkv")(x)
    # Exact softmax attention in cache-sized blocks with a hand-written backward (see
    # mae_jax/attention.py): the plain einsum-softmax-einsum form was half of the CPU step.
    out = attention.multi_head_attention(qkv, self.heads)
    return nn.Dense(self.dim, kernel_init=_xavier, dtype=self.dtype, name="proj")(out)


def gelu(x: jax.Array) -> jax.Array:
  """Exact GELU, x * Phi(x), in torch.nn.GELU's erf form.

  The same function as `nn.gelu(x, approximate=False)`, which XLA lowers through
  `erfc` (an exp and two polynomial branches); `erf` is one clamped polynomial,
  cheaper on a CPU, and its error near the far negative tail (where GELU is ~0)
  stays at float32 rounding.
  """
  return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(2 ** -0.5, x.dtype)))


class Mlp(nn.Module):
  """Two-layer MLP with exact (erf) GELU, as torch.nn.GELU."""
  hidden: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dim = x.shape[-1]
    x = nn.Dense(self.hidden, kernel_init=_xavier, dtype=self.dtype, name="fc1")(x)
    x = gelu(x)
    return nn.Dense(dim, kernel_init=_xavier, dtype=self.dtype, name="fc2")(x)


class Block(nn.Module):
  """Pre-norm transformer block with optional stochastic depth (drop path)."""
  dim: int
  heads: int
  mlp_ratio: float = 4.0
  drop_path: float = 0.0
  dtype: Dtype = jnp.float32

  def _drop_path(self, x: jax.Array, deterministic: bool) -> jax.Array:
    if deterministic or self.drop_path == 0.0:
      return x
    keep = 1.0 - self.drop_path
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
    return jnp.where(mask, x / keep, 0.0).astype(x.dtype)

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    y = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name="norm1")(x)
    x = x + self._drop_path(Attention(self.dim, self.heads, self.dtype, name="attn")(y),
                            deterministic)
    y = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name="norm2")(x)
    y = Mlp(int(self.dim * self.mlp_ratio), self.dtype, name="mlp")(y)
    return x + self._drop_path(y, deterministic)


class Encoder(nn.Module):
  """ViT encoder: patch embedding + fixed sin-cos positions + CLS + blocks + norm.

  With `noise`, MAE random masking keeps `int(L * (1 - mask_ratio))` patches;
  without it every patch is encoded (classification).
  """
  config: ViTConfig
  drop_path: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, noise: jax.Array | None = None,
               mask_ratio: float = 0.0, deterministic: bool = True):
    cfg = self.config
    if images.shape[1:] != (cfg.image_size, cfg.image_size, cfg.channels):
      raise ValueError(f"expected images of shape (N, {cfg.image_size}, {cfg.image_size}, "
                       f"{cfg.channels}), got {images.shape}")
    x = nn.Conv(cfg.dim, (cfg.patch, cfg.patch), strides=(cfg.patch, cfg.patch),
                padding="VALID", kernel_init=_patch_init, dtype=self.dtype,
                name="patch_embed")(images.astype(self.dtype))
    n = x.shape[0]
    x = x.reshape(n, cfg.num_patches, cfg.dim)
    pos = jnp.asarray(masking.sincos_pos_embed(cfg.dim, cfg.grid), self.dtype)
    x = x + pos[None, 1:]
    mask = ids_restore = None
    if noise is not None:
      x, mask, ids_restore = masking.random_masking(x, noise, mask_ratio)
    cls = self.param("cls_token", _token_init, (1, 1, cfg.dim)).astype(self.dtype)
    cls = jnp.broadcast_to(cls + pos[None, :1], (n, 1, cfg.dim))
    x = jnp.concatenate([cls, x], axis=1)
    rates = [self.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
    for i in range(cfg.depth):
      x = Block(cfg.dim, cfg.heads, cfg.mlp_ratio, rates[i], self.dtype,
                name=f"block_{i}")(x, deterministic)
    x = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name="norm")(x)
    return x, mask, ids_restore


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  dim: int = 128
  depth: int = 4
  heads: int = 8
  mlp_ratio: float = 4.0


class Decoder(nn.Module):
  """MAE decoder: mask tokens, un-shuffle, sin-cos positions, blocks, patch logits."""
  encoder: ViTConfig
  config: DecoderConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, latent: jax.Array, ids_restore: jax.Array) -> jax.Array:
    enc, cfg = self.encoder, self.config
    x = nn.Dense(cfg.dim, kernel_init=_xavier, dtype=self.dtype, name="embed")(latent)
    n, visible = x.shape[0], x.shape[1] - 1
    token = self.param("mask_token", _token_init, (1, 1, cfg.dim)).astype(self.dtype)
    tokens = jnp.broadcast_to(token, (n, enc.num_patches - visible, cfg.dim))
    patches = jnp.concatenate([x[:, 1:], tokens], axis=1)
    patches = jnp.take_along_axis(patches, ids_restore[:, :, None], axis=1)
    x = jnp.concatenate([x[:, :1], patches], axis=1)
    x = x + jnp.asarray(masking.sincos_pos_embed(cfg.dim, enc.grid), self.dtype)[None]
    for i in range(cfg.depth):
      x = Block(cfg.dim, cfg.heads, cfg.mlp_ratio, 0.0, self.dtype, name=f"block_{i}")(x)
    x = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name="norm")(x)
    out = enc.patch * enc.patch * enc.channels
    x = nn.Dense(out, kernel_init=_xavier, dtype=self.dtype, name="pred")(x)
    return x[:, 1:].astype(jnp.float32)


class MAE(nn.Module):
  """Masked autoencoder: returns patch logits and the mask that produced them."""
  encoder: ViTConfig
  decoder: DecoderConfig
  mask_ratio: float = 0.75
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, noise: jax.Array) -> dict[str, jax.Array]:
    """Encodes the kept patches of `images` (chosen by `noise`) and predicts all patches.

    Returns:
      dict with `logits` (N, L, patch*patch*C) float32, `mask` (N, L) 1 = removed,
      `ids_restore` (N, L) and `latent` (N, 1 + kept, dim).
    """
    latent, mask, ids_restore = Encoder(self.encoder, dtype=self.dtype, name="encoder")(
        images, noise, self.mask_ratio)
    logits = Decoder(self.encoder, self.decoder, self.dtype, name="decoder")(latent, ids_restore)
    return {"logits": logits, "mask": mask.astype(jnp.float32), "ids_restore": ids_restore,
            "latent": latent}


class MlpHead(nn.Module):
  """The seed's probe head: [Dense, BatchNorm, ReLU, Dropout] per hidden width, then Dense."""
  num_classes: int
  hidden: tuple[int, ...] = (512, 256)
  dropout: float = 0.2
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    for i, width in enumerate(self.hidden):
      x = nn.Dense(width, kernel_init=_xavier, name=f"fc{i}")(x)
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                       axis_name=self.bn_axis_name if train else None, name=f"bn{i}")(x)
      x = nn.relu(x)
      x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Dense(self.num_classes, kernel_init=_xavier, name="out")(x)


class LinearHead(nn.Module):
  """The MAE probe head: BatchNorm without affine (eps 1e-6), then a linear layer."""
  num_classes: int
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-6,
                     use_bias=False, use_scale=False,
                     axis_name=self.bn_axis_name if train else None, name="bn")(x)
    return nn.Dense(self.num_classes, kernel_init=nn.initializers.truncated_normal(0.01),
                    name="out")(x)


class Classifier(nn.Module):
  """ViT encoder on all patches (no masking) + a classification head.

  `features` and `classify` can be applied separately, so a probe can compute
  frozen features outside the differentiated function.
  """
  vit: ViTConfig
  num_classes: int = 3
  head: str = "mlp"          # 'mlp' (seed) or 'linear' (MAE)
  pool: str = "cls"          # 'cls' token after the final norm, or 'mean' of patch tokens
  head_hidden: tuple[int, ...] = (512, 256)
  dropout: float = 0.2
  drop_path: float = 0.0
  bn_axis_name: str | None = None
  dtype: Dtype = jnp.float32

  def setup(self):
    if self.head not in ("mlp", "linear") or self.pool not in ("cls", "mean"):
      raise ValueError(f"head must be 'mlp' or 'linear' and pool 'cls' or 'mean', got "
                       f"{self.head!r}, {self.pool!r}")
    self.encoder = Encoder(self.vit, drop_path=self.drop_path, dtype=self.dtype)
    if self.head == "mlp":
      self.classifier = MlpHead(self.num_classes, self.head_hidden, self.dropout,
                                self.bn_axis_name)
    else:
      self.classifier = LinearHead(self.num_classes, self.bn_axis_name)

  def features(self, images: jax.Array, train: bool = False) -> jax.Array:
    latent, _, _ = self.encoder(images, deterministic=not train)
    pooled = latent[:, 0] if self.pool == "cls" else latent[:, 1:].mean(axis=1)
    return pooled.astype(jnp.float32)

  def classify(self, features: jax.Array, train: bool = False) -> jax.Array:
    return self.classifier(features, train).astype(jnp.float32)

  def __call__(self, images: jax.Array, train: bool = False) -> dict[str, jax.Array]:
    pre_logits = self.features(images, train)
    return {"logits": self.classify(pre_logits, train), "pre_logits": pre_logits}
