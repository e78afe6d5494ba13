"""Optimiser builder: weight-decay groups by name, warmup + cosine schedule."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import pretrain as pretrain_config
from mae_jax.models import build
from mae_jax.train import optim


@pytest.fixture
def params():
  mae = build.build_mae(pretrain_config.get_config("tiny").model)
  return build.init_mae(mae, jax.random.key(0))


def test_decay_mask_excludes_biases_norms_tokens(params):
  config = pretrain_config.get_config("tiny")
  mask = optim.decay_mask(params, config.optim.no_decay)
  names = optim.param_names(params)
  for name, decays in zip(jax.tree.leaves(names), jax.tree.leaves(mask)):
    no_decay = name.endswith("/bias") or "norm" in name or name.endswith("_token")
    assert decays == (not no_decay), name
  assert mask["encoder"]["block_0"]["attn"]["qkv"]["kernel"]
  assert not mask["encoder"]["cls_token"] and not mask["decoder"]["mask_token"]
  assert not mask["encoder"]["block_0"]["norm1"]["scale"]


def test_weight_decay_applies_only_where_masked(params):
  config = pretrain_config.get_config("tiny")
  config.optim.weight_decay = 0.5
  tx, _ = optim.adamw(params, optim.AdamWSettings.from_config(config.optim), total_steps=10,
                      steps_per_epoch=10)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  # With zero gradients only decoupled weight decay moves params, and not at step 0:
  # the warmup starts from lr 0.
  assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree.leaves(updates))
  state = tx.init(params)
  for _ in range(3):
    updates, state = tx.update(zeros, state, params)
  assert float(jnp.abs(updates["encoder"]["block_0"]["attn"]["qkv"]["kernel"]).max()) > 0
  np.testing.assert_array_equal(updates["encoder"]["block_0"]["attn"]["qkv"]["bias"], 0.0)
  np.testing.assert_array_equal(updates["encoder"]["cls_token"], 0.0)


def test_warmup_cosine_schedule():
  sched = optim.warmup_cosine(1e-3, total_steps=100, warmup_steps=10, min_lr=1e-5)
  assert float(sched(0)) == 0.0
  np.testing.assert_allclose(float(sched(10)), 1e-3, rtol=1e-6)
  np.testing.assert_allclose(float(sched(100)), 1e-5, rtol=1e-5)
  values = [float(sched(s)) for s in range(10, 101)]
  assert all(a >= b for a, b in zip(values, values[1:]))  # decays monotonically
  np.testing.assert_allclose(float(sched(55)), 1e-5 + (1e-3 - 1e-5) * 0.5, rtol=1e-4)


def test_match_uses_full_names(params):
  matched = optim.match(params, [r"encoder/block_0/.*"])
  names = [n for n, m in zip(jax.tree.leaves(optim.param_names(params)),
                             jax.tree.leaves(matched)) if m]
  assert names and all(n.startswith("encoder/block_0/") for n in names)


def test_grad_clip_limits_the_gradient_adam_sees(params):
  config = pretrain_config.get_config("tiny")
  config.optim.grad_clip_norm = 1e-3
  tx, _ = optim.adamw(params, optim.AdamWSettings.from_config(config.optim), total_steps=10,
                      steps_per_epoch=10)
  huge = jax.tree.map(lambda p: jnp.full_like(p, 1e6), params)
  _, state = tx.update(huge, tx.init(params), params)
  adam_state = state[1][0]
  mu_norm = float(optax.tree.norm(adam_state.mu))
  np.testing.assert_allclose(mu_norm, (1 - config.optim.b1) * 1e-3, rtol=1e-4)
