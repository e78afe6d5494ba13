"""Run by test_multihost.py in subprocesses.

  multihost_run.py multi PROCESS_ID PORT ROOT STAGE [main.py flags...]
      One process of a 2-process run (2 forced CPU devices each), joined through
      main.py's --coordinator_address flags; records every file this process
      opens for writing under ROOT/runs in ROOT/writes_<stage>_<id>.json.
  multihost_run.py single PORT ROOT STAGE [main.py flags...]
      The reference: one process with 4 devices. Batches depend on the device count
      only (each device's shard of the split is shuffled on its own), so it sees the
      global batches the two processes see together. It joins a one-process
      jax.distributed run, so its collectives are gloo's too, summing in the same
      order as across the two processes.
"""

import atexit
import json
import os
import runpy
import sys
from pathlib import Path

ROOT_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT_DIR))


def _record_writes(out: Path, under: Path) -> None:
  writes = set()

  def hook(event, args):
    if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
      path, mode, flags = (list(args) + [None, None])[:3]
      writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
          isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
      if writing and str(os.fsdecode(path)).startswith(str(under)):
        writes.add(os.fsdecode(path))
    elif event in ("os.rename", "os.replace", "os.mkdir"):
      target = os.fsdecode(args[1] if event != "os.mkdir" else args[0])
      if target.startswith(str(under)):
        writes.add(f"{event} {target}")

  sys.addaudithook(hook)
  atexit.register(lambda: out.write_text(json.dumps(sorted(writes))))


def main():
  mode = sys.argv[1]
  if mode == "multi":
    process_id, port, root, stage, *flags = sys.argv[2:]
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    flags += [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
              f"--process_id={process_id}"]
    _record_writes(Path(root) / f"writes_{stage}_{process_id}.json", Path(root) / "runs")
  else:
    port, root, stage, *flags = sys.argv[2:]
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    flags += [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=1", "--process_id=0"]
  sys.argv = [str(ROOT_DIR / "main.py"), *flags]
  os.chdir(ROOT_DIR)
  runpy.run_path(str(ROOT_DIR / "main.py"), run_name="__main__")


if __name__ == "__main__":
  main()
