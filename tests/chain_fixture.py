"""The tiny chain's behaviour, summarised: what a redesign must leave unchanged.

  python tests/chain_fixture.py --record   # writes tests/fixtures/tiny_chain.json

Runs, in subprocesses of `main.py` on a freshly simulated tiny folder: the tiny pipeline
(data, pretrain, probe, fine-tune, report), `predict` on the simulated folder, a tiny
pretraining with the high-pass recipe (MSE on every patch's high-pass part, normalised
per patch), and the Hugging Face export of both pretrainings and of the fine-tuned
encoder. The summary holds, per stage, a SHA-256 of every param leaf (and its float64 sum
and L2 norm, for machines whose XLA rounds differently), every number of each
`eval_metrics.json`, the predictions file's hash and every exported tensor's hash.

`tests/test_behaviour_fixture.py` runs the same chain and compares it with the fixture
recorded before the library was reorganised.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "tiny_chain.json"
HIGHPASS = ("--config.loss.type=mse", "--config.loss.norm_pix=True",
            "--config.loss.masked_only=False", "--config.loss.target=highpass")
# Keys of eval_metrics.json that describe the run, not its numbers.
NOT_NUMBERS = ("feed", "seconds", "wall")


def _run(*args: str) -> None:
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
  env.pop("XLA_FLAGS", None)
  result = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
  if result.returncode:
    raise RuntimeError(f"{' '.join(args)} failed:\n{result.stderr[-4000:]}")


def run_chain(work: Path) -> None:
  """The tiny chain in `work` (see the module docstring)."""
  data = [f"--config.data.dir={work / 'sim'}", f"--config.data.cache_dir={work / 'cache'}",
          "--config.data.sim.workers=1"]
  main = str(ROOT / "main.py")
  _run(main, "--config=configs/pipeline.py:tiny", f"--workdir={work / 'pipe'}", *data)
  _run(main, "--config=configs/predict.py:tiny", f"--workdir={work / 'predict'}",
       f"--config.input={work / 'sim'}", f"--config.model_dir={work / 'pipe'}")
  _run(main, "--config=configs/pretrain.py:tiny", f"--workdir={work / 'highpass'}", *data,
       *HIGHPASS)
  export = ["-m", "mae_jax.stages.export"]
  _run(*export, f"--workdir={work / 'pipe' / 'pretrain'}", f"--out={work / 'hf_mae'}")
  _run(*export, f"--workdir={work / 'highpass'}", f"--out={work / 'hf_highpass'}")
  _run(*export, f"--workdir={work / 'pipe' / 'finetune'}", f"--out={work / 'hf_encoder'}",
       "--encoder_only")


def _leaf_summary(tree: Any, prefix: str = "") -> dict[str, dict]:
  out = {}
  if isinstance(tree, dict):
    for k in sorted(tree):
      out.update(_leaf_summary(tree[k], f"{prefix}/{k}" if prefix else str(k)))
    return out
  a = np.asarray(tree)
  return {prefix: {"sha256": hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest(),
                   "shape": list(a.shape), "sum": float(a.astype(np.float64).sum()),
                   "l2": float(np.sqrt(np.square(a.astype(np.float64)).sum()))}}


def _checkpoint_params(folder: Path, best: bool = False) -> tuple[int, dict]:
  """(step, params) of the newest checkpoint in `folder` (with `best`: of the epoch the
  stage chose on validation), read by orbax without a target."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from mae_jax.runtime import checkpoint  # pylint: disable=g-import-not-at-top
  if best:
    step = checkpoint.ranked_steps(folder)[0]
  else:
    step = max(int(p.name) for p in folder.iterdir() if p.name.isdigit())
  path = folder / str(step)
  item = path / "state" if (path / "state").exists() else path / "default"
  state = ocp.StandardCheckpointer().restore(item.absolute())
  return step, state["params"]


def _numbers(tree: Any, prefix: str = "") -> dict[str, Any]:
  """Every number (and None) of a JSON tree, by its `/`-joined path."""
  out = {}
  if isinstance(tree, dict):
    for k, v in tree.items():
      if k not in NOT_NUMBERS:
        out.update(_numbers(v, f"{prefix}/{k}" if prefix else str(k)))
  elif isinstance(tree, list):
    for i, v in enumerate(tree):
      out.update(_numbers(v, f"{prefix}/{i}"))
  elif tree is None or isinstance(tree, (int, float)):
    out[prefix] = tree
  return out


def _safetensors(path: Path) -> dict[str, str]:
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  return {k: hashlib.sha256(np.ascontiguousarray(v).tobytes()).hexdigest()
          for k, v in sorted(load_file(str(path)).items())}


def summarise(work: Path) -> dict[str, Any]:
  """The summary of a chain run by `run_chain` in `work`."""
  out: dict[str, Any] = {"params": {}, "eval_metrics": {}, "export": {}}
  stages = {"pretrain": work / "pipe" / "pretrain" / "checkpoints",
            "highpass": work / "highpass" / "checkpoints",
            "probe": work / "pipe" / "probe" / "checkpoints",
            "probe_best": work / "pipe" / "probe" / "checkpoints",
            "finetune": work / "pipe" / "finetune" / "checkpoints",
            "finetune_best": work / "pipe" / "finetune" / "checkpoints"}
  for name, folder in stages.items():
    step, params = _checkpoint_params(folder, best=name.endswith("_best"))
    out["params"][name] = {"step": step, "leaves": _leaf_summary(params)}
  for name in ("probe", "finetune"):
    metrics = json.loads((work / "pipe" / name / "eval_metrics.json").read_text())
    out["eval_metrics"][name] = _numbers(metrics)
  out["predict"] = {
      "predictions_sha256": hashlib.sha256(
          (work / "predict" / "predictions.csv").read_bytes()).hexdigest(),
      "metrics": _numbers(json.loads((work / "predict" / "metrics.json").read_text()))}
  for name in ("hf_mae", "hf_highpass", "hf_encoder"):
    out["export"][name] = _safetensors(work / name / "model.safetensors")
  return out


def machine() -> dict[str, str]:
  """What decides XLA's CPU rounding: the library versions and the CPU's vector units."""
  import jax  # pylint: disable=g-import-not-at-top
  flags = ""
  try:
    info = Path("/proc/cpuinfo").read_text()
    flags = next((l for l in info.splitlines() if l.startswith("flags")), "")
  except OSError:
    pass
  vector = sorted(f for f in flags.split() if f.startswith(("avx", "fma", "amx", "sse4")))
  return {"jax": jax.__version__, "machine": platform.machine(), "vector_units": " ".join(vector)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--record", action="store_true", help=f"write {FIXTURE}")
  parser.add_argument("--work", default="/tmp/mae_jax_tiny_chain")
  args = parser.parse_args()
  work = Path(args.work)
  if work.exists():
    raise SystemExit(f"{work} exists: remove it or pass another --work")
  run_chain(work)
  summary = {"machine": machine(), **summarise(work)}
  if args.record:
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    FIXTURE.write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    print(f"wrote {FIXTURE}")
  else:
    print(json.dumps(summary, indent=1, sort_keys=True))


if __name__ == "__main__":
  main()
