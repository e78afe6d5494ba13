"""Feeds: how a split's examples reach the jitted steps.

Both feeds cut the split into one shard per device, strided (example i on device
i mod D, at row i div D; `train.batching`), and both deliver raw images: the step
normalises and augments them (`train.steps.Feeding`).

- `DeviceFeed` puts the split in device memory once, sharded over the mesh's data
  axis (each process holds its own devices' shards); each step gathers its batch
  from the epoch's order on the device. No per-step transfer, no host work.
- `HostFeed` keeps the split in host memory and, for each chunk of steps, gathers
  the raw rows by the same order on the host and transfers them. For splits larger
  than the accelerators' memory.

`choose` picks one from `data.feed` ('auto': the device feed when the split fits a
share of device memory).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh
from jax.sharding import NamedSharding

from mae_jax.runtime import parallel
from mae_jax.train import batching

FEEDS = ("auto", "device", "host")


@dataclasses.dataclass(frozen=True)
class ShardLayout:
  """Where a split's N examples sit: D shards of `size` rows, `counts` of them real."""
  num_examples: int
  shards: int
  size: int
  counts: tuple[int, ...]

  @classmethod
  def of(cls, num_examples: int, shards: int, multiple: int = 1) -> "ShardLayout":
    counts = tuple(batching.shard_sizes(num_examples, shards))
    size = max(max(counts), 1)
    size = -(-size // multiple) * multiple
    return cls(num_examples, shards, size, counts)

  def shard(self, values: np.ndarray) -> np.ndarray:
    """(N, ...) -> (D, size, ...): example i at [i % D, i // D], zero padding after."""
    out = np.zeros((self.shards, self.size, *values.shape[1:]), values.dtype)
    for d in range(self.shards):
      part = values[d::self.shards]
      out[d, :len(part)] = part
    return out


def _local_shards(mesh: Mesh) -> list[int]:
  """Indices of this process's devices on the mesh axis (a contiguous run)."""
  here = [i for i, d in enumerate(mesh.devices.flat) if d.process_index == jax.process_index()]
  if here != list(range(here[0], here[0] + len(here))):
    raise ValueError(f"this process's devices are not contiguous on the mesh: {here}")
  return here


def _put(values: np.ndarray, mesh: Mesh, spec) -> jax.Array:
  """A global array from this process's rows (its devices' shards, in mesh order)."""
  return jax.make_array_from_process_local_data(NamedSharding(mesh, spec), values)


class DeviceFeed:
  """A split resident in device memory, sharded over the data axis."""
  source = "device"

  def __init__(self, inputs: np.ndarray, labels: np.ndarray, mesh: Mesh, dtype=jnp.float32):
    self.layout = ShardLayout.of(len(labels), mesh.devices.size)
    self.mesh = mesh
    local = _local_shards(mesh)
    x = self.layout.shard(np.asarray(inputs))[local]
    y = self.layout.shard(np.asarray(labels, np.int32))[local]
    count = np.asarray(self.layout.counts, np.int32)[local]
    self.data = {
        "x": _put(x.reshape(-1, *x.shape[2:]).astype(dtype), mesh, parallel.BATCH),
        "y": _put(y.reshape(-1), mesh, parallel.BATCH),
        "count": _put(count, mesh, parallel.BATCH),
    }
    self.nbytes = sum(int(a.nbytes) for a in self.data.values())

  def chunk_data(self, epoch: int, first: int, num_steps: int, local_batch: int) -> dict:
    """The chunk's `data` argument: the resident split (the step picks the rows)."""
    del epoch, first, num_steps, local_batch
    return self.data

  def eval_data(self) -> dict:
    return {"x": self.data["x"], "count": self.data["count"]}


@functools.lru_cache(maxsize=64)
def _host_order(seed: int, epoch: int, shard: int, count: int, size: int) -> np.ndarray:
  cpu = jax.local_devices(backend="cpu")[0]
  with jax.default_device(cpu):
    return np.asarray(_order_on_cpu(seed, epoch, shard, count, size))


@functools.partial(jax.jit, static_argnums=(0, 4))
def _order_on_cpu(seed, epoch, shard, count, size):
  return batching.shard_order(seed, epoch, shard, count, size)


class HostFeed:
  """A split in host memory; each chunk's raw rows are gathered here and transferred."""
  source = "host"

  def __init__(self, inputs: np.ndarray, labels: np.ndarray, mesh: Mesh, seed: int,
               dtype=jnp.float32):
    self.layout = ShardLayout.of(len(labels), mesh.devices.size)
    self.mesh, self.seed, self.dtype = mesh, seed, dtype
    self.local = _local_shards(mesh)
    self.x = self.layout.shard(np.asarray(inputs))[self.local]
    self.y = self.layout.shard(np.asarray(labels, np.int32))[self.local]
    self.nbytes = int(self.x.nbytes + self.y.nbytes)

  def chunk_data(self, epoch: int, first: int, num_steps: int, local_batch: int) -> dict:
    """Raw rows of batches [first, first + num_steps) of `epoch`, as (num_steps, B, ...)."""
    xs, ys = [], []
    for j, d in enumerate(self.local):
      order = _host_order(self.seed, epoch, d, self.layout.counts[d], self.layout.size)
      rows = order[first * local_batch:(first + num_steps) * local_batch]
      rows = rows.reshape(num_steps, local_batch)
      xs.append(self.x[j][rows])
      ys.append(self.y[j][rows])
    x = np.concatenate(xs, axis=1).astype(self.dtype)
    y = np.concatenate(ys, axis=1)
    return {"x": _put(x, self.mesh, parallel.STACKED), "y": _put(y, self.mesh, parallel.STACKED)}

  def eval_batch(self, index: int, local_batch: int) -> dict:
    """Rows [index*lb, (index+1)*lb) of every local shard, with `valid` marking real rows."""
    rows = index * local_batch + np.arange(local_batch)
    xs, valid = [], []
    for j, d in enumerate(self.local):
      xs.append(self.x[j][np.minimum(rows, self.layout.size - 1)])
      valid.append(rows < self.layout.counts[d])
    return {"x": _put(np.concatenate(xs).astype(self.dtype), self.mesh, parallel.BATCH),
            "valid": _put(np.concatenate(valid), self.mesh, parallel.BATCH)}


def device_memory_bytes() -> int | None:
  """The first local device's memory, if the backend tells it (GPUs and TPUs do)."""
  try:
    stats = jax.local_devices()[0].memory_stats() or {}
  except Exception:  # pylint: disable=broad-except
    return None
  return stats.get("bytes_limit")


def choose(requested: str, nbytes: int, share: float) -> tuple[str, str]:
  """('device' or 'host', why) for a split of `nbytes` on this process's devices.

  'auto' picks the device feed when the split's per-device shard fits `share` of
  one device's memory, or on CPUs (where device memory is host memory); else host.
  """
  if requested not in FEEDS:
    raise ValueError(f"data.feed must be one of {FEEDS}, got {requested!r}")
  if requested != "auto":
    return requested, "as configured"
  backend = jax.default_backend()
  if backend == "cpu":
    return "device", "CPU backend: the arrays stay in host memory either way"
  limit = device_memory_bytes()
  per_device = nbytes / max(jax.local_device_count(), 1)
  if limit is None:
    return "device", f"{backend} memory size unknown; {per_device / 2**30:.2f} GiB per device"
  if per_device <= share * limit:
    return "device", (f"{per_device / 2**30:.2f} GiB per device fits {share:.0%} of "
                      f"{limit / 2**30:.1f} GiB")
  return "host", (f"{per_device / 2**30:.2f} GiB per device exceeds {share:.0%} of "
                  f"{limit / 2**30:.1f} GiB")


def make(kind: str, inputs: np.ndarray, labels: np.ndarray, mesh: Mesh, seed: int,
         dtype=jnp.float32) -> Any:
  """A `DeviceFeed` or `HostFeed` of (inputs, labels)."""
  if kind == "device":
    return DeviceFeed(inputs, labels, mesh, dtype)
  if kind == "host":
    return HostFeed(inputs, labels, mesh, seed, dtype)
  raise ValueError(f"feed must be 'device' or 'host', got {kind!r}")


def log_choice(kind: str, why: str, what: str) -> None:
  """The training feed's choice in the log; the feature passes' and the online probe's at
  verbosity 1 (`-v 1`)."""
  log = (lambda *a: logging.vlog(1, *a)) if what.endswith("features") or \
      what == "online probe" else logging.info
  log("feed for %s: %s (%s)", what, kind, why)
