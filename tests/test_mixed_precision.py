"""model.dtype='bfloat16': bfloat16 compute, float32 params, optimiser state and losses, and
the tiny pretrain and fine-tune runs still learn."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import finetune as finetune_config
from configs import pipeline as pipeline_config
from configs import pretrain as pretrain_config
from configs import probe as probe_config
from configs import study as study_config
from mae_jax.models import build
from mae_jax.runtime import parallel
from mae_jax.stages import pretrain as pretrain_stage
from mae_jax.train import batching
from mae_jax import objectives
from mae_jax.train import optim
from mae_jax.train import steps
from tests import conftest
from tests.conftest import write_folder


def _float_leaves(tree) -> list[jax.Array]:
  return [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]


def _assert_float32(state) -> None:
  params, opt = _float_leaves(state.params), _float_leaves(state.opt_state)
  assert params and opt
  assert {x.dtype for x in params + opt} == {jnp.dtype(jnp.float32)}


def _images(n: int, seed: int = 0) -> np.ndarray:
  """Learnable images: smooth ramps of random direction and offset, in [0, 1]."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:64, 0:64] / 63.0
  a, b, c = rng.uniform(-0.5, 0.5, (3, n, 1, 1))
  return np.clip(0.5 + a * xx + b * yy + c, 0, 1)[..., None].astype(np.float32)


def _pretrain(dtype: str, num_steps: int = 40):
  config = pretrain_config.get_config("tiny")
  config.model.dtype = dtype
  mae = build.build_mae(config.model)
  params = build.init_mae(mae, jax.random.key(0))
  tx, _ = optim.adamw(params, optim.AdamWSettings.from_config(config.optim), total_steps=num_steps,
                      steps_per_epoch=num_steps // 2)
  mesh = parallel.make_mesh()
  state = parallel.replicate(steps.TrainState.create(apply_fn=mae.apply, params=params, tx=tx),
                             mesh)
  step = steps.make_pretrain_step(mae, objectives.from_config(config.loss), mesh)
  images = parallel.global_batch({"image": _images(8)}, mesh)["image"]
  key = jax.random.key(1)
  hlo = step.lower(state, images, key).as_text()
  history = []
  for _ in range(num_steps):
    state, metrics = step(state, images, key)
    assert bool(metrics["finite"])
    history.append(float(metrics["loss"]))
  return mae, params, images, state, history, hlo


@pytest.mark.slow
def test_bfloat16_pretrain_computes_in_bfloat16_and_learns():
  mae, params, images, state, losses, hlo = _pretrain("bfloat16")
  assert "bf16" in hlo   # the matmuls really run in bfloat16
  out = mae.apply({"params": params}, images[:1], jnp.zeros((1, mae.encoder.num_patches)))
  assert out["logits"].dtype == jnp.float32 and out["latent"].dtype == jnp.bfloat16
  # BCE against [0, 1] pixels has an entropy floor (~0.64 here); the loss must fall
  # clearly (step-to-step noise is ~1e-3) and as far as the same run in float32.
  _, _, _, _, losses32, hlo32 = _pretrain("float32")
  assert "bf16" not in hlo32
  assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.04, losses
  assert abs(np.mean(losses[-5:]) - np.mean(losses32[-5:])) < 0.01, (losses, losses32)
  _assert_float32(state)


def test_bfloat16_finetune_learns_with_float32_state():
  model, params, stats, tx = conftest.bfloat16_classifier(40, 20, 12)
  mesh = parallel.make_mesh()
  state = parallel.replicate(steps.ClassifierState.create(
      apply_fn=model.apply, params=params, tx=tx, batch_stats=stats), mesh)
  step = steps.make_classifier_step(model, mesh, frozen_encoder=False)
  # Label = which third of the brightness range the image's mean falls in: learnable.
  images = _images(12, seed=1)
  labels = np.digitize(images.mean(axis=(1, 2, 3)), np.quantile(images.mean(axis=(1, 2, 3)),
                                                                 [1 / 3, 2 / 3])).astype(np.int32)
  batch = parallel.global_batch({"image": images, "label": labels}, mesh)
  key = jax.random.key(2)
  assert "bf16" in step.lower(state, batch["image"], batch["label"], key).as_text()
  history = []
  for _ in range(40):
    state, metrics = step(state, batch["image"], batch["label"], key)
    assert bool(metrics["finite"])
    history.append(float(metrics["loss"]))
  assert np.mean(history[-5:]) < 0.8 * np.mean(history[:5]), history
  _assert_float32(state)
  assert {x.dtype for x in _float_leaves(state.batch_stats)} == {jnp.dtype(jnp.float32)}


def test_unknown_dtype_is_refused():
  config = pretrain_config.get_config("tiny")
  config.model.dtype = "float16"
  with pytest.raises(ValueError, match="dtype must be one of auto, float32, bfloat16"):
    build.build_mae(config.model)


@pytest.mark.parametrize("backend, want", [("cpu", "float32"), ("gpu", "bfloat16"),
                                           ("tpu", "bfloat16")])
def test_auto_dtype_is_bfloat16_on_accelerators_only(backend, want):
  assert build.dtype_of("auto", backend) == jnp.dtype(want)
  assert build.dtype_of("float32", "gpu") == jnp.dtype("float32")   # an explicit choice holds


def test_seed_gpu_configs_resolve_to_bfloat16_and_the_rest_follow_the_backend():
  for module in (pretrain_config, finetune_config, probe_config):
    assert module.get_config("seed_gpu").model.dtype == "bfloat16"
    for preset in ("seed", "demo", "tiny"):
      assert module.get_config(preset).model.dtype == "auto"
  for stage in ("pretrain", "probe", "finetune"):
    assert study_config.get_config("seed_gpu")[stage].model.dtype == "bfloat16"
    assert pipeline_config.get_config("seed_gpu")[stage].model.dtype == "bfloat16"
  assert build.dtype_of(pretrain_config.get_config("demo").model.dtype) == jnp.dtype(
      "bfloat16" if jax.default_backend() in ("gpu", "tpu") else "float32")


def test_bfloat16_run_keeps_raw_images_float32_in_its_feeds(tmp_path):
  """Pixels are normalised at full precision and cast to bfloat16 only then: the feed holds
  float32 raw images, so the BCE targets are not quantised before normalisation."""
  write_folder(tmp_path / "src", per_class=8, size=64)
  config = pretrain_config.get_config("tiny")
  config.model.dtype = "bfloat16"
  config.data.dir, config.data.source = str(tmp_path / "src"), "deeplense"
  config.data.cache_dir = str(tmp_path / "cache")
  run = pretrain_stage._setup(config, tmp_path / "run")
  for feed in run.feeds.values():
    assert feed.data["x"].dtype == jnp.float32
  raw = np.asarray(feed.data["x"][:2])
  prepared = batching.prepare(jnp.asarray(raw), seed=0, epoch=0, batch=0, shard=0,
                              augmentation=None, dtype=jnp.bfloat16)
  np.testing.assert_array_equal(
      prepared, batching.normalize(jnp.asarray(raw))[..., None].astype(jnp.bfloat16))
