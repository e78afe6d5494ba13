"""Pure, jitted, data-parallel step functions: MAE pretraining, the classifier, their
evaluation passes, and reconstructions for figures.

Each function is built from a per-device body and mapped over the mesh axis `data`
with `shard_map` (params and optimiser state replicated, examples sharded); bodies
average gradients and metrics with `lax.pmean`, so 1 and N devices compute the same
update from the same global batch. A step whose loss or gradient is NaN/inf leaves
the state unchanged and reports `finite=False`.

Training runs in chunks: `make_chunk` scans `num_steps` steps in one dispatch and
returns each step's metrics, fetched by the loop only when it needs them. Where the
batches come from is a `Feeding`: `device`, the split already in device memory
(each device gathers its rows from the epoch's order), or `host`, the chunk's raw
batches passed in. Either way the step normalises and augments them with
`train.batching`, so a run's batches do not depend on the feed.

Nothing here reads files or imports TensorFlow, clu, matplotlib or scikit-learn.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax.training import train_state
from jax import lax

from mae_jax.models import attention
from mae_jax.models import heads
from mae_jax.models import mae as mae_lib
from mae_jax.models import masking
from mae_jax.objectives import base as objectives
from mae_jax.runtime import parallel
from mae_jax.train import batching

TrainState = train_state.TrainState
SOURCES = ("device", "host")
# A body: (state, inputs (lb, ...), labels (lb,), key, shard, batch) -> (state, metrics).
Body = Callable[..., tuple[Any, dict]]


class ClassifierState(TrainState):
  """Train state plus the BatchNorm statistics of the classifier's head."""
  batch_stats: Any = flax.struct.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Feeding:
  """How a chunk gets its batches, and what the step does to them before the model.

  `source`: 'device' (the split is resident, sharded; rows are gathered in the step)
  or 'host' (the chunk's raw batches arrive as arguments). `images=False` marks
  inputs that are feature vectors (a probe's frozen features): no normalisation
  or augmentation.
  """
  source: str
  local_batch: int
  seed: int
  augmentation: batching.Augment | None = None
  dtype: Any = jnp.float32
  images: bool = True

  def __post_init__(self):
    if self.source not in SOURCES:
      raise ValueError(f"feed source must be one of {SOURCES}, got {self.source!r}")

  def prepare(self, raw: jax.Array, epoch, batch, shard) -> jax.Array:
    if not self.images:
      return raw.astype(jnp.float32)
    return batching.prepare(raw, seed=self.seed, epoch=epoch, batch=batch, shard=shard,
                            augmentation=self.augmentation, dtype=self.dtype)


def compile_with_fallback(make: Callable[[], Callable], args: tuple, what: str) -> Callable:
  """`make()` (a jitted function) for the attention in use. With cuDNN attention it is
  compiled here, on `args` (the call the step makes: its shapes, dtype and sharding);
  where that compile fails, one warning names `what` and the reason, and the function is
  traced again with XLA's attention (`attention.forced`) and compiled. Other
  implementations return the jitted function as it is."""
  if attention.implementation() != "cudnn":
    return make()
  try:
    return make().lower(*args).compile()
  except Exception as e:  # pylint: disable=broad-except
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    logging.warning("%s: cuDNN attention did not compile (%s); using XLA's attention", what,
                    reason)
    with attention.forced("xla"):
      return make().lower(*args).compile()


class FallbackJit:
  """A jitted function compiled on its first call by `compile_with_fallback` (cuDNN
  attention, or XLA's where cuDNN fails to compile); later calls take the same shapes."""

  def __init__(self, make: Callable[[], Callable], what: str):
    self._make, self._what, self._fn = make, what, None

  def __call__(self, *args):
    if self._fn is None:
      self._fn = compile_with_fallback(self._make, args, self._what)
    return self._fn(*args)


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


# --- Bodies: one step on one device's prepared batch ------------------------------------


def global_rows(values: jax.Array, shard: jax.Array, local_batch: int) -> jax.Array:
  """This shard's rows of a quantity drawn for the whole global batch."""
  return lax.dynamic_slice_in_dim(values, shard * local_batch, local_batch)


def micro_batches(local_batch: int, micro_batch: int) -> int:
  """Into how many equal micro-batches a device's batch is cut: the fewest whose size
  divides `local_batch` and is at most `micro_batch` (0, or at least the batch: one)."""
  if micro_batch <= 0 or micro_batch >= local_batch:
    return 1
  return next(k for k in range(2, local_batch + 1)
              if local_batch % k == 0 and local_batch // k <= micro_batch)


def backend_micro_batch(cpu: int, accelerator: int) -> int:
  """The micro-batch size (`pretrain_body`) for the backend JAX runs on."""
  return cpu if jax.default_backend() == "cpu" else accelerator


def accumulated_value_and_grad(loss_fn: Callable, params: Any, batch: tuple,
                               pieces: int) -> tuple[jax.Array, Any]:
  """`jax.value_and_grad(loss_fn)(params, *batch)` for a loss that is a mean over equal
  shares of the examples, computed on `pieces` equal slices of `batch` (leading axis)
  one after another in a `lax.scan` and averaged.

  The same value and gradient (to float rounding) from a working set `pieces` times
  smaller. On a CPU that is most of the gain: XLA allocates a call's working memory
  afresh and the kernel zeroes every page of it at first touch (docs/performance.md;
  measurements in docs/results.md).
  """
  grad_fn = jax.value_and_grad(loss_fn)
  if pieces == 1:
    return grad_fn(params, *batch)
  sliced = jax.tree.map(lambda x: x.reshape(pieces, x.shape[0] // pieces, *x.shape[1:]), batch)

  def add(total, piece):
    return jax.tree.map(jnp.add, total, grad_fn(params, *piece)), None

  zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
  total, _ = lax.scan(add, zeros, sliced)
  return jax.tree.map(lambda t: t / pieces, total)


def pretrain_body(mae: mae_lib.MAE, objective: objectives.Objective, global_batch: int,
                  micro_batch: int = 0) -> Body:
  """One MAE step on `objective`. Masking noise is drawn for the whole global batch from
  `fold_in(key, step)`, then each device takes its rows: masks do not depend on the
  device count. With `micro_batch`, the gradient is accumulated over micro-batches of
  at most that many examples per device (`accumulated_value_and_grad`): every image
  has the same number of masked patches, so the mean of the micro-batches' losses is
  the batch's."""
  patch, num_patches = mae.encoder.patch, mae.encoder.num_patches

  def loss_fn(params, images, noise):
    out = mae.apply({"params": params}, images, noise, objective.removed_only)
    return objective.loss(out["logits"], images, out["mask"], patch)

  def body(state, images, labels, key, shard, batch):
    del labels, batch
    noise = objective.noise(jax.random.fold_in(key, state.step), global_batch, num_patches)
    noise = global_rows(noise, shard, images.shape[0])
    pieces = micro_batches(images.shape[0], micro_batch)
    value, grads = accumulated_value_and_grad(loss_fn, state.params, (images, noise), pieces)
    return _apply_averaged(state, grads, value)

  return body


def classifier_body(model: heads.Classifier, *, frozen_encoder: bool,
                    label_smoothing: float = 0.0, inputs_are_features: bool = False) -> Body:
  """One classifier step. With `frozen_encoder`, features come from the encoder in
  inference mode outside the differentiated function (no encoder backward pass; its
  params get exactly zero gradient); with `inputs_are_features`, the inputs already
  are those features (the probe's cache) and only the head runs."""
  classes = model.num_classes

  def body(state, inputs, labels, key, shard, batch):
    del batch
    rng = jax.random.fold_in(jax.random.fold_in(key, state.step), shard)
    targets = optax.smooth_labels(jax.nn.one_hot(labels, classes), label_smoothing)
    head_only = inputs_are_features or frozen_encoder
    feats = inputs
    if frozen_encoder and not inputs_are_features:
      feats = model.apply({"params": state.params, "batch_stats": state.batch_stats}, inputs,
                          False, method="features")

    def loss_fn(params):
      variables = {"params": params, "batch_stats": state.batch_stats}
      if head_only:
        logits, updates = model.apply(variables, feats, True, method="classify",
                                      mutable=["batch_stats"], rngs={"dropout": rng})
      else:
        out, updates = model.apply(variables, inputs, True, mutable=["batch_stats"],
                                   rngs={"dropout": rng})
        logits = out["logits"]
      value = optax.softmax_cross_entropy(logits, targets).mean()
      return value, (logits, updates.get("batch_stats", {}))

    (value, (logits, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    new_state, metrics = _apply_averaged(state, grads, value, batch_stats=stats)
    metrics["accuracy"] = lax.pmean(jnp.mean(jnp.argmax(logits, -1) == labels), parallel.AXIS)
    return new_state, metrics

  return body


# --- Chunks: several steps per dispatch ---------------------------------------------------


def make_chunk(body: Body, mesh: jax.sharding.Mesh, feeding: Feeding,
               num_steps: int) -> Callable:
  """A jitted chunk of `num_steps` training steps:
  (state, data, epoch, first_batch, key) -> (state, metrics, each with a leading
  `num_steps` axis).

  `data` for a 'device' feed: the resident split, {'x': (D*S, ...), 'y': (D*S,),
  'count': (D,)} sharded over devices (see `data.feeds.DeviceFeed`); for a 'host'
  feed: this chunk's raw batches, {'x': (num_steps, B, ...), 'y': (num_steps, B)}.
  """
  lb = feeding.local_batch

  def per_device(state, data, epoch, first, key):
    shard = lax.axis_index(parallel.AXIS)
    if feeding.source == "device":
      size = data["x"].shape[0]
      order = batching.shard_order(feeding.seed, epoch, shard, data["count"][0], size)

    def one(state, i):
      batch = first + i
      if feeding.source == "device":
        rows = batching.batch_rows(order, batch, lb)
        raw, labels = data["x"][rows], data["y"][rows]
      else:
        raw, labels = data["x"][i], data["y"][i]
      inputs = feeding.prepare(raw, epoch, batch, shard)
      return body(state, inputs, labels, key, shard, batch)

    return lax.scan(one, state, jnp.arange(num_steps))

  batch_spec = parallel.BATCH if feeding.source == "device" else parallel.STACKED
  data_specs = {"x": batch_spec, "y": batch_spec}
  if feeding.source == "device":
    data_specs["count"] = parallel.BATCH
  mapped = parallel.data_parallel(
      per_device, mesh,
      in_specs=(parallel.REPLICATED, data_specs, parallel.REPLICATED, parallel.REPLICATED,
                parallel.REPLICATED),
      out_specs=(parallel.REPLICATED, parallel.REPLICATED))
  return jax.jit(mapped, donate_argnums=0)


def make_pretrain_step(mae: mae_lib.MAE, objective: objectives.Objective,
                       mesh: jax.sharding.Mesh, micro_batch: int = 0) -> Callable:
  """A jitted data-parallel MAE step on a prepared global batch (benchmarks, tests):
  (state, images, key) -> (state, metrics); the same body as a chunk's."""

  @functools.partial(jax.jit, donate_argnums=0)
  def step(state, images, key):
    body = pretrain_body(mae, objective, images.shape[0], micro_batch)

    def per_device(state, images, key):
      return body(state, images, None, key, lax.axis_index(parallel.AXIS), 0)

    return parallel.data_parallel(
        per_device, mesh, in_specs=(parallel.REPLICATED, parallel.BATCH, parallel.REPLICATED),
        out_specs=(parallel.REPLICATED, parallel.REPLICATED))(state, images, key)

  return step


def make_classifier_step(model: heads.Classifier, mesh: jax.sharding.Mesh, *,
                         frozen_encoder: bool, label_smoothing: float = 0.0) -> Callable:
  """A jitted data-parallel classifier step on a prepared global batch:
  (state, images, labels, key) -> (state, metrics); the same body as a chunk's."""
  body = classifier_body(model, frozen_encoder=frozen_encoder, label_smoothing=label_smoothing)

  def per_device(state, images, labels, key):
    return body(state, images, labels, key, lax.axis_index(parallel.AXIS), 0)

  return jax.jit(parallel.data_parallel(
      per_device, mesh,
      in_specs=(parallel.REPLICATED, parallel.BATCH, parallel.BATCH, parallel.REPLICATED),
      out_specs=(parallel.REPLICATED, parallel.REPLICATED)), donate_argnums=0)


# --- Evaluation passes --------------------------------------------------------------------


def make_eval_pass(fn: Callable, mesh: jax.sharding.Mesh, feeding: Feeding,
                   num_batches: int) -> Callable:
  """A jitted pass of `fn(tree, inputs, valid, examples) -> per-row outputs` over
  evaluation batches in the strided shard layout, nothing shuffled or augmented.
  `examples` are the rows' indices in the split (padding rows: past its end), so an
  output keyed by them does not depend on the device count.

  'device' feed: (tree, data) -> outputs of every row of every shard, (D * num_batches
  * lb, ...) sharded; rows past a shard's count are padding (`valid` False). 'host'
  feed: (tree, batch, index) with batch {'x': (B, ...), 'valid': (B,)} the rows of
  evaluation batch `index` -> (B, ...) outputs; the caller loops over batches.
  """
  lb = feeding.local_batch

  def prepare(raw):
    if not feeding.images:
      return raw.astype(jnp.float32)
    return batching.prepare(raw, seed=feeding.seed, epoch=0, batch=0, shard=0,
                            augmentation=None, dtype=feeding.dtype)

  def examples(b, shard):
    shards = lax.psum(1, parallel.AXIS)
    return (b * lb + jnp.arange(lb)) * shards + shard

  if feeding.source == "device":
    def per_device(tree, data):
      shard = lax.axis_index(parallel.AXIS)
      size = data["x"].shape[0]

      def one(_, b):
        rows = b * lb + jnp.arange(lb)
        valid = rows < data["count"][0]
        raw = data["x"][jnp.minimum(rows, size - 1)]
        return None, fn(tree, prepare(raw), valid, examples(b, shard))

      _, out = lax.scan(one, None, jnp.arange(num_batches))
      return jax.tree.map(lambda a: a.reshape(num_batches * lb, *a.shape[2:]), out)

    mapped = parallel.data_parallel(
        per_device, mesh, in_specs=(parallel.REPLICATED, {"x": parallel.BATCH,
                                                            "count": parallel.BATCH}),
        out_specs=parallel.BATCH)
    return jax.jit(lambda tree, data: mapped(tree, {"x": data["x"], "count": data["count"]}))

  def per_device_host(tree, batch, index):
    shard = lax.axis_index(parallel.AXIS)
    return fn(tree, prepare(batch["x"]), batch["valid"], examples(index, shard))

  mapped = parallel.data_parallel(
      per_device_host, mesh,
      in_specs=(parallel.REPLICATED, {"x": parallel.BATCH, "valid": parallel.BATCH},
                parallel.REPLICATED),
      out_specs=parallel.BATCH)
  return jax.jit(mapped)


def pretrain_eval_fn(mae: mae_lib.MAE, objective: objectives.Objective,
                     key: jax.Array) -> Callable:
  """Per-row (loss sum, patches counted) of the MAE on an evaluation batch; each
  example's mask is fixed by (key, its index in the split)."""
  patch, num_patches = mae.encoder.patch, mae.encoder.num_patches

  def fn(params, images, valid, examples):
    noise = objective.example_noise(key, examples, num_patches)
    out = mae.apply({"params": params}, images, noise, objective.removed_only)
    per_patch, weights = objective.terms_per_row(out["logits"], images, out["mask"], patch)
    weights = weights * valid[:, None]
    return {"loss": (per_patch * weights).sum(-1), "count": weights.sum(-1)}

  return fn


def logits_fn(model: heads.Classifier, inputs_are_features: bool = False) -> Callable:
  """Per-row logits of the classifier in inference mode (tree: params, batch_stats)."""

  def fn(tree, inputs, valid, examples):
    del valid, examples
    variables = {"params": tree["params"], "batch_stats": tree["batch_stats"]}
    if inputs_are_features:
      return model.apply(variables, inputs, False, method="classify")
    return model.apply(variables, inputs, False)["logits"]

  return fn


def feature_bank_fn(model: heads.Classifier) -> Callable:
  """Per-row candidate features (every block, both poolings) of a frozen encoder."""

  def fn(tree, images, valid, examples):
    del valid, examples
    variables = {"params": tree["params"], "batch_stats": tree["batch_stats"]}
    return model.apply(variables, images, method="feature_bank")

  return fn


def make_predict(model: heads.Classifier, mesh: jax.sharding.Mesh) -> Callable:
  """A jitted data-parallel forward pass in inference mode: logits of a prepared global
  batch."""

  def per_device(params, batch_stats, images):
    return model.apply({"params": params, "batch_stats": batch_stats}, images, False)["logits"]

  return jax.jit(parallel.data_parallel(
      per_device, mesh, in_specs=(parallel.REPLICATED, parallel.REPLICATED, parallel.BATCH),
      out_specs=parallel.BATCH))


RECONSTRUCTION_ROWS = ("input", "masked input", "reconstruction", "+ visible")


def make_reconstruct(mae: mae_lib.MAE, objective: objectives.Objective) -> Callable:
  """A jitted (params, images, key) -> dict of image rows for a reconstruction figure:
  the input, the masked input (NaN where removed), the reconstruction, and the
  reconstruction with the visible patches pasted back, each (N, H, W, C)."""
  enc = mae.encoder
  unpatchify = functools.partial(masking.unpatchify, patch=enc.patch, grid=enc.grid,
                                 channels=enc.channels)

  @jax.jit
  def reconstruct(params, images, key):
    noise = objective.noise(key, images.shape[0], enc.num_patches)
    out = mae.apply({"params": params}, images, noise)
    pred = objective.to_pixels(out["logits"], images, enc.patch)
    target = masking.patchify(images, enc.patch)
    removed = out["mask"][:, :, None] > 0
    return {
        "input": images,
        "masked input": unpatchify(jnp.where(removed, jnp.nan, target)),
        "reconstruction": jnp.clip(unpatchify(pred), 0, 1),
        "+ visible": jnp.clip(unpatchify(jnp.where(removed, pred, target)), 0, 1),
    }

  return reconstruct


def canonical_rows(out: np.ndarray, shards: int, num_examples: int) -> np.ndarray:
  """Host rows of an evaluation pass (D shards of equal length, strided layout) back in
  the split's canonical order: example i is row i div D of shard i mod D."""
  out = np.asarray(out)
  per_shard = out.reshape(shards, -1, *out.shape[1:])
  return np.swapaxes(per_shard, 0, 1).reshape(-1, *out.shape[1:])[:num_examples]
