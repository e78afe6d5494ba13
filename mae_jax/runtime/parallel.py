"""Data parallelism: a device mesh, per-device steps mapped with `jax.shard_map`,
and host-local numpy batches assembled into global device arrays.

This is the pmap programming model (a per-device function with `axis_name`
collectives such as `lax.pmean`) on the API that `jax.pmap` itself lowers to
since JAX 0.8: `jax.shard_map` inside `jax.jit`. Params and optimiser state are
replicated global arrays; batches are sharded along their first axis.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = "data"
PyTree = Any


def make_mesh(devices: list[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh over all devices of all processes, axis `data`, ordered by (process
  index, device id): each process's devices are contiguous on the axis, as the feeds'
  per-process shards need, whatever order `jax.devices()` gives (large TPU slices list
  theirs in physical order)."""
  devices = jax.devices() if devices is None else devices
  ordered = sorted(devices, key=lambda d: (d.process_index, d.id))
  return Mesh(np.asarray(ordered), (AXIS,))


def batch_problem(global_batch, what: str = "batch_size") -> str | None:
  """Why `global_batch` cannot be split evenly over every device, or None if it can."""
  devices = jax.device_count()
  if not isinstance(global_batch, int) or global_batch < 1 or global_batch % devices:
    example = max(devices, (global_batch if isinstance(global_batch, int) else 0) // devices
                  * devices)
    return (f"{what}={global_batch} must be a positive multiple of the device count "
            f"({devices}), e.g. {example}")
  return None


def check_batch(global_batch: int, what: str = "batch_size") -> int:
  """The per-process share of a global batch that splits evenly over every device.

  Raises:
    ValueError: it does not (the config validator reports this before a run starts).
  """
  problem = batch_problem(global_batch, what)
  if problem:
    raise ValueError(problem)
  return global_batch // jax.process_count()


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(AXIS))


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
  """Places a pytree on every device of `mesh` (a replicated global array per leaf).

  Goes through host memory: each process places its own (identical) copy, so no
  device-to-device transfer between hosts is needed, whatever device a leaf was on.
  """
  return jax.device_put(jax.device_get(tree), replicated(mesh))


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each process's local batch into global arrays sharded on axis 0."""
  sharding = sharded(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local.items()}


def data_parallel(fn: Callable, mesh: Mesh, in_specs, out_specs) -> Callable:
  """Maps a per-device function over `mesh` (collectives use axis name `data`).

  `check_vma=False` gives pmap semantics: inside `fn`, the gradient of a loss with
  respect to replicated params is the *local* gradient, to be averaged explicitly
  with `lax.pmean`. (With varying-manual-axes checking on, JAX would insert the
  cross-device sum itself, and a further pmean would leave a device-count-times
  too large gradient.)
  """
  return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                       check_vma=False)


REPLICATED = P()
BATCH = P(AXIS)
# Several batches stacked on a leading axis (a chunk's steps), each sharded on its batch axis.
STACKED = P(None, AXIS)
