"""What a pretraining objective answers: the interface steps, validation and export use.

An objective owns everything about what pretraining optimises: how the masking noise
is drawn, what each patch's target is, the loss and which patches it counts, how its
decoder outputs map back to pixels (for figures), the checks of its own config keys,
and what an exporter must say about the decoder's outputs. The step functions, config
validation and the Hugging Face export ask it and know none of its options.
"""

from __future__ import annotations

from typing import Any, Protocol

import jax


class Objective(Protocol):
  """A pretraining objective over the MAE's outputs (see the module docstring)."""

  @property
  def removed_only(self) -> bool:
    """Whether the loss reads the removed patches only (the decoder may skip the rest)."""

  def noise(self, key: jax.Array, batch: int, num_patches: int) -> jax.Array:
    """(batch, num_patches) masking noise for a batch (training, figures)."""

  def example_noise(self, key: jax.Array, examples: jax.Array,
                    num_patches: int) -> jax.Array:
    """(N, num_patches) masking noise fixed per example index (evaluation)."""

  def terms_per_row(self, logits: jax.Array, images: jax.Array, mask: jax.Array,
                    patch: int) -> tuple[jax.Array, jax.Array]:
    """(per-patch losses, their weights), each (N, L)."""

  def loss(self, logits: jax.Array, images: jax.Array, mask: jax.Array,
           patch: int) -> jax.Array:
    """The mean per-patch loss of a batch."""

  def to_pixels(self, logits: jax.Array, images: jax.Array, patch: int) -> jax.Array:
    """(N, L, patch*patch*C) decoder outputs as pixel patches, for figures."""

  def describe(self) -> str:
    """One line for logs and figure titles."""

  def export_fields(self) -> dict[str, Any]:
    """Hugging Face `ViTMAEConfig` fields the objective decides (`norm_pix_loss`)."""

  def export_note(self) -> str:
    """What an exported decoder outputs (Hugging Face's own loss is MSE on pixels)."""

