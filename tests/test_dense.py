"""The Dense layer with the hand-written backward pass is nn.Dense, values and gradients."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mae_jax.models import dense


@pytest.mark.parametrize("shape", [(5, 7), (3, 5, 7), (2, 3, 4, 7)])
def test_dense_matches_flax_dense_values_and_gradients(shape):
  x = jax.random.normal(jax.random.key(0), shape)
  ours, ref = dense.Dense(6), nn.Dense(6)
  params = ours.init(jax.random.key(1), x)
  ref_params = ref.init(jax.random.key(1), x)
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, ref_params)
  np.testing.assert_allclose(params["params"]["kernel"], ref_params["params"]["kernel"])
  g = jax.random.normal(jax.random.key(2), (*shape[:-1], 6))
  loss = lambda m: lambda p, x: (m.apply(p, x) * g).sum()  # pylint: disable=unnecessary-lambda-assignment
  ours_grads = jax.grad(loss(ours), argnums=(0, 1))(params, x)
  ref_grads = jax.grad(loss(ref), argnums=(0, 1))(params, x)
  np.testing.assert_allclose(ours.apply(params, x), ref.apply(params, x), rtol=1e-6, atol=1e-6)
  for a, b in zip(jax.tree.leaves(ours_grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_dense_computes_in_its_dtype_and_keeps_float32_params():
  x = jax.random.normal(jax.random.key(0), (4, 3, 8))
  layer = dense.Dense(5, dtype=jnp.bfloat16)
  params = layer.init(jax.random.key(1), x)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  assert layer.apply(params, x).dtype == jnp.bfloat16
  grads = jax.grad(lambda p: layer.apply(p, x).astype(jnp.float32).sum())(params)
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
  ref = nn.Dense(5, dtype=jnp.bfloat16)
  ref_grads = jax.grad(lambda p: ref.apply(p, x).astype(jnp.float32).sum())(params)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(a, b, rtol=2e-2, atol=2e-2)
