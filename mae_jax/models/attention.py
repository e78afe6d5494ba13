"""Exact multi-head softmax attention computed in cache-sized blocks, with its own
backward pass.

The plain formulation (`einsum` -> softmax -> `einsum`) materialises the
(batch, heads, L, L) score, weight and gradient tensors in memory: for the seed
model (L = 257 tokens, 8 heads) about 540 MB per tensor and layer at batch 256,
and on a CPU the step then waits on memory. Profiling the seed pretrain step
showed the decoder's attention taking over half of the step. Here a few
examples at a time (`lax.map` over blocks of them) go through the whole
attention, so their scores (2.1 MB per example at 257 tokens, 8 heads) stay in cache,
and the backward pass recomputes the scores from q, k and the saved log-sum-exp
instead of storing the weights (the FlashAttention recipe, blocked over examples
and heads rather than over keys, since L is small).

Each block is a few whole examples: their slice of the fused (N, L, 3 * dim)
projection is split into heads-first q, k and v, (examples * heads, L, d), inside
the block, where the copy stays in cache, so the block's matmuls are plain batched
matmuls over contiguous rows; the output and, in the backward pass, the gradient of
the projection are written back in the fused layout the same way. The backward pass
saves nothing but the projection, the output and the log-sum-exp. Against
transposing q, k and v for the whole batch once per layer (itself faster than blocks
reading the fused layout with strides, 100 -> 81 ms at 257 tokens), forward and
backward of 16 examples went from 6.7 to 5.9 ms at 65 tokens, 8 heads of 32, and
from 43 to 42 ms for the decoder's 257 tokens, heads of 16 (one core; PyTorch's
fused kernel: 9.0 and 46 ms). The result is the same softmax attention to float
rounding; softmax statistics and scores are float32 whatever the input dtype
(bfloat16 inputs run their matmuls in bfloat16 with float32 accumulation).

The backward pass works on the transposed weights p^T, so its gradient matmuls are
plain ones, dq as k^T dst on a laid-out k^T (XLA's CPU dot runs a matmul that
contracts its first operand's leading axis, dst^T k, in a slow form): the ops of
the decoder's forward and backward pass for 16 examples went from 51.0 to 45.0 ms
in a profile (one core). `query_start` makes only the tokens from that index on
queries, every token still a key and a value: the MAE decoder's last block, whose
outputs are read only for the removed patches.

That blocking is for CPUs. On GPUs and TPUs, where a `lax.map` of small blocks
would serialise the batch, the same function calls `jax.nn.dot_product_attention`:
on GPUs cuDNN's fused flash attention for bfloat16 and float16 inputs, else XLA's
form. cuDNN refuses the model's odd token counts (65, 257) in training even
without a bias, so for cuDNN alone the sequence is padded to a multiple of 8 and
the true length passed as `query_seq_lengths` / `key_value_seq_lengths` (not a
boolean mask, which would become a dense bias); the padded rows are cut off again.
XLA's form (TPUs, and GPUs where cuDNN cannot run) takes the true lengths as they
are. Whether cuDNN compiles is found on the call the step makes: the step's first
compile (`train.steps.compile_with_fallback`) traces it with cuDNN, and where that
fails, logs one line and compiles the same step with XLA's form (`forced`).
`MAE_JAX_ATTENTION` = `blocked` | `xla` | `cudnn` overrides the choice (read when
a step is traced).
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Iterator

import jax
import jax.numpy as jnp
from absl import logging
from jax import lax

# Bytes of float32 scores one block may hold: about a core's L2 cache.
BLOCK_BYTES = 1 << 20
IMPLEMENTATIONS = ("blocked", "xla", "cudnn")
ENV_VAR = "MAE_JAX_ATTENTION"


PAD_TO = 8   # cuDNN's fused attention wants even (here: multiple-of-8) sequence lengths


_FORCED: list[str] = []   # `forced` implementations, innermost last


@contextlib.contextmanager
def forced(impl: str) -> Iterator[None]:
  """Within this context every attention traced uses `impl` (a step recompiled with XLA's
  form after cuDNN failed to compile it)."""
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"attention implementation must be one of {', '.join(IMPLEMENTATIONS)}")
  _FORCED.append(impl)
  try:
    yield
  finally:
    _FORCED.pop()


def implementation() -> str:
  """A `forced` implementation, else `MAE_JAX_ATTENTION` if set, else `blocked` on a CPU
  backend, `cudnn` on GPUs (`choose` takes `xla` where the dtype rules cuDNN out) and
  `xla` elsewhere."""
  if _FORCED:
    return _FORCED[-1]
  chosen = os.environ.get(ENV_VAR, "")
  if chosen:
    if chosen not in IMPLEMENTATIONS:
      raise ValueError(f"{ENV_VAR}={chosen!r} must be one of {', '.join(IMPLEMENTATIONS)}")
    return chosen
  return {"cpu": "blocked", "gpu": "cudnn"}.get(jax.default_backend(), "xla")


def padded_length(length: int, multiple: int = PAD_TO) -> int:
  return -(-length // multiple) * multiple


def fused_attention(q: jax.Array, k: jax.Array, v: jax.Array, impl: str,
                    pad_to: int | None = None) -> jax.Array:
  """`jax.nn.dot_product_attention` on (N, Lq, H, D) queries and (N, Lk, H, D) keys and
  values. Each length is padded to a multiple of `pad_to` (default: `PAD_TO` for cuDNN,
  which needs it, none for XLA) and the true lengths given as sequence lengths (keys past
  them are ignored; the padded query rows are dropped)."""
  if pad_to is None:
    pad_to = PAD_TO if impl == "cudnn" else 1
  n, queries, keys = q.shape[0], q.shape[1], k.shape[1]
  padded_q, padded_k = padded_length(queries, pad_to), padded_length(keys, pad_to)
  if (padded_q, padded_k) == (queries, keys):
    return jax.nn.dot_product_attention(q, k, v, implementation=impl)
  def pad(x: jax.Array, to: int) -> jax.Array:
    return jnp.pad(x, ((0, 0), (0, to - x.shape[1]), (0, 0), (0, 0)))

  out = jax.nn.dot_product_attention(
      pad(q, padded_q), pad(k, padded_k), pad(v, padded_k),
      query_seq_lengths=jnp.full((n,), queries, jnp.int32),
      key_value_seq_lengths=jnp.full((n,), keys, jnp.int32), implementation=impl)
  return out[:, :queries]


@functools.lru_cache(maxsize=None)
def choose(requested: str, heads: int, length: int, head_dim: int, dtype_name: str,
           queries: int | None = None) -> str:
  """The implementation to use for one shape (`queries` of `length` tokens; default all):
  `requested`, unless it is `cudnn` and the dtype rules cuDNN out (it takes bfloat16 and
  float16); then `xla`. Logged once per shape. Whether cuDNN compiles the shape is found
  on the step itself (`train.steps.compile_with_fallback`), not here."""
  if requested != "cudnn":
    return requested
  dtype = jnp.dtype(dtype_name)
  why = None
  if dtype not in (jnp.bfloat16, jnp.float16):
    why = f"cuDNN's fused attention takes bfloat16 or float16, not {dtype_name}"
  chosen = "xla" if why else "cudnn"
  note = f" ({why})" if why else f" (padded to {padded_length(length)} tokens)"
  logging.info("attention for %d queries of %d tokens, %d heads of %d, %s: %s%s",
               queries or length, length, heads, head_dim, dtype_name, chosen, note)
  return chosen


def block_size(batch: int, score_bytes: int, block_bytes: int = BLOCK_BYTES) -> int:
  """The largest divisor of `batch` whose blocks hold at most `block_bytes` of
  scores (`score_bytes` per example), and at least 1."""
  target = max(1, block_bytes // score_bytes)
  return max(c for c in range(1, min(batch, target) + 1) if batch % c == 0)


def _split_heads(qkv: jax.Array, heads: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(e, L, 3D) -> q (scaled), k, v, each (e * heads, L, D // heads)."""
  e, length, three_dim = qkv.shape
  d = three_dim // (3 * heads)
  x = qkv.reshape(e, length, 3, heads, d).transpose(2, 0, 3, 1, 4).reshape(3, e * heads, length, d)
  return x[0] * jnp.asarray(d ** -0.5, qkv.dtype), x[1], x[2]


def _merge_heads(x: jax.Array, heads: int) -> jax.Array:
  """(e * heads, L, d) -> (e, L, heads * d)."""
  eh, length, d = x.shape
  return x.reshape(eh // heads, heads, length, d).transpose(0, 2, 1, 3).reshape(
      eh // heads, length, heads * d)


def _scores(q: jax.Array, k: jax.Array) -> jax.Array:
  return jnp.einsum("cqd,ckd->cqk", q, k, preferred_element_type=jnp.float32)


def _forward_block(qkv: jax.Array, heads: int, start: int) -> tuple[jax.Array, jax.Array]:
  """e examples' (e, L, 3D) projection -> the output of the queries from `start` on,
  (e, L - start, D), and their log-sum-exp (e * heads, L - start)."""
  q, k, v = _split_heads(qkv, heads)
  s = _scores(q[:, start:], k)
  m = s.max(axis=-1, keepdims=True)
  e = jnp.exp(s - m)
  denom = e.sum(axis=-1)
  o = jnp.einsum("cqk,ckd->cqd", e.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return _merge_heads((o / denom[..., None]).astype(qkv.dtype), heads), m[..., 0] + jnp.log(denom)


def _backward_block(qkv: jax.Array, o: jax.Array, lse: jax.Array, dout: jax.Array,
                    heads: int, start: int) -> jax.Array:
  """The gradient of e examples' (e, L, 3D) projection (queries from `start` on)."""
  f32 = jnp.float32
  q, k, v = _split_heads(qkv, heads)
  q = q[:, start:]
  e, length, dim = o.shape   # length: the queries'
  d = dim // heads
  rows = (dout.astype(f32) * o.astype(f32)).reshape(e, length, heads, d).sum(-1)
  rows = rows.transpose(0, 2, 1).reshape(e * heads, length)             # (c, queries)
  do = dout.reshape(e, length, heads, d).transpose(0, 2, 1, 3).reshape(e * heads, length, d)
  pt = jnp.exp(_scores(k, q) - lse[:, None, :])                        # (c, keys, queries)
  dv = jnp.einsum("ckq,cqd->ckd", pt.astype(do.dtype), do, preferred_element_type=f32)
  dpt = jnp.einsum("ckd,cqd->ckq", v, do, preferred_element_type=f32)
  dst = (pt * (dpt - rows[:, None, :])).astype(q.dtype)
  dk = jnp.einsum("ckq,cqd->ckd", dst, q, preferred_element_type=f32)
  # dq = dst^T k contracts dst's leading axis, which XLA's CPU dot runs in a slow form;
  # dq^T = k^T dst is a plain matmul once k^T (small) is laid out (the barrier keeps XLA
  # from folding the transpose back into the dot; timings in docs/results.md).
  kt = lax.optimization_barrier(jnp.swapaxes(k, 1, 2))
  dqt = jnp.einsum("cdk,ckq->cdq", kt, dst, preferred_element_type=f32) * (d ** -0.5)
  dq = dqt.transpose(0, 2, 1)
  dq = jnp.pad(dq, ((0, 0), (start, 0), (0, 0)))                       # no query, no gradient
  tokens = k.shape[1]
  grads = jnp.stack([dq, dk, dv]).astype(qkv.dtype)                     # (3, c, L, d)
  grads = grads.reshape(3, e, heads, tokens, d).transpose(1, 3, 0, 2, 4)
  return grads.reshape(e, tokens, 3 * dim)


def _blocks(x: jax.Array, c: int) -> jax.Array:
  return x.reshape(x.shape[0] // c, c, *x.shape[1:])


def _unblock(x: jax.Array) -> jax.Array:
  return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _attention(qkv: jax.Array, heads: int, c: int, start: int) -> jax.Array:
  return _attention_fwd(qkv, heads, c, start)[0]


def _attention_fwd(qkv, heads, c, start):
  o, lse = lax.map(lambda x: _forward_block(x, heads, start), _blocks(qkv, c))
  o, lse = _unblock(o), _unblock(lse)
  return o, (qkv, o, lse)


def _attention_bwd(heads, c, start, res, dout):
  qkv, o, lse = res
  grads = lax.map(lambda a: _backward_block(*a, heads, start),
                  (_blocks(qkv, c), _blocks(o, c), _blocks(lse, c * heads), _blocks(dout, c)))
  return (_unblock(grads),)


_attention.defvjp(_attention_fwd, _attention_bwd)


def first_query_attention(qkv: jax.Array, heads: int) -> jax.Array:
  """The first token's softmax attention over every token, (N, L, 3 * dim) -> (N, 1, dim).

  What the last block of a CLS-pooled classifier needs; one query per example is
  small, so the plain form (autodiff, any backend) is used.
  """
  n, length, three_dim = qkv.shape
  d = three_dim // (3 * heads)
  x = qkv.reshape(n, length, 3, heads, d)
  q = x[:, :1, 0] * jnp.asarray(d ** -0.5, qkv.dtype)
  s = jnp.einsum("nqhd,nkhd->nhqk", q, x[:, :, 1], preferred_element_type=jnp.float32)
  weights = jax.nn.softmax(s, axis=-1).astype(qkv.dtype)
  out = jnp.einsum("nhqk,nkhd->nqhd", weights, x[:, :, 2], preferred_element_type=jnp.float32)
  return out.reshape(n, 1, heads * d).astype(qkv.dtype)


def multi_head_attention(qkv: jax.Array, heads: int, block_bytes: int = BLOCK_BYTES,
                         impl: str | None = None, query_start: int = 0) -> jax.Array:
  """softmax(q k^T / sqrt(d)) v for every head, from a fused projection.

  Args:
    qkv: (N, L, 3 * dim) as one Dense layer produces it: [q | k | v], each split
      into `heads` heads of dim // heads features (the MAE / timm layout).
    heads: number of heads.
    block_bytes: float32 score bytes per block; sets how many examples run at once.
    impl: `blocked`, `xla` or `cudnn`; default `implementation()`.
    query_start: only the tokens from this one on are queries (every token is still
      a key and a value): what a last block needs when later layers read only those
      tokens' outputs (the MAE decoder's removed patches).
  Returns:
    (N, L - query_start, dim): the heads' outputs concatenated, ready for the output
    projection.
  """
  n, length, three_dim = qkv.shape
  if three_dim % (3 * heads):
    raise ValueError(f"qkv width {three_dim} is not 3 x a multiple of heads {heads}")
  if not 0 <= query_start < length:
    raise ValueError(f"query_start {query_start} is not a token index of {length} tokens")
  impl = impl or implementation()
  if impl != "blocked":
    head_dim = three_dim // (3 * heads)
    impl = choose(impl, heads, length, head_dim, jnp.dtype(qkv.dtype).name,
                  length - query_start)
    x = qkv.reshape(n, length, 3, heads, head_dim)
    out = fused_attention(x[:, query_start:, 0], x[:, :, 1], x[:, :, 2], impl)
    return out.reshape(n, length - query_start, three_dim // 3)
  c = block_size(n, 4 * (length - query_start) * length * heads, block_bytes)
  return _attention(qkv, heads, c, query_start)
