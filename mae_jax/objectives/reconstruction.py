"""The MAE objective: reconstruct masked patches (a pretraining config's `loss` keys).

Masking: per-sample uniform noise, the `int(L * (1 - ratio))` patches of lowest noise
kept (`models.masking.random_masking` does the mechanics; the noise is drawn here, for a
training batch from one key, for evaluation from each example's index so a mask does not
depend on the batch layout).

Targets (`loss.target`), one function each in `TARGETS`:
- `pixels`: the patch's [0, 1] pixels;
- `highpass`: each patch minus its own Gaussian blur of `highpass_sigma` pixels (the
  blur reads no other patch): the lens's smooth light left out, the few-pixel detail
  substructure adds kept (MaskFeat's lesson: high-frequency targets make features of
  fine detail; docs/substructure.md).
With `loss.norm_pix` each patch's target is then normalised by its mean and unbiased
variance (MAE's `norm_pix_loss`).

Losses (`loss.type`): `bce` (BCE-with-logits against [0, 1] pixels, the seed's) or `mse`
(the MAE reference's), averaged over the removed patches (`loss.masked_only`, MAE) or
over every patch (the seed's choice). Everything is float32.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from mae_jax.models import masking

LOSSES = ("bce", "mse")


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


def _pixels(patches: jax.Array, patch: int, channels: int, sigma: float) -> jax.Array:
  del patch, channels, sigma
  return patches


def _highpass(patches: jax.Array, patch: int, channels: int, sigma: float) -> jax.Array:
  return patches - patch_blur(patches, patch, channels, sigma)


# Target name -> (pixel patches, patch, channels, highpass_sigma) -> target patches.
TARGETS: dict[str, Callable[..., jax.Array]] = {"pixels": _pixels, "highpass": _highpass}
# What an exported decoder outputs, per target (before norm_pix).
_TARGET_NOTES = {"pixels": "pixels",
                 "highpass": "each patch minus its own Gaussian blur (sigma {sigma} px)"}


def problems(loss: Any, model: Any) -> list[str]:
  """Problems of a pretraining config's `loss` keys (given its `model` keys), one line each."""
  if not loss:
    return []
  found = []
  if loss.get("type") not in LOSSES:
    found.append(f"loss.type={loss.get('type')!r} must be one of {', '.join(LOSSES)}")
  target = loss.get("target", "pixels")
  if target not in TARGETS:
    found.append(f"loss.target={target!r} must be one of {', '.join(TARGETS)}")
  if loss.get("type") == "bce" and (loss.get("norm_pix") or target != "pixels"):
    what = "loss.norm_pix=True" if loss.get("norm_pix") else f"loss.target={target!r}"
    found.append(f"{what} makes targets outside [0, 1], which BCE cannot score: set "
                 "loss.type='mse'")
  sigma = loss.get("highpass_sigma", 1.0)
  if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or sigma <= 0:
    found.append(f"loss.highpass_sigma={sigma!r} must be a number of pixels > 0")
  ratio = (model or {}).get("mask_ratio")
  if loss.get("masked_only") and ratio is not None and 0.0 <= ratio < 1.0 and model.get("patch"):
    num_patches = (model["image_size"] // model["patch"]) ** 2
    if num_patches and masking.num_kept(num_patches, ratio) == num_patches:
      found.append(f"model.mask_ratio={ratio} removes no patch of {num_patches}, so "
                   "loss.masked_only=True has nothing to score; raise the ratio or set "
                   "loss.masked_only=False")
  return found


@dataclasses.dataclass(frozen=True)
class Reconstruction:
  """The MAE reconstruction objective with a config's `loss` options."""
  type: str = "bce"           # 'bce' (the seed) or 'mse' (the MAE reference)
  norm_pix: bool = False      # MAE's norm_pix_loss (with 'mse')
  masked_only: bool = True    # average over removed patches only (MAE), or over all
  target: str = "pixels"      # a name in TARGETS
  highpass_sigma: float = 1.0  # the blur's Gaussian standard deviation, in pixels

  def __post_init__(self):
    found = problems(dataclasses.asdict(self), None)
    if found:
      raise ValueError("; ".join(found))

  @classmethod
  def from_config(cls, loss: Any) -> "Reconstruction":
    """From a config's `loss` (a ConfigDict or a saved dict); missing keys take the
    defaults above (configs saved before the key existed)."""
    defaults = cls.__dataclass_fields__
    get = lambda k: loss.get(k, defaults[k].default)  # pylint: disable=unnecessary-lambda-assignment
    return cls(type=str(get("type")), norm_pix=bool(get("norm_pix")),
               masked_only=bool(get("masked_only")), target=str(get("target")),
               highpass_sigma=float(get("highpass_sigma")))

  @property
  def removed_only(self) -> bool:
    return self.masked_only

  # --- Masking -------------------------------------------------------------------------

  def noise(self, key: jax.Array, batch: int, num_patches: int) -> jax.Array:
    """Uniform noise for a batch, one row per example (training draws it for the whole
    global batch, so masks do not depend on the device count)."""
    return jax.random.uniform(key, (batch, num_patches))

  def example_noise(self, key: jax.Array, examples: jax.Array,
                    num_patches: int) -> jax.Array:
    """Uniform noise fixed by (key, each example's index in its split)."""
    return jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(key, i),
                                                 (num_patches,)))(examples)

  # --- Targets and loss ----------------------------------------------------------------

  def _base_targets(self, images: jax.Array, patch: int) -> jax.Array:
    """The target before norm_pix: `TARGETS[target]` of the pixel patches."""
    pixels = masking.patchify(images.astype(jnp.float32), patch)
    return TARGETS[self.target](pixels, patch, images.shape[-1], self.highpass_sigma)

  def targets(self, images: jax.Array, patch: int) -> jax.Array:
    """(N, L, patch*patch*C) targets of (N, H, W, C) images in [0, 1]. With `norm_pix`,
    each patch's target is normalised by its mean and unbiased variance (torch's `var`,
    as in the MAE reference) plus 1e-6."""
    target = self._base_targets(images, patch)
    if self.norm_pix:
      mean = target.mean(axis=-1, keepdims=True)
      var = target.var(axis=-1, keepdims=True, ddof=1)
      target = (target - mean) / (var + 1.0e-6) ** 0.5
    return target

  def terms_per_row(self, logits: jax.Array, images: jax.Array, mask: jax.Array,
                    patch: int) -> tuple[jax.Array, jax.Array]:
    """(per-patch losses, their weights), each (N, L): weights are the removed patches
    (`masked_only`) or every patch.

    Args:
      logits: (N, L, patch*patch*C) decoder outputs (logits for 'bce', values for 'mse').
      images: (N, H, W, C) inputs in [0, 1].
      mask: (N, L), 1 for removed patches.
      patch: patch size.
    """
    target = self.targets(images, patch)
    logits = logits.astype(jnp.float32)
    if self.type == "bce":
      per_patch = optax.sigmoid_binary_cross_entropy(logits, target).mean(axis=-1)
    else:
      per_patch = jnp.square(logits - target).mean(axis=-1)
    weights = mask.astype(jnp.float32) if self.masked_only else jnp.ones_like(per_patch)
    return per_patch, weights

  def loss_terms(self, logits: jax.Array, images: jax.Array, mask: jax.Array, patch: int,
                 example_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(sum of per-patch losses, number of patches counted): summed across devices,
    their ratio is the loss of the whole batch, padded examples excluded
    (`example_mask` (N,) bool, False for padding)."""
    per_patch, weights = self.terms_per_row(logits, images, mask, patch)
    if example_mask is not None:
      weights = weights * example_mask.astype(jnp.float32)[:, None]
    return (per_patch * weights).sum(), weights.sum()

  def loss(self, logits: jax.Array, images: jax.Array, mask: jax.Array,
           patch: int) -> jax.Array:
    """The mean per-patch loss (`loss_terms`)."""
    total, count = self.loss_terms(logits, images, mask, patch)
    return total / count

  # --- What the outputs are ------------------------------------------------------------

  def to_pixels(self, logits: jax.Array, images: jax.Array, patch: int) -> jax.Array:
    """Decoder outputs as pixel patches: a sigmoid for 'bce'; with norm_pix back to the
    target's units with each patch's own statistics; the high-pass target plus each
    patch's own blur."""
    pred = jax.nn.sigmoid(logits) if self.type == "bce" else logits
    pixels = masking.patchify(images, patch)
    base = self._base_targets(images, patch)
    if self.norm_pix:
      mean = base.mean(-1, keepdims=True)
      var = base.var(-1, keepdims=True, ddof=1)
      pred = pred * (var + 1e-6) ** 0.5 + mean
    return pred + (pixels - base)

  def describe(self) -> str:
    where = "the removed patches" if self.masked_only else "every patch"
    return (f"{self.type.upper()} on the {self.target} of {where}"
            + (", normalised per patch" if self.norm_pix else ""))

  def export_fields(self) -> dict[str, Any]:
    return {"norm_pix_loss": self.norm_pix and self.type == "mse"}

  def export_note(self) -> str:
    if self.type == "bce":
      return "decoder outputs are logits of [0, 1] pixels (apply a sigmoid)"
    note = "decoder outputs are " + _TARGET_NOTES[self.target].format(sigma=self.highpass_sigma)
    note += ", normalised per patch" if self.norm_pix else ""
    if self.target != "pixels":
      note += "; transformers' loss (MSE on pixels) does not score them"
    return note
