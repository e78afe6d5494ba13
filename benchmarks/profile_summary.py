"""Where the time goes: the top operations of a `jax.profiler` trace, by total duration.

  python benchmarks/profile_summary.py runs/pretrain/profile [--top 15] [--json out.json]

Reads the newest `*.xplane.pb` under the folder (as written by a stage's
`profile_steps`, or any `jax.profiler.trace`), and for each device plane (GPU or
TPU streams; the host's XLA threads on a CPU) sums the durations of the events by
name: kernels and XLA ops. Prints each plane's busy time and its top operations
with their share. Needs only JAX (`jax.profiler.ProfileData`).
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

from jax import profiler


def newest_trace(folder: Path) -> Path:
  traces = sorted(folder.rglob("*.xplane.pb"), key=lambda p: p.stat().st_mtime)
  if not traces:
    raise SystemExit(f"error: no *.xplane.pb trace under {folder}")
  return traces[-1]


def summarise(path: Path, top: int = 15) -> list[dict]:
  """Per plane with events: {plane, busy_ms, events, top: [{name, ms, share, count}]}."""
  data = profiler.ProfileData.from_file(str(path))
  out = []
  for plane in data.planes:
    name = plane.name
    device = name.startswith("/device:")
    host_xla = name.startswith("/host:CPU")
    if not (device or host_xla):
      continue
    totals: dict[str, float] = collections.defaultdict(float)
    counts: dict[str, int] = collections.Counter()
    for line in plane.lines:
      if host_xla and "XLA" not in line.name and "tf_" not in line.name.lower():
        continue
      for event in line.events:
        totals[event.name] += event.duration_ns
        counts[event.name] += 1
    busy = sum(totals.values())
    if not busy:
      continue
    ranked = sorted(totals.items(), key=lambda kv: -kv[1])[:top]
    out.append({"plane": name, "busy_ms": busy / 1e6, "events": sum(counts.values()),
                "top": [{"name": n, "ms": t / 1e6, "share": t / busy, "count": counts[n]}
                        for n, t in ranked]})
  return out


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("folder", help="a trace folder (e.g. WORKDIR/profile)")
  parser.add_argument("--top", type=int, default=15)
  parser.add_argument("--json", default=None, help="also write the summary here")
  args = parser.parse_args(argv)
  path = newest_trace(Path(args.folder))
  planes = summarise(path, args.top)
  print(f"trace {path}")
  for p in planes:
    print(f"{p['plane']}: {p['busy_ms']:.1f} ms busy in {p['events']} events; top operations:")
    for t in p["top"]:
      print(f"  {100 * t['share']:5.1f}%  {t['ms']:9.2f} ms  x{t['count']:<6} {t['name'][:100]}")
  if not planes:
    print("no device or XLA events in this trace", file=sys.stderr)
  if args.json:
    Path(args.json).write_text(json.dumps({"trace": str(path), "planes": planes}, indent=1))


if __name__ == "__main__":
  main()
