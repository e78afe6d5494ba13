"""End-to-end runs of main.py (subprocesses) on tiny simulated data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mae_jax.data import simulate
from mae_jax.eval import plots
from mae_jax.runtime import checkpoint

ROOT = Path(__file__).resolve().parents[1]


def _main(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
  return subprocess.run([sys.executable, str(ROOT / "main.py"), *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_data_stage_simulates_prepares_and_reports(tmp_path):
  data = tmp_path / "sim"
  args = ["--config=configs/data.py:tiny", f"--workdir={tmp_path / 'run'}",
          f"--config.data.dir={data}", f"--config.data.cache_dir={tmp_path / 'cache'}",
          "--config.data.sim.workers=1", "--config.batch_size=16"]
  result = _main(*args)
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.loads((tmp_path / "run" / "data_summary.json").read_text())
  assert summary["image_shape"] == [64, 64]
  per_class = {c: sum(summary["counts"][s][c] for s in ("train", "validation", "test"))
               for c in ("no_sub", "cdm", "axion")}
  assert per_class == {"no_sub": 24, "cdm": 24, "axion": 24}
  assert all(sum(summary["counts"][s].values()) > 0 for s in ("validation", "test"))
  assert summary["device_feed_augmented_images_per_s"] > 0
  png = tmp_path / "run" / "plots" / "samples.png"
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert json.loads((data / "simulation.json").read_text())["complete"] is True
  # A second run finds the folder complete and its splits prepared (no file is read again).
  again = _main(*args)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "simulating" not in again.stderr and "checking" not in again.stderr


@pytest.mark.slow
def test_missing_deeplense_folder_explains_layout(tmp_path):
  result = _main("--config=configs/data.py:tiny", f"--workdir={tmp_path / 'run'}",
                 "--config.data.source=deeplense", f"--config.data.dir={tmp_path / 'none'}",
                 f"--config.data.cache_dir={tmp_path / 'cache'}")
  assert result.returncode != 0
  assert "does not exist" in result.stderr
  assert "python -m mae_jax.data.simulate --out" in result.stderr
  assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_bad_files_are_listed(tmp_path):
  data = tmp_path / "src"
  simulate.generate(data, per_class=3, workers=1, progress=False)
  trunc = data / "cdm" / "broken.npy"
  np.save(trunc, np.zeros((64, 64)))
  trunc.write_bytes(trunc.read_bytes()[:200])
  nan = data / "no_sub" / "nan.npy"
  np.save(nan, np.full((64, 64), np.nan))
  common = ["--config=configs/data.py:tiny", "--config.data.source=deeplense",
            f"--config.data.dir={data}", f"--config.data.cache_dir={tmp_path / 'cache'}",
            "--config.batch_size=4"]
  result = _main(*common, f"--workdir={tmp_path / 'run'}")
  assert result.returncode != 0
  assert "2 bad file(s)" in result.stderr
  assert f"{trunc}: truncated" in result.stderr and f"{nan}: 4096 non-finite" in result.stderr
  skipped = _main(*common, f"--workdir={tmp_path / 'run2'}", "--config.data.on_bad_file=skip")
  assert skipped.returncode == 0, skipped.stderr[-3000:]
  summary = json.loads((tmp_path / "run2" / "data_summary.json").read_text())
  assert summary["bad_files"] == 2
  report = Path(summary["bad_files_report"]).read_text()
  assert str(trunc) in report and str(nan) in report


@pytest.mark.slow
def test_misspelled_config_key_fails(tmp_path):
  result = _main("--config=configs/data.py:tiny", f"--workdir={tmp_path}",
                 "--config.data.validaton_fraction=0.2")
  assert result.returncode != 0
  assert "validaton_fraction" in result.stderr


def test_sample_grid_cli(tmp_path):
  data = tmp_path / "src"
  simulate.generate(data, per_class=2, workers=1, progress=False)
  out = tmp_path / "grid.png"
  plots.main(["samples", "--data", str(data), "--out", str(out), "--per_class", "2"])
  assert out.read_bytes()[:4] == b"\x89PNG"


def _pretrain_args(tmp_path: Path, *extra: str) -> list[str]:
  return ["--config=configs/pretrain.py:tiny", f"--workdir={tmp_path / 'run'}",
          f"--config.data.dir={tmp_path / 'sim'}", f"--config.data.cache_dir={tmp_path / 'cache'}",
          "--config.data.sim.workers=1", *extra]


@pytest.mark.slow
def test_pretrain_writes_checkpoints_events_figures_and_resumes(tmp_path):
  run = tmp_path / "run"
  first = _main(*_pretrain_args(tmp_path))
  assert first.returncode == 0, first.stderr[-3000:]
  history = json.loads((run / "history.json").read_text())
  assert [h["epoch"] for h in history] == [1, 2] and [h["phase"] for h in history] == [1, 2]
  steps = history[-1]["step"]
  assert sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == [steps // 2, steps]
  assert list(run.glob("events.out.tfevents.*"))
  for fig in ("loss_curve.png", "reconstructions.png"):
    assert (run / "plots" / fig).read_bytes()[:4] == b"\x89PNG"
  assert all(np.isfinite(h["val_loss"]) for h in history)

  again = _main(*_pretrain_args(tmp_path))
  assert again.returncode == 0, again.stderr[-3000:]
  assert f"resuming from checkpoint step {steps}" in again.stderr
  assert json.loads((run / "history.json").read_text()) == history  # nothing retrained

  longer = _main(*_pretrain_args(tmp_path, "--config.phase_epochs=(1, 2)"))
  assert longer.returncode == 0, longer.stderr[-3000:]
  assert f"resuming from checkpoint step {steps}" in longer.stderr
  extended = json.loads((run / "history.json").read_text())
  assert extended[:2] == history and extended[2]["epoch"] == 3
  assert (run / "checkpoints" / str(extended[2]["step"])).is_dir()


@pytest.mark.slow
def test_pretrain_micro_batches_train_as_the_whole_batch(tmp_path):
  """The stage with micro-batches of 2 (4 per step of batch 8) follows the whole-batch run."""
  losses = {}
  for micro in (0, 2):
    run = tmp_path / f"run{micro}"
    result = _main(*_pretrain_args(tmp_path, f"--config.micro_batch.cpu={micro}"),
                   f"--workdir={run}")
    assert result.returncode == 0, result.stderr[-3000:]
    history = json.loads((run / "history.json").read_text())
    losses[micro] = [(h["train_loss"], h["val_loss"]) for h in history]
  np.testing.assert_allclose(losses[2], losses[0], rtol=1e-4)


@pytest.mark.slow
def test_pretrain_divergence_stops_with_a_message(tmp_path):
  # Batch 4: 3 steps in the first epoch, so the run diverges before its first checkpoint.
  result = _main(*_pretrain_args(tmp_path, "--config.optim.lr=1e30", "--config.batch_size=4",
                                 "--config.eval_batch_size=4", "--config.optim.warmup_epochs=0"))
  assert result.returncode != 0
  assert "non-finite" in result.stderr and "at step" in result.stderr
  assert "Traceback" not in result.stderr
  ckpts = tmp_path / "run" / "checkpoints"
  assert not ckpts.exists() or not any(p.name.isdigit() for p in ckpts.iterdir())


@pytest.mark.slow
def test_pretrain_probe_finetune_chain(tmp_path):
  data = [f"--config.data.dir={tmp_path / 'sim'}", f"--config.data.cache_dir={tmp_path / 'cache'}",
          "--config.data.sim.workers=1"]
  pre, probe, fine = tmp_path / "pre", tmp_path / "probe", tmp_path / "fine"
  result = _main("--config=configs/pretrain.py:tiny", f"--workdir={pre}", *data)
  assert result.returncode == 0, result.stderr[-3000:]

  missing = _main("--config=configs/probe.py:tiny", f"--workdir={probe}",
                  f"--config.init_from={tmp_path / 'nowhere'}", *data)
  assert missing.returncode != 0 and "no checkpoint in" in missing.stderr
  assert "python main.py --config=configs/pretrain.py:tiny" in missing.stderr

  result = _main("--config=configs/probe.py:tiny", f"--workdir={probe}",
                 f"--config.init_from={pre}", *data)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "frozen encoder: cached features, head only" in result.stderr
  assert f"initialised from {pre}" in result.stderr

  result = _main("--config=configs/finetune.py:tiny", f"--workdir={fine}",
                 f"--config.init_from={probe}", "--config.init_from_stage=probe",
                 "--config.dont_load=()", *data)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "fresh: none" in result.stderr  # the probe's head was kept

  for run in (probe, fine):
    metrics = json.loads((run / "eval_metrics.json").read_text())
    assert metrics["split"] == "test" and set(metrics["auc"]) == {"no_sub", "cdm", "axion"}
    for key in ("micro_auc", "macro_auc", "accuracy", "confusion_matrix", "step", "intervals",
                "final_epoch", "validation"):
      assert key in metrics
    history = json.loads((run / "history.json").read_text())
    # The epoch is validation's choice; the reported numbers are the test split's.
    best = max(history, key=lambda h: h["val_macro_auc"])
    assert metrics["epoch"] == best["epoch"] and metrics["step"] == best["step"]
    assert metrics["validation"]["macro_auc"] == best["val_macro_auc"]
    assert metrics["final_epoch"]["epoch"] == history[-1]["epoch"]
    lo, hi = metrics["intervals"]["macro_auc"]
    assert lo <= metrics["macro_auc"] <= hi
    assert sum(map(sum, metrics["confusion_matrix"])) == metrics["num_examples"] == \
        metrics["test_examples"]
    for fig in ("roc.png", "confusion.png", "loss_curve.png"):
      assert (run / "plots" / fig).read_bytes()[:4] == b"\x89PNG"
    assert checkpoint.ranked_steps(run / "checkpoints")[0] == metrics["step"]   # kept

  wrong = _main("--config=configs/finetune.py:tiny", f"--workdir={tmp_path / 'wrong'}",
                f"--config.init_from={pre}", "--config.model.dim=64", *data)
  assert wrong.returncode != 0 and "Traceback" not in wrong.stderr
  assert "used model.dim=32, this one model.dim=64" in wrong.stderr


class _Evil:
  """Unpickling this would run a shell command (it must never be unpickled)."""

  def __init__(self, marker: Path):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


@pytest.mark.slow
def test_bad_data_end_to_end(tmp_path):
  """A malicious pickle, a truncated file, a 150x150 image and an all-NaN image: one
  message naming each; with on_bad_file=skip the stage trains on the rest."""
  data, marker = tmp_path / "src", tmp_path / "PWNED"
  simulate.generate(data, per_class=24, workers=1, progress=False)
  evil = data / "axion" / "evil.npy"
  arr = np.empty(2, dtype=object)
  arr[0], arr[1] = _Evil(marker), 1e-23
  np.save(evil, arr, allow_pickle=True)
  trunc = data / "cdm" / "truncated.npy"
  np.save(trunc, np.zeros((64, 64)))
  trunc.write_bytes(trunc.read_bytes()[:300])
  big = data / "cdm" / "big.npy"
  np.save(big, np.random.default_rng(0).uniform(size=(150, 150)))
  nan = data / "no_sub" / "nan.npy"
  np.save(nan, np.full((64, 64), np.nan))
  common = ["--config=configs/pretrain.py:tiny", "--config.data.source=deeplense",
            f"--config.data.dir={data}", f"--config.data.cache_dir={tmp_path / 'cache'}"]
  result = _main(*common, f"--workdir={tmp_path / 'run'}")
  assert result.returncode != 0 and "Traceback" not in result.stderr
  assert "error: 4 bad file(s)" in result.stderr
  for path, defect in ((evil, "refused to load global"), (trunc, "truncated"),
                       (big, "150x150"), (nan, "4096 non-finite")):
    line = next((l for l in result.stderr.splitlines() if str(path) in l), "")
    assert defect in line, (path, defect, result.stderr[-2000:])
  assert not (tmp_path / "run" / "checkpoints").exists()

  skipped = _main(*common, f"--workdir={tmp_path / 'run2'}", "--config.data.on_bad_file=skip")
  assert skipped.returncode == 0, skipped.stderr[-3000:]
  assert json.loads((tmp_path / "run2" / "pretrain_summary.json").read_text())["steps"] > 0
  reports = list((tmp_path / "cache").rglob("bad_files.tsv"))
  listed = "".join(r.read_text() for r in reports)
  assert all(str(p) in listed for p in (evil, trunc, big, nan))
  assert not marker.exists()


@pytest.mark.slow
def test_chain_runs_where_tensorflow_tfds_and_clu_cannot_be_imported(tmp_path):
  """The device feed and the safe reader need no TensorFlow: with an import hook refusing
  tensorflow, tensorflow_datasets and clu, the tiny pretrain -> probe -> fine-tune chain
  writes its checkpoints, history, figures, metrics and TensorBoard events."""
  driver = str(ROOT / "tests" / "no_tensorflow_run.py")
  data = [f"--config.data.dir={tmp_path / 'sim'}", f"--config.data.cache_dir={tmp_path / 'cache'}",
          "--config.data.sim.workers=1", "--config.data.feed=device"]
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}

  def run(*args):
    result = subprocess.run([sys.executable, driver, *args, *data], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result

  pre, probe, fine = tmp_path / "pre", tmp_path / "probe", tmp_path / "fine"
  run("--config=configs/pretrain.py:tiny", f"--workdir={pre}")
  run("--config=configs/probe.py:tiny", f"--workdir={probe}", f"--config.init_from={pre}")
  result = run("--config=configs/finetune.py:tiny", f"--workdir={fine}",
               f"--config.init_from={pre}")
  assert "feed for finetune: device" in result.stderr
  for workdir, files in ((pre, ("pretrain_summary.json", "plots/reconstructions.png")),
                         (probe, ("eval_metrics.json", "plots/roc.png")),
                         (fine, ("eval_metrics.json", "plots/roc.png", "plots/confusion.png"))):
    for name in ("history.json", "config.json", "plots/loss_curve.png", *files):
      assert (workdir / name).exists(), workdir / name
    assert list((workdir / "checkpoints").iterdir())
    assert list(workdir.glob("events.out.tfevents.*")), "TensorBoard events without TensorFlow"
    lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert any("train_loss" in l.get("scalars", {}) for l in lines)
  metrics = json.loads((fine / "eval_metrics.json").read_text())
  assert metrics["split"] == "test" and metrics["feed"] == "device"
