"""Blocked attention and the erf GELU match their plain forms."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mae_jax.models import attention
from mae_jax.models import vit
from mae_jax.runtime import parallel
from mae_jax.train import steps
from tests import conftest


def _plain_attention(qkv: jax.Array, heads: int) -> jax.Array:
  n, length, three_dim = qkv.shape
  d = three_dim // 3 // heads
  x = qkv.reshape(n, length, 3, heads, d)
  logits = jnp.einsum("nqhd,nkhd->nhqk", x[:, :, 0], x[:, :, 1]) * d ** -0.5
  weights = jax.nn.softmax(logits, axis=-1)
  return jnp.einsum("nhqk,nkhd->nqhd", weights, x[:, :, 2]).reshape(n, length, -1)


@pytest.mark.parametrize("block_bytes", [1, 3 * 4 * 2 * 17 * 17, 1 << 20])
def test_blocked_attention_matches_softmax_attention(block_bytes):
  """Values and gradients, with blocks of 1, 3 and all 6 examples."""
  heads, n, length = 2, 6, 17
  qkv = 2.0 * jax.random.normal(jax.random.key(0), (n, length, 3 * heads * 8))
  g = jax.random.normal(jax.random.key(1), (n, length, heads * 8))
  out, vjp = jax.vjp(lambda x: attention.multi_head_attention(x, heads, block_bytes), qkv)
  ref, ref_vjp = jax.vjp(lambda x: _plain_attention(x, heads), qkv)
  np.testing.assert_allclose(out, ref, atol=2e-5)
  np.testing.assert_allclose(vjp(g)[0], ref_vjp(g)[0], atol=5e-5)


@pytest.mark.parametrize("impl", ["blocked", "xla"])
@pytest.mark.parametrize("start", [1, 12])
def test_attention_from_a_query_start_is_the_tail_of_attention(impl, start):
  """Queries from `start` on, every token a key and value: the rows of full attention
  from `start` on, and the same gradient (the earlier tokens' queries get none)."""
  heads, n, length = 2, 4, 17
  qkv = 2.0 * jax.random.normal(jax.random.key(0), (n, length, 3 * heads * 8))
  g = jax.random.normal(jax.random.key(1), (n, length - start, heads * 8))
  out, vjp = jax.vjp(lambda x: attention.multi_head_attention(x, heads, 1, impl, start), qkv)
  ref, ref_vjp = jax.vjp(lambda x: _plain_attention(x, heads)[:, start:], qkv)
  assert out.shape == (n, length - start, heads * 8)
  np.testing.assert_allclose(out, ref, atol=2e-5)
  grad = vjp(g)[0]
  np.testing.assert_allclose(grad, ref_vjp(g)[0], atol=5e-5)
  np.testing.assert_array_equal(grad[:, :start, :heads * 8], 0.0)
  with pytest.raises(ValueError, match="query_start"):
    attention.multi_head_attention(qkv, heads, query_start=length)


def test_block_size_is_a_divisor_within_the_budget():
  assert attention.block_size(64, 2 << 20, 1 << 20) == 1     # one example is over budget
  assert attention.block_size(64, 135_200, 1 << 20) == 4     # 7 fit; 4 is the largest divisor
  assert attention.block_size(6, 10, 1 << 20) == 6
  assert attention.block_size(7, 300, 1000) == 1             # 3 fit, but 7 is prime


def test_bfloat16_attention_keeps_its_dtype_and_accuracy():
  heads = 2
  qkv = jax.random.normal(jax.random.key(0), (4, 9, 3 * heads * 8))
  out = attention.multi_head_attention(qkv.astype(jnp.bfloat16), heads)
  grad = jax.grad(lambda x: attention.multi_head_attention(x, heads).astype(jnp.float32).sum())(
      qkv.astype(jnp.bfloat16))
  assert out.dtype == jnp.bfloat16 and grad.dtype == jnp.bfloat16
  np.testing.assert_allclose(out.astype(jnp.float32), _plain_attention(qkv, heads), atol=0.05)


def test_gelu_is_the_exact_erf_gelu():
  x = jnp.linspace(-10.0, 10.0, 20001)
  np.testing.assert_allclose(vit.gelu(x), jax.nn.gelu(x, approximate=False), atol=2e-6)
  np.testing.assert_allclose(jax.vmap(jax.grad(vit.gelu))(x),
                             jax.vmap(jax.grad(lambda v: jax.nn.gelu(v, approximate=False)))(x),
                             atol=2e-6)
  # far from the tanh approximation, which differs by ~1e-3 near |x| = 2
  assert np.abs(vit.gelu(x) - jax.nn.gelu(x, approximate=True)).max() > 1e-4


def test_xla_form_matches_blocked_and_the_platform_defaults(monkeypatch):
  """The GPU/TPU path (jax.nn.dot_product_attention, 9 tokens padded to 16) gives the
  blocked result."""
  heads = 2
  qkv = jax.random.normal(jax.random.key(0), (4, 9, 3 * heads * 8))
  blocked, vjp_b = jax.vjp(lambda x: attention.multi_head_attention(x, heads, impl="blocked"), qkv)
  fused, vjp_x = jax.vjp(lambda x: attention.multi_head_attention(x, heads, impl="xla"), qkv)
  np.testing.assert_allclose(fused, blocked, atol=2e-5)
  np.testing.assert_allclose(vjp_x(fused)[0], vjp_b(fused)[0], atol=5e-5)
  assert attention.implementation() == "blocked"            # tests run on the CPU backend
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert attention.implementation() == "cudnn"
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  assert attention.implementation() == "xla"
  monkeypatch.setenv(attention.ENV_VAR, "cudnn")
  assert attention.implementation() == "cudnn"
  monkeypatch.setenv(attention.ENV_VAR, "flash")
  with pytest.raises(ValueError, match="MAE_JAX_ATTENTION='flash' must be one of"):
    attention.implementation()


@pytest.mark.parametrize("length", [65, 9, 16])
def test_padding_to_a_multiple_of_8_changes_nothing(length):
  """Padded to a multiple of 8 with the true length as sequence lengths (XLA's form on
  the CPU): the same values and gradients as the unpadded attention."""
  q, k, v = jax.random.normal(jax.random.key(1), (3, 2, length, 4, 8))
  weights = jax.random.normal(jax.random.key(2), (2, length, 4, 8))

  def loss(q, k, v, pad_to):
    out = (attention.fused_attention(q, k, v, "xla", pad_to=pad_to) if pad_to
           else jax.nn.dot_product_attention(q, k, v, implementation="xla"))
    return (out * weights).sum(), out

  (_, plain), g_plain = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v, 0)
  (_, padded), g_padded = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v, 8)
  assert padded.shape == plain.shape == (2, length, 4, 8)
  np.testing.assert_allclose(padded, plain, atol=1e-5)
  for a, b in zip(g_padded, g_plain):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_cudnn_is_chosen_by_dtype_and_padded_only_for_cudnn(caplog):
  """float32 rules cuDNN out (reason logged); bfloat16 asks for it. Only cuDNN pads: XLA's
  form gets the true lengths (no pad in its program) and the same values."""
  with caplog.at_level("INFO"):
    assert attention.choose("cudnn", 8, 65, 32, "float32") == "xla"
    assert attention.choose("cudnn", 8, 65, 32, "bfloat16") == "cudnn"
  assert "takes bfloat16 or float16, not float32" in caplog.text
  assert "padded to 72 tokens" in caplog.text
  assert attention.choose("xla", 8, 65, 32, "float32") == "xla"
  q, k, v = jax.random.normal(jax.random.key(3), (3, 2, 65, 4, 8))
  plain = jax.make_jaxpr(lambda q, k, v: attention.fused_attention(q, k, v, "xla"))(q, k, v)
  padded = jax.make_jaxpr(lambda q, k, v: attention.fused_attention(q, k, v, "xla", 8))(q, k, v)
  assert " pad[" not in str(plain) and " pad[" in str(padded)
  np.testing.assert_allclose(attention.fused_attention(q, k, v, "xla"),
                             attention.fused_attention(q, k, v, "xla", 8), atol=1e-5)


def test_a_failed_cudnn_compile_falls_back_to_xla_with_one_line_and_the_step_runs(
    monkeypatch, caplog):
  """On this CPU cuDNN cannot compile: the bfloat16 classifier step asked for cuDNN is
  compiled with XLA's attention instead, after one warning, and gives XLA's results."""
  model, params, stats, tx = conftest.bfloat16_classifier(4, 2, 4)
  mesh = parallel.make_mesh()
  rng = np.random.default_rng(0)
  batch = parallel.global_batch({"x": rng.random((4, 64, 64, 1), dtype=np.float32),
                                 "y": rng.integers(0, 3, 4).astype(np.int32)}, mesh)

  def run(impl):
    monkeypatch.setenv(attention.ENV_VAR, impl)
    state = parallel.replicate(steps.ClassifierState.create(
        apply_fn=model.apply, params=params, tx=tx, batch_stats=stats), mesh)
    args = (state, batch["x"], batch["y"], jax.random.key(1))
    step = steps.compile_with_fallback(
        lambda: steps.make_classifier_step(model, mesh, frozen_encoder=False), args, "test step")
    return step(*args)[1]

  with caplog.at_level("WARNING"):
    fell_back = run("cudnn")
  lines = [r for r in caplog.records if "cuDNN attention did not compile" in r.getMessage()]
  assert len(lines) == 1 and "test step" in lines[0].getMessage()
  assert bool(fell_back["finite"])
  np.testing.assert_allclose(fell_back["loss"], run("xla")["loss"], rtol=1e-6)
  assert attention.implementation() == "xla"   # the override ended with the compile


def test_first_query_attention_is_the_first_row_of_attention():
  heads, n, length = 2, 3, 9
  qkv = jax.random.normal(jax.random.key(0), (n, length, 3 * heads * 4))
  np.testing.assert_allclose(attention.first_query_attention(qkv, heads),
                             _plain_attention(qkv, heads)[:, :1], atol=1e-6)
