"""Classification heads and the classifier (the ViT encoder on all patches + a head)."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from mae_jax.models import vit as vit_lib


class MlpHead(nn.Module):
  """The seed's probe head: [Dense, BatchNorm, ReLU, Dropout] per hidden width, then Dense."""
  num_classes: int
  hidden: tuple[int, ...] = (512, 256)
  dropout: float = 0.2
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    for i, width in enumerate(self.hidden):
      x = nn.Dense(width, kernel_init=vit_lib.xavier, name=f"fc{i}")(x)
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                       axis_name=self.bn_axis_name if train else None, name=f"bn{i}")(x)
      x = nn.relu(x)
      x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Dense(self.num_classes, kernel_init=vit_lib.xavier, name="out")(x)


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


POOLS = ("cls", "mean")


def pool_tokens(tokens: jax.Array, pool: str) -> jax.Array:
  """(N, 1 + L, D) tokens -> (N, D): the CLS token, or the mean of the patch tokens."""
  return tokens[:, 0] if pool == "cls" else tokens[:, 1:].mean(axis=1)


def feature_name(block: int, pool: str) -> str:
  """The name of a frozen feature: block index (-1: after the final norm) and pooling."""
  return f"block{block}_{pool}"


@dataclasses.dataclass(frozen=True)
class FeatureChoice:
  """Which frozen feature a classifier reads: the tokens of `block` (-1: after the final
  norm), pooled by `pool` ("cls" or "mean"). A probe chooses it on validation."""
  block: int = -1
  pool: str = "cls"

  @property
  def name(self) -> str:
    return feature_name(self.block, self.pool)


def feature_candidates(depth: int) -> tuple[FeatureChoice, ...]:
  """Every feature `Classifier.feature_bank` computes for an encoder of `depth` blocks:
  each block but the last, and the final normed tokens, each pooled both ways."""
  return tuple(FeatureChoice(block, pool) for block in (*range(depth - 1), -1) for pool in POOLS)


class Classifier(nn.Module):
  """ViT encoder on all patches (no masking) + a classification head.

  `features` and `classify` can be applied separately, so a probe can compute
  frozen features outside the differentiated function. The features are the
  tokens of `feature_block` (-1: the last block, after the final norm; i: block i's
  output), pooled by `pool`.
  """
  vit: vit_lib.ViTConfig
  num_classes: int = 3
  head: str = "mlp"          # 'mlp' (seed) or 'linear' (MAE)
  pool: str = "cls"          # 'cls' token, or 'mean' of patch tokens
  feature_block: int = -1
  head_hidden: tuple[int, ...] = (512, 256)
  dropout: float = 0.2
  drop_path: float = 0.0
  bn_axis_name: str | None = None
  dtype: vit_lib.Dtype = jnp.float32
  frozen_blocks: int = 0     # partial fine-tuning: no gradient below this block (vit.Encoder)

  def setup(self):
    if self.head not in ("mlp", "linear") or self.pool not in POOLS:
      raise ValueError(f"head must be 'mlp' or 'linear' and pool 'cls' or 'mean', got "
                       f"{self.head!r}, {self.pool!r}")
    if not -1 <= self.feature_block < self.vit.depth:
      raise ValueError(f"feature_block={self.feature_block} must be -1 (the last block) or a "
                       f"block index below the depth {self.vit.depth}")
    self.encoder = vit_lib.Encoder(self.vit, drop_path=self.drop_path, dtype=self.dtype,
                                   frozen_blocks=self.frozen_blocks)
    if self.head == "mlp":
      self.classifier = MlpHead(self.num_classes, self.head_hidden, self.dropout,
                                self.bn_axis_name)
    else:
      self.classifier = LinearHead(self.num_classes, self.bn_axis_name)

  def features(self, images: jax.Array, train: bool = False) -> jax.Array:
    if self.feature_block in (-1, self.vit.depth - 1):
      # A CLS feature needs only the CLS token out of the last block.
      tokens, _, _ = self.encoder(images, deterministic=not train, cls_only=self.pool == "cls")
    else:
      _, _, _, blocks = self.encoder(images, deterministic=not train, return_blocks=True)
      tokens = blocks[self.feature_block]
    return pool_tokens(tokens, self.pool).astype(jnp.float32)

  def feature_bank(self, images: jax.Array) -> dict[str, jax.Array]:
    """Every candidate feature of frozen `images` in one pass (inference mode): each
    block's output and the final normed tokens, each pooled both ways."""
    final, _, _, blocks = self.encoder(images, deterministic=True, return_blocks=True)
    tokens = {i: t for i, t in enumerate(blocks[:-1])} | {-1: final}
    return {c.name: pool_tokens(tokens[c.block], c.pool).astype(jnp.float32)
            for c in feature_candidates(len(blocks))}

  def classify(self, features: jax.Array, train: bool = False) -> jax.Array:
    return self.classifier(features, train).astype(jnp.float32)

  def __call__(self, images: jax.Array, train: bool = False) -> dict[str, jax.Array]:
    pre_logits = self.features(images, train)
    return {"logits": self.classify(pre_logits, train), "pre_logits": pre_logits}
