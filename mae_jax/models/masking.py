"""Patches, fixed 2-D sin-cos position embeddings and MAE random masking (the
mechanics; how the noise is drawn is the pretraining objective's, `mae_jax.objectives`).

Conventions follow the MAE reference (facebookresearch/mae): patches are
flattened as (patch row, patch col, channel), position embeddings are the
concatenation [embed(h), embed(w)] of 1-D [sin, cos] embeddings with a zero row
for the CLS token, and masking keeps the `int(L * (1 - ratio))` patches of
lowest noise.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def patchify(images: jax.Array, patch: int) -> jax.Array:
  """(N, H, W, C) images -> (N, L, patch*patch*C) patches, row-major patch order."""
  n, h, w, c = images.shape
  if h % patch or w % patch:
    raise ValueError(f"image size {h}x{w} is not divisible by the patch size {patch}")
  x = images.reshape(n, h // patch, patch, w // patch, patch, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(n, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(patches: jax.Array, patch: int, grid: tuple[int, int], channels: int) -> jax.Array:
  """Inverse of `patchify`: (N, L, patch*patch*C) -> (N, H, W, C)."""
  n = patches.shape[0]
  gh, gw = grid
  x = patches.reshape(n, gh, gw, patch, patch, channels)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(n, gh * patch, gw * patch, channels)


def _sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
  if dim % 2:
    raise ValueError(f"sin-cos embedding needs an even dimension, got {dim}")
  omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
  omega = 1.0 / 10000**omega
  out = np.einsum("m,d->md", positions.reshape(-1).astype(np.float64), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_pos_embed(dim: int, grid: tuple[int, int], cls_token: bool = True) -> np.ndarray:
  """Fixed 2-D sin-cos position embeddings, (L [+1], dim) float32 (MAE formula)."""
  if dim % 4:
    raise ValueError(f"2-D sin-cos embedding needs a dimension divisible by 4, got {dim}")
  gh, gw = grid
  # As in MAE's get_2d_sincos_pos_embed: meshgrid(w, h), whose first array (the
  # column index) fills the first half of each embedding, the row index the second.
  cols, rows = np.meshgrid(np.arange(gw, dtype=np.float64), np.arange(gh, dtype=np.float64))
  emb = np.concatenate([_sincos_1d(dim // 2, cols), _sincos_1d(dim // 2, rows)], axis=1)
  if cls_token:
    emb = np.concatenate([np.zeros((1, dim)), emb], axis=0)
  return emb.astype(np.float32)


def num_kept(num_patches: int, mask_ratio: float) -> int:
  """How many patches MAE keeps visible: int(L * (1 - ratio))."""
  if not 0.0 <= mask_ratio < 1.0:
    raise ValueError(f"mask_ratio must lie in [0, 1), got {mask_ratio}")
  return int(num_patches * (1 - mask_ratio))


def random_masking(x: jax.Array, noise: jax.Array,
                   mask_ratio: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  """MAE per-sample random masking driven by explicit `noise` (N, L).

  Returns:
    x_kept: (N, K, D) the kept tokens, in order of increasing noise.
    mask: (N, L) float, 1 for removed patches, 0 for kept ones (original order).
    ids_restore: (N, L) int, argsort of the shuffle: un-shuffles decoder tokens.
  """
  n, length, _ = x.shape
  keep = num_kept(length, mask_ratio)
  ids_shuffle = jnp.argsort(noise, axis=1)
  ids_restore = jnp.argsort(ids_shuffle, axis=1)
  ids_keep = ids_shuffle[:, :keep]
  x_kept = jnp.take_along_axis(x, ids_keep[:, :, None], axis=1)
  mask = jnp.ones((n, length), x.dtype).at[:, :keep].set(0)
  mask = jnp.take_along_axis(mask, ids_restore, axis=1)
  return x_kept, mask, ids_restore

