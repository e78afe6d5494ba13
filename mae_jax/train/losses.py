"""Reconstruction losses for MAE pretraining (float32 throughout).

Two losses: the seed's BCE-with-logits against [0, 1] pixel values, and the
MAE reference's MSE (optionally against per-patch normalised pixels,
`norm_pix_loss`). Either is averaged over the removed patches (MAE) or over all
patches (the seed's choice). With MSE the target can also be each patch's
high-frequency part (`target='highpass'`): the patch minus a Gaussian blur of itself,
which leaves the lens's smooth light out and keeps the few-pixel detail that
substructure adds (MaskFeat's lesson: high-frequency targets such as HOG make
features of fine detail).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from mae_jax.models import masking

LOSSES = ("bce", "mse")
TARGETS = ("pixels", "highpass")


@dataclasses.dataclass(frozen=True)
class Reconstruction:
  """Which reconstruction loss pretraining minimises (a pretraining config's `loss`)."""
  type: str = "bce"           # 'bce' (the seed) or 'mse' (the MAE reference)
  norm_pix: bool = False      # MAE's norm_pix_loss (with 'mse')
  masked_only: bool = True    # average over removed patches only (MAE), or over all
  target: str = "pixels"      # 'pixels', or 'highpass': each patch minus its own blur ('mse')
  highpass_sigma: float = 1.0  # the blur's Gaussian standard deviation, in pixels

  @classmethod
  def from_config(cls, loss: Any) -> "Reconstruction":
    """From a config's `loss` (anything with `type`, `norm_pix`, `masked_only`, and
    optionally `target`, `highpass_sigma`)."""
    return cls(type=loss.type, norm_pix=bool(loss.norm_pix), masked_only=bool(loss.masked_only),
               target=str(loss.get("target", "pixels")),
               highpass_sigma=float(loss.get("highpass_sigma", 1.0)))

  def options(self) -> dict[str, Any]:
    """The keyword arguments of `reconstruction_loss_terms`."""
    return {"loss": self.type, "norm_pix": self.norm_pix, "masked_only": self.masked_only,
            "target": self.target, "highpass_sigma": self.highpass_sigma}


def gaussian_kernel(sigma: float) -> np.ndarray:
  """A normalised 1-D Gaussian of standard deviation `sigma` pixels, radius ceil(2 sigma)."""
  if sigma <= 0:
    raise ValueError(f"highpass_sigma must be > 0, got {sigma}")
  radius = max(1, math.ceil(2 * sigma))
  x = np.arange(-radius, radius + 1, dtype=np.float64)
  k = np.exp(-0.5 * (x / sigma) ** 2)
  return (k / k.sum()).astype(np.float32)


def patch_blur(patches: jax.Array, patch: int, channels: int, sigma: float) -> jax.Array:
  """Each (patch, patch, C) patch of (N, L, patch*patch*C) blurred with a separable
  Gaussian on its own, its border pixels repeated outward: a patch's blur reads no pixel
  of any other patch."""
  kernel = jnp.asarray(gaussian_kernel(sigma))
  r = (kernel.shape[0] - 1) // 2
  n, length, _ = patches.shape
  x = patches.reshape(n, length, patch, patch, channels)
  for axis in (2, 3):
    pad = [(0, 0)] * 5
    pad[axis] = (r, r)
    padded = jnp.pad(x, pad, mode="edge")
    x = sum(w * lax.slice_in_dim(padded, i, i + patch, axis=axis)
            for i, w in enumerate(kernel))
  return x.reshape(n, length, -1)


def patch_targets(images: jax.Array, patch: int, norm_pix: bool = False,
                  target: str = "pixels", highpass_sigma: float = 1.0) -> jax.Array:
  """Patchified targets: the pixels, or with `target='highpass'` each patch minus its
  own Gaussian blur (`patch_blur`). With `norm_pix`, each patch's target is then
  normalised by its mean and unbiased variance (torch's `var`, as in the MAE reference)
  plus 1e-6."""
  if target not in TARGETS:
    raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
  target_patches = masking.patchify(images.astype(jnp.float32), patch)
  if target == "highpass":
    target_patches = target_patches - patch_blur(target_patches, patch, images.shape[-1],
                                                 highpass_sigma)
  target = target_patches
  if norm_pix:
    mean = target.mean(axis=-1, keepdims=True)
    var = target.var(axis=-1, keepdims=True, ddof=1)
    target = (target - mean) / (var + 1.0e-6) ** 0.5
  return target


def reconstruction_terms_per_row(logits: jax.Array, images: jax.Array, mask: jax.Array, *,
                                 patch: int, loss: str = "bce", norm_pix: bool = False,
                                 masked_only: bool = True, target: str = "pixels",
                                 highpass_sigma: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """(per-patch losses, their weights), each (N, L): weights are the removed patches
  (`masked_only`, MAE) or every patch (the seed's choice).

  Args:
    logits: (N, L, patch*patch*C) decoder outputs (logits for 'bce', values for 'mse').
    images: (N, H, W, C) inputs in [0, 1].
    mask: (N, L), 1 for removed patches.
    patch: patch size.
    loss: 'bce' (BCE with logits, targets in [0, 1]) or 'mse'.
    norm_pix: normalise targets per patch (MAE `norm_pix_loss`; 'mse' only).
    masked_only: average over removed patches only (MAE) instead of all patches.
    target: 'pixels' or 'highpass' (each patch minus its own blur; 'mse' only).
    highpass_sigma: the blur's standard deviation in pixels ('highpass').
  """
  if loss not in LOSSES:
    raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
  if norm_pix and loss == "bce":
    raise ValueError("norm_pix targets are not in [0, 1]: use loss='mse' with norm_pix")
  if target == "highpass" and loss == "bce":
    raise ValueError("highpass targets are not in [0, 1]: use loss='mse' with target='highpass'")
  target = patch_targets(images, patch, norm_pix, target, highpass_sigma)
  logits = logits.astype(jnp.float32)
  if loss == "bce":
    per_patch = optax.sigmoid_binary_cross_entropy(logits, target).mean(axis=-1)
  else:
    per_patch = jnp.square(logits - target).mean(axis=-1)
  weights = mask.astype(jnp.float32) if masked_only else jnp.ones_like(per_patch)
  return per_patch, weights


def reconstruction_loss_terms(logits: jax.Array, images: jax.Array, mask: jax.Array, *,
                              example_mask: jax.Array | None = None,
                              **options) -> tuple[jax.Array, jax.Array]:
  """(sum of per-patch losses, number of patches counted): summed across devices,
  their ratio is the loss of the whole batch, padded examples excluded
  (`example_mask` (N,) bool, False for padding). Options as `reconstruction_terms_per_row`."""
  per_patch, weights = reconstruction_terms_per_row(logits, images, mask, **options)
  if example_mask is not None:
    weights = weights * example_mask.astype(jnp.float32)[:, None]
  return (per_patch * weights).sum(), weights.sum()


def reconstruction_loss(logits: jax.Array, images: jax.Array, mask: jax.Array,
                        **kwargs) -> jax.Array:
  """Mean per-patch reconstruction loss (see `reconstruction_loss_terms`)."""
  total, count = reconstruction_loss_terms(logits, images, mask, **kwargs)
  return total / count


def predicted_images(logits: jax.Array, loss: str) -> jax.Array:
  """Decoder outputs as pixel values: sigmoid for 'bce', identity for 'mse'."""
  return jax.nn.sigmoid(logits) if loss == "bce" else logits
