"""Convolutions written as matrix products, and the per-patch convolutional stem.

XLA's CPU convolution runs ~18x slower inside a loop (a training chunk's `lax.scan`)
than outside it, while its matrix products do not (measured: 3.4 s against 0.19 s per
CNN step), so convolutions here are shifted views and one matmul (`ShiftConv`).

`PatchConvStem` embeds each ViT patch with a small CNN that sees that patch alone:
every patch is treated as its own tiny image, zero-padded at its own border, so no
pixel of one patch reaches another patch's token. That keeps the MAE honest (a
removed patch's pixels cannot leak into a visible token), unlike a convolutional stem
over the whole image, while giving each token the non-linear local features (edges,
curvature, small kinks of an arc) that a linear patch embedding must leave to the
blocks (Xiao et al. 2021, "Early convolutions help transformers see better").
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from mae_jax.models import dense

Dtype = Any
xavier = nn.initializers.xavier_uniform()


class ShiftConv(nn.Module):
  """A `size` x `size` convolution, stride 1, 'SAME' zero padding, no bias: on a CPU the
  input's size^2 shifted views side by side, times a (size, size, C, features) kernel;
  elsewhere XLA's convolution with the same kernel (`dense.cpu_forms`)."""
  features: int
  size: int = 3
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k, (h, w, c) = self.size, x.shape[1:]
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, c, self.features))
    if not dense.cpu_forms():
      return lax.conv_general_dilated(x.astype(self.dtype), kernel.astype(self.dtype), (1, 1),
                                      "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    lo = (k - 1) // 2
    padded = jnp.pad(x, ((0, 0), (lo, k - 1 - lo), (lo, k - 1 - lo), (0, 0)))
    views = jnp.stack([padded[:, i:i + h, j:j + w] for i in range(k) for j in range(k)], -2)
    return jnp.einsum("nhwkc,kcf->nhwf", views,
                      kernel.reshape(k * k, c, self.features).astype(self.dtype))


def space_to_depth(x: jax.Array, block: int) -> jax.Array:
  """(N, H, W, C) -> (N, H/block, W/block, block^2 C): each block x block patch flattened."""
  n, h, w, c = x.shape
  x = x.reshape(n, h // block, block, w // block, block, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(n, h // block, w // block, block * block * c)


STEMS = ("linear", "conv")


class PatchConvStem(nn.Module):
  """Patch tokens from a small CNN run on each patch alone: (N, L, p*p*C) patches
  (`masking.patchify` order) -> (N, L, dim) tokens.

  Per patch: a 3x3 convolution to `width` channels (GELU), a 2x2 stride-2
  space-to-depth with a linear map to 2 `width` (GELU), a 3x3 convolution at 2 `width`
  (GELU), then the flattened map times one matrix to `dim`. Each patch is zero-padded at
  its own border, so a token depends on its own patch's pixels only.
  """
  dim: int
  patch: int
  channels: int = 1
  width: int = 16
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, patches: jax.Array) -> jax.Array:
    p, c = self.patch, self.channels
    if p % 2:
      raise ValueError(f"the convolutional stem needs an even patch size, got {p}")
    n, length, _ = patches.shape
    x = patches.astype(self.dtype).reshape(n * length, p, p, c)
    x = ShiftConv(self.width, 3, self.dtype, name="conv0")(x)
    x = nn.gelu(x + self.param("bias0", nn.initializers.zeros_init(), (self.width,)).astype(
        self.dtype), approximate=False)
    x = space_to_depth(x, 2)
    x = nn.gelu(dense.Dense(2 * self.width, kernel_init=xavier, dtype=self.dtype,
                            name="down")(x), approximate=False)
    x = ShiftConv(2 * self.width, 3, self.dtype, name="conv1")(x)
    x = nn.gelu(x + self.param("bias1", nn.initializers.zeros_init(), (2 * self.width,)).astype(
        self.dtype), approximate=False)
    x = x.reshape(n, length, -1)
    return dense.Dense(self.dim, kernel_init=xavier, dtype=self.dtype, name="proj")(x)
