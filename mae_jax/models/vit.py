"""The ViT encoder: patch embedding, fixed sin-cos positions, CLS token, pre-norm blocks.

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

from mae_jax.models import attention
from mae_jax.models import convs
from mae_jax.models import dense
from mae_jax.models import masking

Dtype = Any

xavier = nn.initializers.xavier_uniform()
token_init = nn.initializers.normal(stddev=0.02)
# Conv kernel (p, p, C, D) initialised as MAE does: xavier on its (C*p*p, D) view.
patch_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform",
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
  # Patch embedding: 'linear' (ViT's, a strided convolution: public MAE weights load) or
  # 'conv' (`convs.PatchConvStem`, a small CNN on each patch alone, `stem_width` channels).
  stem: str = "linear"
  stem_width: int = 16

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
  def __call__(self, x: jax.Array, cls_only: bool = False, query_start: int = 0) -> jax.Array:
    """(N, L, dim) -> (N, L, dim); with `cls_only`, only the first (CLS) token's
    output, (N, 1, dim): its query against every token's key and value; with
    `query_start`, the outputs of the tokens from that one on, (N, L - query_start, dim)."""
    if self.dim % self.heads:
      raise ValueError(f"dim {self.dim} is not divisible by heads {self.heads}")
    qkv = dense.Dense(3 * self.dim, kernel_init=xavier, dtype=self.dtype, name="qkv")(x)
    if cls_only:
      out = attention.first_query_attention(qkv, self.heads)
    else:
      # Exact softmax attention in cache-sized blocks with a hand-written backward (see
      # mae_jax/models/attention.py): the plain einsum-softmax-einsum form was half of the CPU step.
      out = attention.multi_head_attention(qkv, self.heads, query_start=query_start)
    return dense.Dense(self.dim, kernel_init=xavier, dtype=self.dtype, name="proj")(out)


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
    x = dense.Dense(self.hidden, kernel_init=xavier, dtype=self.dtype, name="fc1")(x)
    x = gelu(x)
    return dense.Dense(dim, kernel_init=xavier, dtype=self.dtype, name="fc2")(x)


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
  def __call__(self, x: jax.Array, deterministic: bool = True,
               cls_only: bool = False, query_start: int = 0) -> jax.Array:
    """(N, L, dim) -> (N, L, dim); with `cls_only`, the CLS token's output alone, (N, 1, dim);
    with `query_start`, the outputs of the tokens from that one on (every token still
    serves as key and value), (N, L - query_start, dim)."""
    y = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name="norm1")(x)
    attended = Attention(self.dim, self.heads, self.dtype, name="attn")(y, cls_only, query_start)
    x = x[:, :1] if cls_only else x[:, query_start:]
    x = x + self._drop_path(attended, deterministic)
    y = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name="norm2")(x)
    y = Mlp(int(self.dim * self.mlp_ratio), self.dtype, name="mlp")(y)
    return x + self._drop_path(y, deterministic)


class PatchEmbed(nn.Module):
  """The stride-p, p x p convolution of ViT's patch embedding, computed on patches from
  `masking.patchify` (pixels in (row, column, channel) order, as the kernel's) as one
  matmul: the same parameters as `nn.Conv` (kernel (p, p, C, dim), bias) and the same
  tokens, (N, L, dim). XLA's CPU backend runs the convolution's kernel gradient at a
  fraction of matmul speed (docs/performance.md)."""
  dim: int
  patch: int
  channels: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, patches: jax.Array) -> jax.Array:
    kernel = self.param("kernel", patch_init, (self.patch, self.patch, self.channels, self.dim),
                        jnp.float32)
    bias = self.param("bias", nn.initializers.zeros_init(), (self.dim,), jnp.float32)
    x, kernel, bias = nn.dtypes.promote_dtype(patches, kernel, bias, dtype=self.dtype)
    return dense.linear(x, kernel.reshape(-1, self.dim), bias)


def patch_embedding(cfg: ViTConfig, dtype: Dtype) -> nn.Module:
  """The encoder's patch embedding module for `cfg.stem` (named `patch_embed`)."""
  if cfg.stem == "linear":
    return PatchEmbed(cfg.dim, cfg.patch, cfg.channels, dtype, name="patch_embed")
  if cfg.stem == "conv":
    return convs.PatchConvStem(cfg.dim, cfg.patch, cfg.channels, cfg.stem_width, dtype,
                               name="patch_embed")
  raise ValueError(f"stem must be one of {', '.join(convs.STEMS)}, got {cfg.stem!r}")


class Encoder(nn.Module):
  """ViT encoder: patch embedding + fixed sin-cos positions + CLS + blocks + norm.

  With `noise`, MAE random masking keeps `int(L * (1 - mask_ratio))` patches;
  without it every patch is encoded (classification). Returns (tokens after the
  final norm, mask, ids_restore), plus with `return_blocks` the list of every
  block's output tokens (the residual stream, before the final norm).

  With `cls_only` the last block computes the CLS token alone (its query still
  attends to every token), and the tokens returned are (N, 1, dim): the same CLS
  output, for a tenth less work in the seed model, where a CLS-pooled head reads
  nothing else.
  """
  config: ViTConfig
  drop_path: float = 0.0
  dtype: Dtype = jnp.float32
  # Partial fine-tuning: no gradient flows into the patch embedding and the first this
  # many blocks (the optimiser freezes them; their backward pass is skipped).
  frozen_blocks: int = 0

  @nn.compact
  def __call__(self, images: jax.Array, noise: jax.Array | None = None,
               mask_ratio: float = 0.0, deterministic: bool = True,
               return_blocks: bool = False, cls_only: bool = False):
    cfg = self.config
    if cls_only and return_blocks:
      raise ValueError("cls_only computes no full last block to return")
    if images.shape[1:] != (cfg.image_size, cfg.image_size, cfg.channels):
      raise ValueError(f"expected images of shape (N, {cfg.image_size}, {cfg.image_size}, "
                       f"{cfg.channels}), got {images.shape}")
    # Patches are masked before they are embedded: the embedding (a small CNN with the
    # convolutional stem) runs on the kept patches alone, and sees no removed pixel.
    x = masking.patchify(images, cfg.patch)
    n = x.shape[0]
    pos = jnp.asarray(masking.sincos_pos_embed(cfg.dim, cfg.grid), self.dtype)
    patch_pos = pos[None, 1:]
    mask = ids_restore = None
    if noise is not None:
      x, mask, ids_restore = masking.random_masking(x, noise, mask_ratio)
      ids_keep = jnp.argsort(ids_restore, axis=1)[:, :x.shape[1]]
      patch_pos = jnp.take(pos[1:], ids_keep, axis=0)
    x = patch_embedding(cfg, self.dtype)(x) + patch_pos
    cls = self.param("cls_token", token_init, (1, 1, cfg.dim)).astype(self.dtype)
    cls = jnp.broadcast_to(cls + pos[None, :1], (n, 1, cfg.dim))
    x = jnp.concatenate([cls, x], axis=1)
    rates = [self.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
    blocks = []
    for i in range(cfg.depth):
      if self.frozen_blocks and i == self.frozen_blocks:
        x = jax.lax.stop_gradient(x)
      x = Block(cfg.dim, cfg.heads, cfg.mlp_ratio, rates[i], self.dtype,
                name=f"block_{i}")(x, deterministic, cls_only and i == cfg.depth - 1)
      blocks.append(x)
    if self.frozen_blocks >= cfg.depth:
      x = jax.lax.stop_gradient(x)
    x = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name="norm")(x)
    if return_blocks:
      return x, mask, ids_restore, blocks
    return x, mask, ids_restore
