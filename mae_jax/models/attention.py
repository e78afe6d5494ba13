"""Exact multi-head softmax attention computed in cache-sized blocks, with its own
backward pass.

The plain formulation (`einsum` -> softmax -> `einsum`) materialises the
(batch, heads, L, L) score, weight and gradient tensors in memory: for the seed
model (L = 257 tokens, 8 heads) about 540 MB per tensor and layer at batch 256,
and on a CPU the step then waits on memory. Profiling the seed pretrain step
showed the decoder's attention taking over half of the step. Here a few examples
at a time (`lax.map` over blocks of the batch) go through the whole attention, so
their scores stay in cache, and the backward pass recomputes the scores from q, k
and the saved log-sum-exp instead of storing the weights (the FlashAttention
recipe, blocked over examples rather than over keys, since L is small).

The blocks read the fused `[q | k | v]` projection and write the gradient of it
directly, in the (N, L, features) layout the Dense layers use, so no transposes
of whole activations are needed around the attention. The result is the same
softmax attention to float rounding; softmax statistics and scores are float32
whatever the input dtype (bfloat16 inputs run their matmuls in bfloat16 with
float32 accumulation).

That blocking is for CPUs. On GPUs and TPUs, where a `lax.map` of small blocks
would serialise the batch, the same function calls `jax.nn.dot_product_attention`
(XLA's fused form, or cuDNN's flash attention). `MAE_JAX_ATTENTION` =
`blocked` | `xla` | `cudnn` overrides the choice (read when a step is traced).
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
from jax import lax

# Bytes of float32 scores one block may hold: about a core's L2 cache.
BLOCK_BYTES = 1 << 20
IMPLEMENTATIONS = ("blocked", "xla", "cudnn")
ENV_VAR = "MAE_JAX_ATTENTION"


def implementation() -> str:
  """`MAE_JAX_ATTENTION` if set, else `blocked` on a CPU backend and `xla` elsewhere."""
  chosen = os.environ.get(ENV_VAR, "")
  if chosen:
    if chosen not in IMPLEMENTATIONS:
      raise ValueError(f"{ENV_VAR}={chosen!r} must be one of {', '.join(IMPLEMENTATIONS)}")
    return chosen
  return "blocked" if jax.default_backend() == "cpu" else "xla"


def block_size(batch: int, score_bytes: int, block_bytes: int = BLOCK_BYTES) -> int:
  """The largest divisor of `batch` whose blocks hold at most `block_bytes` of
  scores (`score_bytes` per example), and at least 1."""
  target = max(1, block_bytes // score_bytes)
  return max(c for c in range(1, min(batch, target) + 1) if batch % c == 0)


def _split_heads(qkv: jax.Array, heads: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  c, length, three_dim = qkv.shape
  d = three_dim // (3 * heads)
  x = qkv.reshape(c, length, 3, heads, d)
  return x[:, :, 0] * jnp.asarray(d ** -0.5, qkv.dtype), x[:, :, 1], x[:, :, 2]


def _scores(q: jax.Array, k: jax.Array) -> jax.Array:
  return jnp.einsum("cqhd,ckhd->chqk", q, k, preferred_element_type=jnp.float32)


def _forward_block(qkv: jax.Array, heads: int) -> tuple[jax.Array, jax.Array]:
  """(c, L, 3D) -> output (c, L, D) and log-sum-exp (c, heads, L)."""
  q, k, v = _split_heads(qkv, heads)
  s = _scores(q, k)
  m = s.max(axis=-1, keepdims=True)
  e = jnp.exp(s - m)
  denom = e.sum(axis=-1)
  o = jnp.einsum("chqk,ckhd->cqhd", e.astype(v.dtype), v, preferred_element_type=jnp.float32)
  o = o / denom.transpose(0, 2, 1)[..., None]
  c, length = qkv.shape[:2]
  return o.reshape(c, length, -1).astype(qkv.dtype), m[..., 0] + jnp.log(denom)


def _backward_block(qkv: jax.Array, o: jax.Array, lse: jax.Array, do: jax.Array,
                    heads: int) -> jax.Array:
  """The gradient of the block's fused projection, (c, L, 3D)."""
  q, k, v = _split_heads(qkv, heads)
  c, length, dim = o.shape
  d = dim // heads
  o = o.reshape(c, length, heads, d)
  do = do.reshape(c, length, heads, d)
  p = jnp.exp(_scores(q, k) - lse[..., None])
  dv = jnp.einsum("chqk,cqhd->ckhd", p.astype(do.dtype), do, preferred_element_type=jnp.float32)
  dp = jnp.einsum("cqhd,ckhd->chqk", do, v, preferred_element_type=jnp.float32)
  rows = jnp.einsum("cqhd,cqhd->chq", do, o, preferred_element_type=jnp.float32)
  ds = (p * (dp - rows[..., None])).astype(qkv.dtype)
  dq = jnp.einsum("chqk,ckhd->cqhd", ds, k, preferred_element_type=jnp.float32) * d ** -0.5
  dk = jnp.einsum("chqk,cqhd->ckhd", ds, q, preferred_element_type=jnp.float32)
  return jnp.stack([dq, dk, dv], axis=2).reshape(c, length, 3 * dim).astype(qkv.dtype)


def _blocks(x: jax.Array, c: int) -> jax.Array:
  return x.reshape(x.shape[0] // c, c, *x.shape[1:])


def _unblock(x: jax.Array) -> jax.Array:
  return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _attention(qkv: jax.Array, heads: int, c: int) -> jax.Array:
  return _attention_fwd(qkv, heads, c)[0]


def _attention_fwd(qkv, heads, c):
  o, lse = lax.map(lambda x: _forward_block(x, heads), _blocks(qkv, c))
  o, lse = _unblock(o), _unblock(lse)
  return o, (qkv, o, lse)


def _attention_bwd(heads, c, res, do):
  qkv, o, lse = res
  dqkv = lax.map(lambda a: _backward_block(*a, heads),
                 (_blocks(qkv, c), _blocks(o, c), _blocks(lse, c), _blocks(do, c)))
  return (_unblock(dqkv),)


_attention.defvjp(_attention_fwd, _attention_bwd)


def multi_head_attention(qkv: jax.Array, heads: int, block_bytes: int = BLOCK_BYTES,
                         impl: str | None = None) -> jax.Array:
  """softmax(q k^T / sqrt(d)) v for every head, from a fused projection.

  Args:
    qkv: (N, L, 3 * dim) as one Dense layer produces it: [q | k | v], each split
      into `heads` heads of dim // heads features (the MAE / timm layout).
    heads: number of heads.
    block_bytes: float32 score bytes per block; sets how many examples run at once.
    impl: `blocked`, `xla` or `cudnn`; default `implementation()`.
  Returns:
    (N, L, dim): the heads' outputs concatenated, ready for the output projection.
  """
  n, length, three_dim = qkv.shape
  if three_dim % (3 * heads):
    raise ValueError(f"qkv width {three_dim} is not 3 x a multiple of heads {heads}")
  impl = impl or implementation()
  if impl != "blocked":
    x = qkv.reshape(n, length, 3, heads, three_dim // (3 * heads))
    out = jax.nn.dot_product_attention(x[:, :, 0], x[:, :, 1], x[:, :, 2], implementation=impl)
    return out.reshape(n, length, three_dim // 3)
  c = block_size(n, 4 * heads * length * length, block_bytes)
  return _attention(qkv, heads, c)
