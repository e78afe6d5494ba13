"""Probe and fine-tune: frozen encoder, LARS, per-group rates, evaluation, restore."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import finetune as finetune_config
from configs import probe as probe_config
from mae_jax.data import arrays
from mae_jax.data import feeds
from mae_jax.models import build
from mae_jax.models import heads
from mae_jax.models import load
from mae_jax.runtime import checkpoint
from mae_jax.runtime import errors
from mae_jax.runtime import fileio
from mae_jax.runtime import parallel
from mae_jax.runtime import workdir as workdir_lib
from mae_jax.stages import classify
from mae_jax.stages import common
from mae_jax.train import batching
from mae_jax.train import optim
from mae_jax.train import steps


def _setup(config, epochs_steps=(10, 5)):
  model = build.build_classifier(config.model, 3, parallel.AXIS)
  params, stats = build.init_classifier(model, jax.random.key(0))
  total, per_epoch = epochs_steps
  tx, peaks = optim.classifier_optimizer(
      params, optim.ClassifierOptimSettings.from_config(config.optim), total_steps=total,
      steps_per_epoch=per_epoch, global_batch=config.batch_size, depth=config.model.depth)
  mesh = parallel.make_mesh()
  state = parallel.replicate(steps.ClassifierState.create(
      apply_fn=model.apply, params=params, tx=tx, batch_stats=stats), mesh)
  return model, params, state, mesh, peaks


def _batch(mesh, n=8, seed=0):
  rng = np.random.default_rng(seed)
  b = {"image": rng.random((n, 64, 64, 1), dtype=np.float32),
       "label": rng.integers(0, 3, n).astype(np.int32)}
  g = parallel.global_batch(b, mesh)
  return g["image"], g["label"]


def test_probe_freezes_the_encoder_and_keeps_no_state_for_it():
  config = probe_config.get_config("tiny")
  model, params, state, mesh, _ = _setup(config)
  step = steps.make_classifier_step(model, mesh, frozen_encoder=True)
  before = jax.device_get(state.params)
  for i in range(3):
    state, metrics = step(state, *_batch(mesh, seed=i), jax.random.key(0))
    assert bool(metrics["finite"])
  after = jax.device_get(state.params)
  for a, b in zip(jax.tree.leaves(before["encoder"]), jax.tree.leaves(after["encoder"])):
    assert np.array_equal(a, b) and a.dtype == b.dtype  # bit-identical
  assert any(not np.array_equal(a, b) for a, b in
             zip(jax.tree.leaves(before["classifier"]), jax.tree.leaves(after["classifier"])))
  state_size = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.opt_state)
                   if hasattr(x, "shape") and x.ndim > 0)
  assert state_size == optim.count_params(params["classifier"])  # LARS momentum: head only
  assert not np.array_equal(jax.device_get(state.batch_stats)["classifier"]["bn0"]["mean"], 0)


def _mae_lars_numpy(params, grads_seq, lrs, wd, momentum, trust):
  """facebookresearch/mae util/lars.py, transcribed to numpy."""
  p = {k: v.copy() for k, v in params.items()}
  mu = {k: np.zeros_like(v) for k, v in params.items()}
  for grads, lr in zip(grads_seq, lrs):
    for k in p:
      dp = grads[k].copy()
      if p[k].ndim > 1:
        dp = dp + wd * p[k]
        pn, un = np.linalg.norm(p[k]), np.linalg.norm(dp)
        q = trust * pn / un if (pn > 0 and un > 0) else 1.0
        dp = dp * q
      mu[k] = momentum * mu[k] + dp
      p[k] = p[k] - lr * mu[k]
  return p


def test_lars_matches_the_mae_rule():
  rng = np.random.default_rng(0)
  params = {"w": rng.normal(size=(4, 3)), "b": rng.normal(size=(3,)), "z": np.zeros((2, 2))}
  grads_seq = [{k: rng.normal(size=v.shape) for k, v in params.items()} for _ in range(4)]
  schedule = optim.warmup_cosine(0.5, total_steps=4, warmup_steps=1)
  tx = optim.lars(schedule, weight_decay=0.05, momentum=0.9, trust_coefficient=0.001)
  p = jax.tree.map(jnp.asarray, params)
  state = tx.init(p)
  for grads in grads_seq:
    updates, state = tx.update(jax.tree.map(jnp.asarray, grads), state, p)
    p = optax.apply_updates(p, updates)
  expected = _mae_lars_numpy(params, grads_seq, [float(schedule(i)) for i in range(4)],
                             0.05, 0.9, 0.001)
  for k in params:
    np.testing.assert_allclose(np.asarray(p[k]), expected[k], rtol=1e-5, atol=1e-7)


def test_finetune_applies_two_learning_rates_to_the_right_groups():
  config = finetune_config.get_config("tiny")
  config.optim.weight_decay = 0.0
  config.optim.warmup_epochs = 0.0
  _, params, state, _, peaks = _setup(config)
  enc_lr, head_lr = config.optim.lr_groups[0][1], config.optim.lr_groups[1][1]
  assert all(v == enc_lr for v in jax.tree.leaves(peaks["encoder"]))
  assert all(v == head_lr for v in jax.tree.leaves(peaks["classifier"]))
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.3), params)
  updates, _ = state.tx.update(grads, state.tx.init(params), params)
  # Adam's first step moves every param by exactly its group's rate.
  enc = np.concatenate([np.abs(np.ravel(u)) for u in jax.tree.leaves(updates["encoder"])])
  head = np.concatenate([np.abs(np.ravel(u)) for u in jax.tree.leaves(updates["classifier"])])
  np.testing.assert_allclose(enc, enc_lr, rtol=1e-4)
  np.testing.assert_allclose(head, head_lr, rtol=1e-4)
  np.testing.assert_allclose(head.mean() / enc.mean(), head_lr / enc_lr, rtol=1e-4)


def test_layer_decay_scales_encoder_rates_as_mae():
  config = finetune_config.get_config("tiny")
  config.optim.layer_decay = 0.5
  _, _, _, _, peaks = _setup(config)
  enc_lr, depth = config.optim.lr_groups[0][1], config.model.depth
  assert peaks["encoder"]["patch_embed"]["kernel"] == enc_lr * 0.5 ** (depth + 1)
  assert peaks["encoder"]["block_0"]["attn"]["qkv"]["kernel"] == enc_lr * 0.5 ** depth
  assert peaks["encoder"][f"block_{depth - 1}"]["mlp"]["fc1"]["bias"] == enc_lr * 0.5
  assert peaks["encoder"]["norm"]["scale"] == enc_lr


def test_uncovered_param_is_refused():
  config = finetune_config.get_config("tiny")
  config.optim.lr_groups = ((r"encoder/.*", 1e-4),)
  with pytest.raises(ValueError, match="matches no optim.lr_groups"):
    _setup(config)


def test_prediction_of_an_image_does_not_depend_on_its_batch():
  """Inference mode: BatchNorm uses its running statistics and dropout is off, so an
  image's logits are the same whatever else is in the batch (with batch statistics or
  dropout they would differ)."""
  config = finetune_config.get_config("tiny")
  model, params, state, mesh, _ = _setup(config)
  stats = jax.tree.map(lambda s: 0.5 * s + 0.1, state.batch_stats)   # not the identity
  predict = steps.make_predict(model, mesh)
  rng = np.random.default_rng(3)
  first = rng.random((4, 64, 64, 1), np.float32)
  others = [rng.random((4, 64, 64, 1), np.float32) for _ in range(2)]
  logits = [np.asarray(predict(state.params, stats, parallel.global_batch(
      {"x": np.concatenate([first, o])}, mesh)["x"]))[:4] for o in others]
  np.testing.assert_allclose(logits[0], logits[1], rtol=1e-5, atol=1e-6)
  assert np.abs(logits[0]).max() > 0


def test_evaluation_pass_gives_each_examples_logits_in_canonical_order(small_folder, tmp_path):
  """The split's logits through the evaluation pass (padded shards, inference mode) equal
  the model applied to each image alone, in the split's order."""
  root, _ = small_folder
  split = arrays.prepare(root, tmp_path / "cache", progress=False)["validation"]
  config = finetune_config.get_config("tiny")
  config.model.image_size = 16
  config.model.patch = 8
  model, _, state, mesh, _ = _setup(config)
  feed = feeds.DeviceFeed(split.images, split.labels, mesh)
  feeding = steps.Feeding(source="device", local_batch=4, seed=0)
  tree = {"params": state.params, "batch_stats": state.batch_stats}
  logits = common.Evaluator(steps.logits_fn(model), mesh, feed, feeding)(tree)
  assert logits.shape == (len(split), 3)
  images = np.asarray(batching.normalize(split.images))[..., None]
  direct = np.concatenate([np.asarray(model.apply(jax.device_get(tree), images[i:i + 1], False)
                                      ["logits"]) for i in range(len(split))])
  np.testing.assert_allclose(logits, direct, rtol=1e-5, atol=1e-5)


def test_restore_errors_are_explicit(tmp_path):
  config = finetune_config.get_config("tiny")
  model = build.build_classifier(config.model, 3, parallel.AXIS)
  params, stats = build.init_classifier(model, jax.random.key(0))
  with pytest.raises(errors.MissingCheckpointError, match="make one with:\n  python main"):
    load.restore_from_stage(tmp_path / "nothing", params, stats, dont_load=[],
                                  make_it="python main.py --config=configs/pretrain.py:tiny")
  # A checkpoint of a wider encoder: the first mismatch is named with both shapes.
  other = finetune_config.get_config("tiny")
  other.model.dim = 64
  other_params, other_stats = build.init_classifier(build.build_classifier(other.model, 3, parallel.AXIS),
                                                       jax.random.key(1))
  mngr = checkpoint.manager(tmp_path / "wide", 1)
  checkpoint.save(mngr, 1, {"params": other_params, "batch_stats": other_stats})
  checkpoint.seal(mngr)
  with pytest.raises(errors.IncompatibleCheckpointError,
                     match=r"param \S+ has shape \(.*64.*\) there but \(.*32.*\) in this"):
    load.restore_from_stage(tmp_path / "wide", params, stats, dont_load=[])
  # The same architecture loads, except what dont_load names.
  mngr = checkpoint.manager(tmp_path / "same", 1)
  trained = jax.tree.map(lambda x: x + 1.0, params)
  checkpoint.save(mngr, 3, {"params": trained, "batch_stats": stats})
  checkpoint.seal(mngr)
  loaded, _, step, fresh = load.restore_from_stage(tmp_path / "same", params, stats,
                                                         dont_load=[r"classifier/.*"])
  assert step == 3 and fresh and all(n.startswith("classifier/") for n in fresh)
  np.testing.assert_array_equal(loaded["encoder"]["norm"]["scale"],
                                np.asarray(trained["encoder"]["norm"]["scale"]))
  np.testing.assert_array_equal(loaded["classifier"]["out"]["bias"],
                                np.asarray(params["classifier"]["out"]["bias"]))


def test_restore_refuses_deeper_encoders(tmp_path):
  config = finetune_config.get_config("tiny")
  params, stats = build.init_classifier(build.build_classifier(config.model, 3, parallel.AXIS), jax.random.key(0))
  deeper = finetune_config.get_config("tiny")
  deeper.model.depth = config.model.depth + 1
  deep_params, _ = build.init_classifier(build.build_classifier(deeper.model, 3, parallel.AXIS), jax.random.key(1))
  mngr = checkpoint.manager(tmp_path / "deep", 1)
  checkpoint.save(mngr, 1, {"params": deep_params})
  checkpoint.seal(mngr)
  with pytest.raises(errors.IncompatibleCheckpointError, match="encoder param encoder/block_"):
    load.restore_from_stage(tmp_path / "deep", params, stats, dont_load=[])


def test_the_probe_feature_is_a_typed_value_in_its_own_file(tmp_path):
  """feature_choice.json holds the block and pooling (read back without parsing a name);
  a workdir from before that kept the choice in its config.json still reads; the feature
  bank's candidates are the FeatureChoice names, and a classifier built with one reads it."""
  choice = heads.FeatureChoice(block=0, pool="mean")
  fileio.write_json_atomic(tmp_path / workdir_lib.FEATURES_FILE,
                           {"chosen": choice.name, **dataclasses.asdict(choice)})
  assert classify.read_feature_choice(tmp_path) == choice
  old = tmp_path / "old"
  old.mkdir()
  fileio.write_json_atomic(old / workdir_lib.FEATURES_FILE, {"chosen": "block0_cls"})
  fileio.write_json_atomic(old / workdir_lib.CONFIG_FILE,
                           {"model": {"feature_block": 0, "pool": "cls"}})
  assert classify.read_feature_choice(old) == heads.FeatureChoice(0, "cls")
  assert classify.read_feature_choice(tmp_path / "fine-tune") is None

  config = probe_config.get_config("tiny")
  model = build.build_classifier(config.model, 3)
  params, stats = build.init_classifier(model, jax.random.key(0))
  images = jnp.zeros((2, config.model.image_size, config.model.image_size, 1))
  bank = model.apply({"params": params, "batch_stats": stats}, images, method="feature_bank")
  assert set(bank) == {c.name for c in heads.feature_candidates(config.model.depth)}
  chosen = build.build_classifier(config.model, 3, feature=choice)
  assert (chosen.feature_block, chosen.pool) == (0, "mean")
  np.testing.assert_allclose(
      chosen.apply({"params": params, "batch_stats": stats}, images, method="features"),
      bank[choice.name], rtol=1e-5, atol=1e-6)
