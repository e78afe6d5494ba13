"""From a `model` config to a linen module and its initial parameters.

The one place that reads model configs: the stages, the weight import and the
tests build every model here.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from mae_jax.models import cnn
from mae_jax.models import convs
from mae_jax.models import heads
from mae_jax.models import mae as mae_lib
from mae_jax.models import masking
from mae_jax.models import vit

DTYPES = ("auto", "float32", "bfloat16")
# 'auto': bfloat16 where the backend's matrix units want it (GPU, TPU), float32 on a CPU.
ACCELERATED_BACKENDS = ("gpu", "tpu")
# Classifier architectures: the ViT encoder (pretrained by the MAE, or from scratch) or
# the small supervised CNN (`models/cnn.py`, always from scratch).
ARCHS = ("vit", "cnn")
# The model config keys that fix the encoder's parameters and function: a stage that
# starts from another stage's checkpoint must agree with it on each.
ENCODER_KEYS = ("image_size", "channels", "patch", "dim", "depth", "heads", "mlp_ratio", "stem",
                "stem_width")


# Each architecture's own model keys: a config carries those of its architecture only.
ARCH_KEYS = {"vit": ("patch", "dim", "depth", "heads"), "cnn": ("cnn_widths", "cnn_stem")}


def problems(model: Any) -> list[str]:
  """Problems of a config's `model` keys, one line each."""
  arch = model.get("arch", "vit")
  if arch not in ARCHS:
    return [f"model.arch={arch!r} must be one of {', '.join(ARCHS)}"]
  lacking = [k for k in ARCH_KEYS[arch] if k not in model]
  if lacking:
    return [f"model.arch={arch!r} comes with its own keys ({', '.join(ARCH_KEYS[arch])}), which "
            f"this config lacks: choose the architecture in the config argument, "
            f"--config=configs/finetune.py:PRESET,arch={arch}"]
  found = []
  get = model.get
  if get("image_size") and get("patch") and model.image_size % model.patch:
    found.append(f"model.image_size={model.image_size} is not divisible by "
                 f"model.patch={model.patch}")
  for dim, heads in (("dim", "heads"), ("decoder_dim", "decoder_heads")):
    if get(dim) and get(heads) and model[dim] % model[heads]:
      found.append(f"model.{dim}={model[dim]} is not divisible by model.{heads}={model[heads]}")
  if "mask_ratio" in model and not 0.0 <= model.mask_ratio < 1.0:
    found.append(f"model.mask_ratio={model.mask_ratio} must lie in [0, 1)")
  if "dtype" in model and model.dtype not in DTYPES:
    found.append(f"model.dtype={model.dtype!r} must be one of {', '.join(DTYPES)}")
  if get("stem", "linear") not in convs.STEMS:
    found.append(f"model.stem={model.stem!r} must be one of {', '.join(convs.STEMS)}")
  elif get("stem") == "conv" and get("patch") and model.patch % 2:
    found.append(f"model.stem='conv' needs an even model.patch, got {model.patch}")
  if "stem_width" in model and (not isinstance(model.stem_width, int) or model.stem_width < 1):
    found.append(f"model.stem_width={model.stem_width!r} must be a whole number >= 1")
  if get("arch") == "cnn" and (not get("cnn_widths") or any(
      not isinstance(w, int) or w < 1 for w in model.cnn_widths)
      or 2 ** (len(model.cnn_widths) - 1) > model.image_size):
    found.append(f"model.cnn_widths={get('cnn_widths')} must be positive channel counts, "
                 f"at most {model.image_size.bit_length()} stages (each halves the image)")
  return found




def dtype_of(name: str, backend: str | None = None) -> jnp.dtype:
  """The compute dtype named by `model.dtype`; 'auto' is bfloat16 on a GPU or TPU
  `backend` (default: JAX's), float32 elsewhere. Params, optimiser state, losses and
  softmax statistics stay float32 whatever it is."""
  if name not in DTYPES:
    raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
  if name == "auto":
    backend = backend or jax.default_backend()
    return jnp.dtype("bfloat16" if backend in ACCELERATED_BACKENDS else "float32")
  return jnp.dtype(name)


def describe_dtype(name: str) -> str:
  """What `model.dtype` resolves to here, for the log: 'bfloat16 (model.dtype='auto' on gpu)'."""
  resolved = dtype_of(name).name
  return resolved if name == resolved else \
      f"{resolved} (model.dtype={name!r} on the {jax.default_backend()} backend)"


def vit_config(model: ml_collections.ConfigDict) -> vit.ViTConfig:
  """The encoder sizes of a `model` config."""
  if model.image_size % model.patch:
    raise ValueError(f"image size {model.image_size} is not divisible by patch {model.patch}")
  return vit.ViTConfig(image_size=model.image_size, channels=model.channels,
                       patch=model.patch, dim=model.dim, depth=model.depth,
                       heads=model.heads, mlp_ratio=model.mlp_ratio,
                       stem=model.get("stem", "linear"), stem_width=model.get("stem_width", 16))


def build_mae(model: ml_collections.ConfigDict) -> mae_lib.MAE:
  """The MAE described by a pretraining `model` config."""
  masking.num_kept(1, model.mask_ratio)  # validates the ratio
  return mae_lib.MAE(
      encoder=vit_config(model),
      decoder=mae_lib.DecoderConfig(dim=model.decoder_dim, depth=model.decoder_depth,
                                    heads=model.decoder_heads, mlp_ratio=model.mlp_ratio),
      mask_ratio=model.mask_ratio, dtype=dtype_of(model.dtype))


def init_mae(mae: mae_lib.MAE, key: jax.Array) -> Any:
  """Float32 parameters of `mae` from `key`."""
  enc = mae.encoder
  images = jnp.zeros((1, enc.image_size, enc.image_size, enc.channels), jnp.float32)
  noise = jnp.zeros((1, enc.num_patches), jnp.float32)
  return jax.jit(mae.init)(key, images, noise)["params"]


def build_encoder_features(model: ml_collections.ConfigDict) -> heads.Classifier:
  """A classifier around the encoder of a pretraining `model` config whose only use is
  `feature_bank` (its head is never built): it reads `{"encoder": mae_params["encoder"]}`."""
  return heads.Classifier(vit=vit_config(model), head="linear", dtype=dtype_of(model.dtype))


def build_classifier(model: ml_collections.ConfigDict, num_classes: int,
                     bn_axis_name: str | None = None,
                     feature: heads.FeatureChoice | None = None, frozen_blocks: int = 0
                     ) -> heads.Classifier | cnn.CNNClassifier:
  """The classifier of a probe / fine-tune `model` config, with `num_classes` logits:
  the ViT classifier, or with `model.arch='cnn'` the small CNN.

  `bn_axis_name` names the mesh axis over which the BatchNorms average their batch
  statistics in training (the data-parallel axis). `feature`, when given, is the frozen
  feature the ViT classifier reads instead of `model.feature_block` and `model.pool`
  (a probe's choice on validation). `frozen_blocks`: partial fine-tuning, no gradient
  into the patch embedding and the encoder's first this many blocks.
  """
  arch = model.get("arch", "vit")
  if arch not in ARCHS:
    raise ValueError(f"model.arch must be one of {', '.join(ARCHS)}, got {arch!r}")
  if arch == "cnn":
    return cnn.CNNClassifier(
        cnn=cnn.CNNConfig(image_size=model.image_size, channels=model.channels,
                          widths=tuple(model.cnn_widths), stem=model.cnn_stem),
        num_classes=num_classes, head=model.head, head_hidden=tuple(model.head_hidden),
        dropout=model.dropout, bn_axis_name=bn_axis_name, dtype=dtype_of(model.dtype))
  feature = feature or heads.FeatureChoice(model.get("feature_block", -1), model.pool)
  return heads.Classifier(
      vit=vit_config(model), num_classes=num_classes, head=model.head, pool=feature.pool,
      feature_block=feature.block,
      head_hidden=tuple(model.head_hidden), dropout=model.dropout, drop_path=model.drop_path,
      bn_axis_name=bn_axis_name, dtype=dtype_of(model.dtype), frozen_blocks=frozen_blocks)


def init_classifier(model: heads.Classifier | cnn.CNNClassifier,
                    key: jax.Array) -> tuple[Any, Any]:
  """(params, batch_stats) of `model` from `key`."""
  enc = model.cnn if isinstance(model, cnn.CNNClassifier) else model.vit
  images = jnp.zeros((2, enc.image_size, enc.image_size, enc.channels), jnp.float32)
  variables = jax.jit(functools.partial(model.init, train=False))(key, images)
  return variables["params"], variables.get("batch_stats", {})
