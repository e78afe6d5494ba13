"""Predicting on new `.npy` files with a fine-tuned checkpoint (mae_jax/stages/predict.py)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import finetune as finetune_config
from configs import predict as predict_config
from mae_jax.data import layout
from mae_jax.data import npy_io
from mae_jax.eval import evaluators
from mae_jax.eval import metrics as metrics_lib
from mae_jax.models import build
from mae_jax.models import heads
from mae_jax.runtime import checkpoint
from mae_jax.runtime import errors
from mae_jax.runtime import fileio
from mae_jax.runtime import parallel
from mae_jax.runtime import workdir as workdir_lib
from mae_jax.stages import classify
from mae_jax.stages import predict
from mae_jax.train import steps
from tests import conftest

ROOT = Path(__file__).resolve().parents[1]
SIZE = 32


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
  """A pipeline-like workdir whose finetune/ holds a best checkpoint of a tiny classifier."""
  run = tmp_path_factory.mktemp("pipeline") / "finetune"
  config = finetune_config.get_config("tiny")
  config.model.image_size = SIZE   # patch 16: a 2x2 grid
  model = build.build_classifier(config.model, 3, parallel.AXIS)
  params, stats = build.init_classifier(model, jax.random.key(7))
  # Non-trivial BatchNorm statistics, so inference mode is really what is tested.
  stats = jax.tree.map(lambda x: x + 0.3, stats)
  state = steps.ClassifierState.create(apply_fn=model.apply, params=params,
                                          tx=optax.sgd(0.1), batch_stats=stats)
  mngr = checkpoint.manager(run, 1, folder="best_checkpoint")
  checkpoint.save(mngr, 5, state)
  checkpoint.seal(mngr)
  mngr.close()
  fileio.write_json_atomic(run / "config.json", config.to_dict())
  return run, model, params, stats


def _folder(root: Path) -> Path:
  """DeepLense layout, 4 images per class, plus a truncated file and one of another size."""
  conftest.write_folder(root, per_class=4, size=SIZE)
  broken = root / "cdm" / "broken.npy"
  np.save(broken, np.zeros((SIZE, SIZE)))
  broken.write_bytes(broken.read_bytes()[:100])
  npy_io.write_lens_file(root / "axion" / "big.npy", np.ones((48, 48)), axion_mass=1e-23)
  return root


def _expected_probs(model, params, stats, paths):
  """Class probabilities computed here, without mae_jax.predict (numpy min-max)."""
  images = np.stack([npy_io.read_lens_file(p).image for p in paths]).astype(np.float32)
  lo = images.min(axis=(1, 2), keepdims=True)
  hi = images.max(axis=(1, 2), keepdims=True)
  x = ((images - lo) / (hi - lo))[..., None]
  logits = model.apply({"params": params, "batch_stats": stats}, jnp.asarray(x))["logits"]
  return metrics_lib.softmax(np.asarray(logits, np.float64))


def _read_csv(path: Path) -> list[dict]:
  with open(path, newline="", encoding="utf-8") as f:
    return list(csv.DictReader(f))


def _config(**kw):
  config = predict_config.get_config()
  config.update(kw)
  return config


def test_layout_folder_with_a_bad_file(finetuned, tmp_path):
  run, model, params, stats = finetuned
  data = _folder(tmp_path / "new")
  out = tmp_path / "out"
  # A pipeline workdir (its finetune/ is found) and batches of 8 (two, the last padded).
  summary = predict.run(_config(input=str(data), model_dir=str(run.parent), batch_size=8),
                            str(out))
  assert summary["files"] == 14 and summary["classified"] == 12 and summary["bad_files"] == 2
  assert summary["checkpoint_step"] == 5

  rows = _read_csv(out / "predictions.csv")
  assert list(rows[0]) == ["file", "predicted_class", "p_no_sub", "p_cdm", "p_axion",
                           "true_class"]
  good = [p for name in layout.CLASS_NAMES for p in sorted((data / name).glob("*.npy"))
          if p.name not in ("broken.npy", "big.npy")]
  assert [r["file"] for r in rows] == [f"{p.parent.name}/{p.name}" for p in good]
  assert [r["true_class"] for r in rows] == [p.parent.name for p in good]
  probs = np.array([[float(r[f"p_{c}"]) for c in layout.CLASS_NAMES] for r in rows])
  expected = _expected_probs(model, params, stats, good)
  np.testing.assert_allclose(probs, expected, atol=2e-6)
  assert [r["predicted_class"] for r in rows] == [layout.CLASS_NAMES[i]
                                                  for i in expected.argmax(1)]

  bad = (out / "bad_files.tsv").read_text().splitlines()
  assert bad[0] == "file\tdefect" and len(bad) == 3
  assert bad[1].startswith("axion/big.npy\timage size 48x48 differs from the model's 32x32")
  assert bad[2].startswith("cdm/broken.npy\tnot a valid .npy file")

  labels = np.array([layout.CLASS_NAMES.index(p.parent.name) for p in good])
  metrics = json.loads((out / "metrics.json").read_text())
  reference = evaluators.evaluate(expected, labels, evaluators.DEFAULT_EVALS)
  for key in ("micro_auc", "macro_auc", "accuracy"):
    assert metrics[key] == pytest.approx(reference[key], abs=1e-9)
  assert metrics["confusion_matrix"] == reference["confusion_matrix"]
  lo, hi = metrics["intervals"]["macro_auc"]
  assert lo <= metrics["macro_auc"] <= hi
  for fig in ("roc.png", "confusion.png"):
    assert (out / "plots" / fig).read_bytes()[:4] == b"\x89PNG"


def test_flat_folder_has_no_labels(finetuned, tmp_path):
  run, model, params, stats = finetuned
  data = _folder(tmp_path / "new")
  flat = tmp_path / "flat"
  flat.mkdir()
  files = sorted((data / "no_sub").glob("*.npy"))[:2] + sorted((data / "axion").glob("*.npy"))[:1]
  for p in files:
    shutil.copy(p, flat / p.name)
  out = tmp_path / "out"
  summary = predict.run(_config(input=str(flat), model_dir=str(run)), str(out))
  rows = _read_csv(out / "predictions.csv")
  assert list(rows[0]) == ["file", "predicted_class", "p_no_sub", "p_cdm", "p_axion"]
  assert sorted(r["file"] for r in rows) == sorted(p.name for p in files)
  assert summary["metrics"] is None and not (out / "metrics.json").exists()
  by_name = {r["file"]: r for r in rows}
  expected = _expected_probs(model, params, stats, [flat / p.name for p in files])
  for p, e in zip(files, expected):
    got = [float(by_name[p.name][f"p_{c}"]) for c in layout.CLASS_NAMES]
    np.testing.assert_allclose(got, e, atol=2e-6)
  assert (out / "bad_files.tsv").read_text() == "file\tdefect\n"


def test_a_probe_is_rebuilt_with_the_feature_it_chose(finetuned, tmp_path):
  """predict reads a probe's feature_choice.json, not a config rewritten to hold it."""
  run = tmp_path / "probe"
  shutil.copytree(finetuned[0], run)
  model = predict.load_model(run)[0]
  assert (model.feature_block, model.pool) == (-1, "cls")   # the config's
  fileio.write_json_atomic(run / workdir_lib.FEATURES_FILE, {"chosen": "block0_mean",
                                                             "block": 0, "pool": "mean"})
  model = predict.load_model(run)[0]
  assert classify.read_feature_choice(run) == heads.FeatureChoice(0, "mean")
  assert (model.feature_block, model.pool) == (0, "mean")


def test_missing_inputs_and_models_are_explained(finetuned, tmp_path):
  run, *_ = finetuned
  with pytest.raises(layout.LayoutError, match="does not exist"):
    predict.list_inputs(tmp_path / "nowhere")
  (tmp_path / "empty").mkdir()
  with pytest.raises(layout.LayoutError, match="no .npy file"):
    predict.list_inputs(tmp_path / "empty")
  with pytest.raises(errors.MissingCheckpointError,
                     match="configs/pipeline.py:demo --workdir="):
    predict.find_model(tmp_path)
  assert predict.find_model(run.parent) == run


@pytest.mark.slow
def test_predict_through_main(finetuned, tmp_path):
  run, *_ = finetuned
  data = _folder(tmp_path / "new")
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
  result = subprocess.run(
      [sys.executable, str(ROOT / "main.py"), "--config=configs/predict.py",
       f"--workdir={tmp_path / 'out'}", f"--config.input={data}", f"--config.model_dir={run}"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "bad file cdm/broken.npy" in result.stderr and "Traceback" not in result.stderr
  assert len(_read_csv(tmp_path / "out" / "predictions.csv")) == 12
  missing = subprocess.run(
      [sys.executable, str(ROOT / "main.py"), "--config=configs/predict.py",
       f"--workdir={tmp_path / 'out2'}", f"--config.input={data}",
       f"--config.model_dir={tmp_path / 'none'}"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert missing.returncode != 0 and "no fine-tuned model in" in missing.stderr
  assert "Traceback" not in missing.stderr
