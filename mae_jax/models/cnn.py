"""A small supervised CNN: the ceiling a network trained on every label reaches.

The label-efficiency study reads every AUC against what is reachable on a variant.
A ViT from scratch needs far more labels than a convolutional network to pick up a
few-pixel perturbation of an arc; this network is the stronger supervised reference:
stages of two 3x3 convolutions (BatchNorm, ReLU), halving the resolution between
stages, then a global average pool and the same heads as the ViT classifier. It has the
classifier's interface (`features`, `classify`, `__call__`), its params under
`encoder/` and `classifier/`, so the optimiser groups, steps and stages treat it as
they treat the ViT classifier.

The convolutions are written as shifted views and one matrix product (`convs.ShiftConv`):
XLA's CPU convolution runs ~18x slower inside a loop (the training chunk's `lax.scan`) than
outside it, while its matrix products do not (measured: 3.4 s against 0.19 s per step).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from mae_jax.models import convs
from mae_jax.models import heads as heads_lib
from mae_jax.models import vit as vit_lib


@dataclasses.dataclass(frozen=True)
class CNNConfig:
  """Input size and the channel width of each stage (resolution halves between stages)."""
  image_size: int = 64
  channels: int = 1
  widths: tuple[int, ...] = (16, 32, 64, 128)
  # The stem: a stem x stem convolution of stride `stem` (a learned space-to-depth, lossless
  # for widths[0] >= stem^2 * channels) before the first stage. XLA's CPU convolutions are
  # slow at full resolution and few channels; this keeps the network cheap there.
  stem: int = 2


class ConvEncoder(nn.Module):
  """A strided stem, then stages of [3x3 conv, BatchNorm, ReLU] x 2 with 2x2 average
  pooling between them, then the mean over positions: (N, H, W, C) images ->
  (N, widths[-1]) features."""
  config: CNNConfig
  bn_axis_name: str | None = None
  dtype: vit_lib.Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    x = images.astype(self.dtype)
    stem = self.config.stem
    if stem > 1:   # a stem x stem convolution of stride stem
      x = nn.Dense(self.config.widths[0], dtype=self.dtype, name="stem")(
          convs.space_to_depth(x, stem))
    for i, width in enumerate(self.config.widths):
      if i:
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
      for j in range(2):
        x = convs.ShiftConv(width, 3, dtype=self.dtype, name=f"conv{i}_{j}")(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                         axis_name=self.bn_axis_name if train else None, dtype=jnp.float32,
                         name=f"bn{i}_{j}")(x)
        x = nn.relu(x).astype(self.dtype)
    return x.mean(axis=(1, 2)).astype(jnp.float32)


class CNNClassifier(nn.Module):
  """The CNN encoder + the ViT classifier's head (see `heads.Classifier`)."""
  cnn: CNNConfig
  num_classes: int = 3
  head: str = "mlp"
  head_hidden: tuple[int, ...] = (512, 256)
  dropout: float = 0.2
  bn_axis_name: str | None = None
  dtype: vit_lib.Dtype = jnp.float32

  def setup(self):
    if self.head not in ("mlp", "linear"):
      raise ValueError(f"head must be 'mlp' or 'linear', got {self.head!r}")
    self.encoder = ConvEncoder(self.cnn, self.bn_axis_name, self.dtype)
    if self.head == "mlp":
      self.classifier = heads_lib.MlpHead(self.num_classes, self.head_hidden, self.dropout,
                                          self.bn_axis_name)
    else:
      self.classifier = heads_lib.LinearHead(self.num_classes, self.bn_axis_name)

  def features(self, images: jax.Array, train: bool = False) -> jax.Array:
    return self.encoder(images, train)

  def classify(self, features: jax.Array, train: bool = False) -> jax.Array:
    return self.classifier(features, train).astype(jnp.float32)

  def __call__(self, images: jax.Array, train: bool = False) -> dict[str, jax.Array]:
    pre_logits = self.features(images, train)
    return {"logits": self.classify(pre_logits, train), "pre_logits": pre_logits}
