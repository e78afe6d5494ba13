"""Pure, jitted, data-parallel step functions: MAE pretraining, its evaluation, the
classifier's training step and forward pass, and reconstructions for figures.

Each builder returns a function of global arrays (params and optimiser state
replicated, batches sharded on their first axis over the mesh axis `data`); the
per-device body averages gradients and metrics with `lax.pmean`, so 1 device and
N devices compute the same update. A step whose loss or gradient is NaN/inf leaves
the state unchanged and reports `finite=False`. Nothing here reads files, configs
of stages, or any library beyond JAX, flax and optax.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state
from jax import lax

from mae_jax.models import heads
from mae_jax.models import mae as mae_lib
from mae_jax.models import masking
from mae_jax.runtime import parallel
from mae_jax.train import losses

TrainState = train_state.TrainState


class ClassifierState(TrainState):
  """Train state plus the BatchNorm statistics of the classifier's head."""
  batch_stats: Any = flax.struct.field(default_factory=dict)


def keep_if_finite(ok: jax.Array, new: Any, old: Any) -> Any:
  """`new` where `ok`, else `old` (a step with non-finite numbers changes nothing)."""
  return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)


def _apply_averaged(state, grads, loss, **updates):
  """Averages the local gradient and loss over devices, applies the update if finite."""
  grads = lax.pmean(grads, parallel.AXIS)
  loss = lax.pmean(loss, parallel.AXIS)
  grad_norm = optax.tree.norm(grads)
  ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  new_state = keep_if_finite(ok, state.apply_gradients(grads=grads, **updates), state)
  return new_state, {"loss": loss, "grad_norm": grad_norm, "finite": ok}


# --- MAE pretraining ----------------------------------------------------------------


def make_pretrain_step(mae: mae_lib.MAE, loss: losses.Reconstruction,
                       mesh: jax.sharding.Mesh) -> Callable:
  """A jitted data-parallel MAE step: (state, images, key) -> (state, metrics).

  Masking noise is drawn for the whole global batch from `fold_in(key, step)`
  before the per-device split, so masks do not depend on the device count.
  """
  patch = mae.encoder.patch

  def per_device(state: TrainState, images: jax.Array, noise: jax.Array):
    def loss_fn(params):
      out = mae.apply({"params": params}, images, noise)
      return losses.reconstruction_loss(out["logits"], images, out["mask"], patch=patch,
                                        **loss.options())

    value, grads = jax.value_and_grad(loss_fn)(state.params)
    return _apply_averaged(state, grads, value)

  mapped = parallel.data_parallel(per_device, mesh,
                                  in_specs=(parallel.REPLICATED, parallel.BATCH, parallel.BATCH),
                                  out_specs=(parallel.REPLICATED, parallel.REPLICATED))

  @functools.partial(jax.jit, donate_argnums=0)
  def step(state: TrainState, images: jax.Array, key: jax.Array):
    noise = masking.masking_noise(jax.random.fold_in(key, state.step), images.shape[0],
                                  mae.encoder.num_patches)
    return mapped(state, images, noise)

  return step


def make_pretrain_eval(mae: mae_lib.MAE, loss: losses.Reconstruction,
                       mesh: jax.sharding.Mesh) -> Callable:
  """A jitted data-parallel evaluation: (params, images, example mask, key, index) ->
  (loss sum, count), summed over devices; masks are fixed by (key, batch index)."""
  patch = mae.encoder.patch

  def per_device(params, images, example_mask, noise):
    out = mae.apply({"params": params}, images, noise)
    total, count = losses.reconstruction_loss_terms(
        out["logits"], images, out["mask"], patch=patch, example_mask=example_mask,
        **loss.options())
    return lax.psum(total, parallel.AXIS), lax.psum(count, parallel.AXIS)

  mapped = parallel.data_parallel(
      per_device, mesh,
      in_specs=(parallel.REPLICATED, parallel.BATCH, parallel.BATCH, parallel.BATCH),
      out_specs=(parallel.REPLICATED, parallel.REPLICATED))

  @jax.jit
  def evaluate(params, images, example_mask, key, index):
    noise = masking.masking_noise(jax.random.fold_in(key, index), images.shape[0],
                                  mae.encoder.num_patches)
    return mapped(params, images, example_mask, noise)

  return evaluate


def make_reconstruct(mae: mae_lib.MAE, loss: losses.Reconstruction) -> Callable:
  """A jitted (params, images, key) -> dict of image rows for a reconstruction figure:
  the input, the masked input (NaN where removed), the reconstruction, and the
  reconstruction with the visible patches pasted back, each (N, H, W, C)."""
  enc = mae.encoder
  unpatchify = functools.partial(masking.unpatchify, patch=enc.patch, grid=enc.grid,
                                 channels=enc.channels)

  @jax.jit
  def reconstruct(params, images, key):
    noise = masking.masking_noise(key, images.shape[0], enc.num_patches)
    out = mae.apply({"params": params}, images, noise)
    pred = losses.predicted_images(out["logits"], loss.type)
    target = masking.patchify(images, enc.patch)
    if loss.norm_pix:  # back to pixel units with each patch's own statistics
      mean = target.mean(-1, keepdims=True)
      var = target.var(-1, keepdims=True, ddof=1)
      pred = pred * (var + 1e-6) ** 0.5 + mean
    removed = out["mask"][:, :, None] > 0
    return {
        "input": images,
        "masked input": unpatchify(jnp.where(removed, jnp.nan, target)),
        "reconstruction": jnp.clip(unpatchify(pred), 0, 1),
        "+ visible": jnp.clip(unpatchify(jnp.where(removed, pred, target)), 0, 1),
    }

  return reconstruct


# --- Classification -----------------------------------------------------------------


def make_classifier_step(model: heads.Classifier, mesh: jax.sharding.Mesh, *,
                         frozen_encoder: bool, label_smoothing: float = 0.0) -> Callable:
  """A jitted data-parallel step: (state, images, labels, key) -> (state, metrics).

  With `frozen_encoder`, features come from the encoder in inference mode
  outside the differentiated function: no encoder backward pass, and its
  (frozen) params receive exactly zero gradient.
  """
  classes = model.num_classes

  def per_device(state: ClassifierState, images, labels, key):
    rng = jax.random.fold_in(jax.random.fold_in(key, state.step), lax.axis_index(parallel.AXIS))
    targets = optax.smooth_labels(jax.nn.one_hot(labels, classes), label_smoothing)
    if frozen_encoder:
      feats = model.apply({"params": state.params, "batch_stats": state.batch_stats}, images,
                          False, method=heads.Classifier.features)

    def loss_fn(params):
      variables = {"params": params, "batch_stats": state.batch_stats}
      if frozen_encoder:
        logits, updates = model.apply(variables, feats, True, method=heads.Classifier.classify,
                                      mutable=["batch_stats"], rngs={"dropout": rng})
      else:
        out, updates = model.apply(variables, images, True, mutable=["batch_stats"],
                                   rngs={"dropout": rng})
        logits = out["logits"]
      value = optax.softmax_cross_entropy(logits, targets).mean()
      return value, (logits, updates.get("batch_stats", {}))

    (value, (logits, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    new_state, metrics = _apply_averaged(state, grads, value, batch_stats=stats)
    metrics["accuracy"] = lax.pmean(jnp.mean(jnp.argmax(logits, -1) == labels), parallel.AXIS)
    return new_state, metrics

  mapped = parallel.data_parallel(
      per_device, mesh,
      in_specs=(parallel.REPLICATED, parallel.BATCH, parallel.BATCH, parallel.REPLICATED),
      out_specs=(parallel.REPLICATED, parallel.REPLICATED))
  return jax.jit(mapped, donate_argnums=0)


def make_predict(model: heads.Classifier, mesh: jax.sharding.Mesh) -> Callable:
  """A jitted data-parallel forward pass in inference mode: logits of a global batch."""

  def per_device(params, batch_stats, images):
    return model.apply({"params": params, "batch_stats": batch_stats}, images, False)["logits"]

  return jax.jit(parallel.data_parallel(
      per_device, mesh, in_specs=(parallel.REPLICATED, parallel.REPLICATED, parallel.BATCH),
      out_specs=parallel.BATCH))

