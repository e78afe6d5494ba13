"""Joining a multi-process run (several hosts, or several processes on one host).

JAX's multi-controller runtime is the engine: every process runs the same
program on its own devices and data slice, and collectives span all processes.
`jax.distributed.initialize` must run before anything touches a device.
"""

from __future__ import annotations

import os

import jax
from absl import logging

MODES = ("auto", "on", "off")


def cluster_env() -> str | None:
  """The multi-process launcher whose environment variables are set, if any."""
  env = os.environ
  if env.get("JAX_COORDINATOR_ADDRESS"):
    return "JAX_COORDINATOR_ADDRESS"
  if "SLURM_JOB_ID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
    return "SLURM"
  if "OMPI_MCA_orte_hnp_uri" in env and int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    return "Open MPI"
  if "," in env.get("TPU_WORKER_HOSTNAMES", "") or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return "Cloud TPU pod"
  return None


def initialize(mode: str = "auto", coordinator_address: str | None = None,
               num_processes: int | None = None, process_id: int | None = None) -> bool:
  """Joins the run's other processes when configured; returns whether it did.

  `auto` joins when an address or process count is given, or a cluster's
  environment is detected (SLURM, Open MPI, Cloud TPU pod, JAX_COORDINATOR_ADDRESS);
  `on` always calls `jax.distributed.initialize()` (JAX detects the rest);
  `off` never does. A single process (the default) initialises nothing.
  """
  if mode not in MODES:
    raise ValueError(f"distributed mode must be one of {MODES}, got {mode!r}")
  explicit = coordinator_address or num_processes or process_id is not None
  detected = cluster_env()
  if mode == "off" or (mode == "auto" and not explicit and not detected):
    return False
  jax.distributed.initialize(coordinator_address=coordinator_address or None,
                             num_processes=num_processes, process_id=process_id)
  logging.info("joined a run of %d processes (%s) as process %d: %d local of %d devices",
               jax.process_count(), detected or "explicit flags", jax.process_index(),
               jax.local_device_count(), jax.device_count())
  return True
