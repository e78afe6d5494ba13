"""The Dense layer with the hand-written backward pass is nn.Dense, values and gradients;
the CPU and accelerator forms of the layers share their params."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import finetune as finetune_config
from mae_jax.models import build
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


@pytest.mark.parametrize("arch, stem", [("vit", "linear"), ("vit", "conv"), ("cnn", "linear")])
def test_params_move_between_the_cpu_and_accelerator_layer_forms(monkeypatch, arch, stem):
  """The CPU workarounds (Dense's own backward, convolutions as shifted views) and the
  plain forms used on accelerators share their params: a checkpoint made under one
  restores under the other and gives the same logits and gradients."""
  config = finetune_config.get_config(f"tiny,arch={arch}")
  if arch == "vit":
    config.model.stem = stem
  model = build.build_classifier(config.model, 3)
  images = jax.random.uniform(jax.random.key(0), (2, 64, 64, 1))

  def run(cpu: bool):
    monkeypatch.setattr(dense, "cpu_forms", lambda: cpu)
    params, stats = build.init_classifier(model, jax.random.key(1))
    variables = {"params": params, "batch_stats": stats}

    def loss(p):
      return model.apply({**variables, "params": p}, images)["logits"].sum()

    logits = model.apply(variables, images)["logits"]
    program = str(jax.make_jaxpr(loss)(params))
    return params, logits, jax.grad(loss)(params), program

  params_cpu, logits_cpu, grads_cpu, program_cpu = run(True)
  params_acc, logits_acc, grads_acc, program_acc = run(False)
  assert jax.tree.map(jnp.shape, params_cpu) == jax.tree.map(jnp.shape, params_acc)
  assert "name=dense" not in program_acc
  if arch == "vit":
    assert "name=dense" in program_cpu
  if arch == "cnn" or stem == "conv":
    assert "conv_general_dilated" in program_acc and "conv_general_dilated" not in program_cpu
  np.testing.assert_allclose(logits_acc, logits_cpu, rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(grads_acc), jax.tree.leaves(grads_cpu)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
