"""A Dense layer whose backward pass XLA's CPU backend compiles without a big transpose.

`flax.linen.Dense` is `dot_general(x, kernel) + bias`; JAX's transpose rule gives
the kernel gradient as a dot followed by a transpose, and XLA's CPU layout
assignment turns that into a transposed copy of the whole output gradient dy
(tokens x out features) and a matmul in Eigen's slow transposed form. Profiled on
the seed fine-tuning step's MLP shape, (16*257, 256) -> 1024, the forward and
backward of one layer took 195 ms against PyTorch's 115 ms, the kernel gradient
alone 114 ms of it (a 47 ms copy and a matmul at 44 GFLOP/s).

Here the backward pass is written out: dx = dy kernel^T, dkernel = x^T dy
contracting every leading axis at once, dbias = the sum of dy. XLA lays such a
dot out by transposing its first operand, so the narrower of x and dy goes first
(for the MLP's second layer (dy^T x)^T: transposing x there, the GELU output, cost
80-170 ms per layer in the step). The same layer took 115 ms. Parameters (`kernel`, `bias`), initialisers, dtype handling and results
are those of `nn.Dense`, so checkpoints are interchangeable.

That backward pass (and its `optimization_barrier`) is a CPU workaround: on GPUs and
TPUs `linear` is the plain `dot_general` + bias, whose transpose XLA lays out well
there. `cpu_forms()` decides, at trace time, from JAX's backend.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Dtype = Any
Initializer = Callable[..., jax.Array]


def _forward(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
  return lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ()))) + bias


@jax.custom_vjp
def dense(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
  """x @ kernel + bias over the last axis of `x` (any number of leading axes)."""
  return _forward(x, kernel, bias)


def _dense_fwd(x, kernel, bias):
  return _forward(x, kernel, bias), (x, kernel)


def _dense_bwd(residuals, dy):
  x, kernel = residuals
  lead = tuple(range(x.ndim - 1))
  dx = lax.dot_general(dy, kernel, (((dy.ndim - 1,), (1,)), ((), ())))
  if x.shape[-1] <= dy.shape[-1]:   # XLA transposes the first operand: the narrower one
    dkernel = lax.dot_general(x, dy, ((lead, lead), ((), ())))
  else:
    # The barrier keeps XLA from folding the transpose back into the dot (which it then
    # runs in Eigen's transposed-operand form, at two thirds of the speed).
    dkernel = lax.optimization_barrier(lax.dot_general(dy, x, ((lead, lead), ((), ())))).T
  dbias = dy.astype(jnp.float32).sum(lead).astype(dy.dtype)
  return dx.astype(x.dtype), dkernel.astype(kernel.dtype), dbias


dense.defvjp(_dense_fwd, _dense_bwd)


def cpu_forms() -> bool:
  """Whether layers trace their CPU workarounds (this Dense backward, the convolutions as
  shifted views): on a CPU backend. The parameters are the same either way, so a
  checkpoint moves between backends."""
  return jax.default_backend() == "cpu"


def linear(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
  """x @ kernel + bias: with the hand-written backward on a CPU, plain elsewhere."""
  return dense(x, kernel, bias) if cpu_forms() else _forward(x, kernel, bias)


class Dense(nn.Module):
  """`nn.Dense` (kernel and bias, computed in `dtype`) with the backward pass above on a
  CPU."""
  features: int
  kernel_init: Initializer = nn.initializers.lecun_normal()
  bias_init: Initializer = nn.initializers.zeros_init()
  dtype: Dtype | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", self.bias_init, (self.features,), jnp.float32)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    return linear(x, kernel, bias)
