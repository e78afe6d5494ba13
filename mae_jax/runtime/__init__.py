"""Devices and data parallelism, multi-process runs, orbax checkpoints, workdirs, atomic
files, crash points for tests, the project's error types. Imports only JAX-side libraries."""
