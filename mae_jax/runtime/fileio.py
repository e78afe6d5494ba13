"""Atomic file writes: a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator


def write_atomic(path: str | os.PathLike[str], write: Callable[[BinaryIO], Any]) -> None:
  """Calls `write(f)` on a hidden temporary file beside `path`, syncs it, renames it."""
  path = Path(path)
  tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
  try:
    with open(tmp, "wb") as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if tmp.exists():
      tmp.unlink()


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
  """Writes `obj` as indented JSON, atomically."""
  data = (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode()
  write_atomic(path, lambda f: f.write(data))


def read_json(path: str | os.PathLike[str]) -> Any:
  return json.loads(Path(path).read_text())


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike[str]) -> Iterator[None]:
  """An exclusive advisory lock on `path` (created if needed), released on exit or death."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "a+") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)
