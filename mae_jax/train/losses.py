"""Reconstruction losses for MAE pretraining (float32 throughout).

Two targets: the seed's BCE-with-logits against [0, 1] pixel values, and the
MAE reference's MSE (optionally against per-patch normalised pixels,
`norm_pix_loss`). Either is averaged over the removed patches (MAE) or over all
patches (the seed's choice).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from mae_jax.models import masking

LOSSES = ("bce", "mse")


@dataclasses.dataclass(frozen=True)
class Reconstruction:
  """Which reconstruction loss pretraining minimises (a pretraining config's `loss`)."""
  type: str = "bce"           # 'bce' (the seed) or 'mse' (the MAE reference)
  norm_pix: bool = False      # MAE's norm_pix_loss (with 'mse')
  masked_only: bool = True    # average over removed patches only (MAE), or over all

  @classmethod
  def from_config(cls, loss: Any) -> "Reconstruction":
    """From a config's `loss` (anything with `type`, `norm_pix`, `masked_only`)."""
    return cls(type=loss.type, norm_pix=bool(loss.norm_pix), masked_only=bool(loss.masked_only))

  def options(self) -> dict[str, Any]:
    """The keyword arguments of `reconstruction_loss_terms`."""
    return {"loss": self.type, "norm_pix": self.norm_pix, "masked_only": self.masked_only}


def patch_targets(images: jax.Array, patch: int, norm_pix: bool = False) -> jax.Array:
  """Patchified targets; with `norm_pix`, each patch normalised by its mean and
  unbiased variance (torch's `var`, as in the MAE reference) plus 1e-6."""
  target = masking.patchify(images.astype(jnp.float32), patch)
  if norm_pix:
    mean = target.mean(axis=-1, keepdims=True)
    var = target.var(axis=-1, keepdims=True, ddof=1)
    target = (target - mean) / (var + 1.0e-6) ** 0.5
  return target


def reconstruction_terms_per_row(logits: jax.Array, images: jax.Array, mask: jax.Array, *,
                                 patch: int, loss: str = "bce", norm_pix: bool = False,
                                 masked_only: bool = True) -> tuple[jax.Array, jax.Array]:
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
  """
  if loss not in LOSSES:
    raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
  if norm_pix and loss == "bce":
    raise ValueError("norm_pix targets are not in [0, 1]: use loss='mse' with norm_pix")
  target = patch_targets(images, patch, norm_pix)
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
