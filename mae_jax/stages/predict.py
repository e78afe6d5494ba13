"""The `predict` stage: classify a folder of `.npy` images with the best
fine-tuned checkpoint.

  python main.py --config=configs/predict.py --workdir=runs/predict \
      --config.input=/path/to/folder --config.model_dir=runs/pipeline_demo

Files are read safely (`npy_io.read_lens_file`: no pickle code runs) and
min-max normalised exactly as in training; a file that fails is listed in
`bad_files.tsv`, and the others are still classified. Writes to the workdir:

- `predictions.csv`: file, predicted class, the three class probabilities (and
  the true class when the folder's layout tells it);
- `bad_files.tsv`: each unreadable file and why;
- with true labels: `metrics.json` (the fine-tune's own `evals`: per-class, micro and
  macro AUC, accuracy, confusion matrix, ..., with bootstrap intervals), `plots/roc.png`,
  `plots/confusion.png` and each evaluator's figure;
- `prediction_summary.json`.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
from pathlib import Path
from typing import Any, Iterator

import jax
import ml_collections
import numpy as np
from absl import logging
from tqdm import tqdm

from mae_jax.data import layout
from mae_jax.data import npy_io
from mae_jax.eval import evaluators
from mae_jax.eval import metrics as metrics_lib
from mae_jax.eval import plots
from mae_jax.models import build
from mae_jax.runtime import checkpoint
from mae_jax.runtime import errors
from mae_jax.runtime import fileio
from mae_jax.runtime import parallel
from mae_jax.runtime import workdir as workdir_lib
from mae_jax.stages import classify
from mae_jax.stages import registry
from mae_jax.train import batching
from mae_jax.train import steps

PREDICTIONS_FILE = "predictions.csv"
BAD_FILES = "bad_files.tsv"
METRICS_FILE = "metrics.json"
SUMMARY_FILE = "prediction_summary.json"
# Where fine-tunes before the BestN policy kept their chosen epoch (still read).
_LEGACY_BEST = workdir_lib.BEST_CHECKPOINT


@dataclasses.dataclass(frozen=True)
class InputFile:
  """One file to classify: where it is, its name in the outputs, its label if known."""
  path: Path
  name: str
  label: int | None


def list_inputs(input_path: str | os.PathLike[str]) -> list[InputFile]:
  """The `.npy` files to classify, sorted: one file, a flat folder, or the DeepLense
  layout (files in `no_sub/`, `cdm/`, `axion/` get that label; any loose `.npy`
  files beside those folders are classified unlabelled).

  Raises:
    errors.LayoutError: the input does not exist or holds no `.npy` file.
  """
  root = Path(input_path)
  if root.is_file():
    return [InputFile(root, root.name, None)]
  if not root.is_dir():
    raise errors.LayoutError(
        f"input {root} does not exist: give a .npy file, a folder of .npy files, or a "
        f"folder in the DeepLense layout ({', '.join(f'{c}/' for c in layout.CLASS_NAMES)})")

  def npy(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir()
                   if p.suffix == ".npy" and not p.name.startswith(".") and p.is_file()),
                  key=lambda p: p.name)

  files = [InputFile(p, f"{name}/{p.name}", label)
           for label, name in enumerate(layout.CLASS_NAMES) if (root / name).is_dir()
           for p in npy(root / name)]
  files += [InputFile(p, p.name, None) for p in npy(root)]
  if not files:
    raise errors.LayoutError(f"no .npy file in {root} (nor in its class folders "
                             f"{', '.join(layout.CLASS_NAMES)})")
  return files


def _is_classifier_run(folder: Path) -> bool:
  """A probe or fine-tune workdir with checkpoints (the epoch it chose among them)."""
  config = folder / workdir_lib.CONFIG_FILE
  if not config.exists():
    return False
  stage = fileio.read_json(config).get("stage")
  return stage in ("probe", "finetune") and (
      (folder / workdir_lib.CHECKPOINTS).is_dir() or (folder / _LEGACY_BEST).is_dir())


def _chosen_folder(run_dir: Path) -> tuple[Path, bool]:
  """(the checkpoint folder of the epoch a classifier run chose, whether to rank it):
  `checkpoints/` ranked by the saves' metrics; where no step there is ranked, the
  `best_checkpoint/` folder a run begun before the BestN policy wrote."""
  ranked = run_dir / workdir_lib.CHECKPOINTS
  if not checkpoint.ranked_steps(ranked) and (run_dir / _LEGACY_BEST).is_dir():
    return run_dir / _LEGACY_BEST, False
  return ranked, True


def find_model(model_dir: str | os.PathLike[str]) -> Path:
  """The fine-tune (or probe) workdir: `model_dir` or its `finetune/`.

  Raises:
    errors.MissingCheckpointError: neither is one (says how to make it).
  """
  root = Path(model_dir)
  for candidate in (root, root / "finetune"):
    if _is_classifier_run(candidate):
      return candidate
  raise errors.MissingCheckpointError(
      f"no fine-tuned model in {root}: expected a fine-tune workdir (config.json and "
      f"checkpoints/) there or in {root}/finetune/ (a pipeline workdir); make one with:\n"
      f"  python main.py --config=configs/pipeline.py:demo --workdir={root}")


def load_model(run_dir: str | os.PathLike[str]):
  """(model, params, batch_stats, the run's config, checkpoint step) of a fine-tune
  workdir's best checkpoint; the model is built from the workdir's `config.json` (and a
  probe's feature_choice.json).

  Raises:
    errors.IncompatibleCheckpointError: the checkpoint does not fit that config.
  """
  run_dir = Path(run_dir)
  config = ml_collections.ConfigDict(fileio.read_json(run_dir / workdir_lib.CONFIG_FILE))
  model = build.build_classifier(config.model, len(layout.CLASS_NAMES),
                                 feature=classify.read_feature_choice(run_dir))
  params, batch_stats = build.init_classifier(model, jax.random.key(0))
  folder, ranked = _chosen_folder(run_dir)
  restored, step = checkpoint.restore_latest_on_one_device(folder, best=ranked)
  loaded = {"params": restored.get("params"), "batch_stats": restored.get("batch_stats") or {}}
  template = {"params": params, "batch_stats": batch_stats}
  def shapes(tree):
    return jax.tree.map(lambda x: tuple(x.shape), tree)

  if jax.tree.structure(shapes(loaded)) != jax.tree.structure(shapes(template)) or \
      jax.tree.leaves(shapes(loaded)) != jax.tree.leaves(shapes(template)):
    raise errors.IncompatibleCheckpointError(
        f"the checkpoint {folder}/{step} does not fit the model its "
        f"config.json describes")
  return model, loaded["params"], loaded["batch_stats"], config, step


def normalize(images: np.ndarray) -> np.ndarray:
  """(N, H, W) images -> (N, H, W, 1) float32, min-max scaled per image exactly as in
  training (`train.batching.normalize`)."""
  return np.asarray(batching.normalize(np.asarray(images, np.float32)))[..., None]


def _chunks(items: list, size: int) -> Iterator[list]:
  for i in range(0, len(items), size):
    yield items[i:i + size]


def classify_files(files: list[InputFile], model, params, batch_stats, image_size: int,
                   batch_size: int) -> tuple[list[tuple[InputFile, np.ndarray]],
                                             list[tuple[str, str]]]:
  """(file, class probabilities) of every readable file, and (name, defect) of the rest."""
  local_batch = parallel.check_batch(batch_size)
  mesh = parallel.make_mesh()
  forward = steps.FallbackJit(lambda: steps.make_predict(model, mesh), "prediction")
  params, batch_stats = parallel.replicate((params, batch_stats), mesh)
  done, bad = [], []
  for chunk in tqdm(list(_chunks(files, local_batch)), desc="classifying", unit="batch",
                    disable=not files or len(files) <= local_batch):
    images, ok = [], []
    for f in chunk:
      try:
        image = npy_io.read_lens_file(f.path).image
      except npy_io.BadFileError as e:
        bad.append((f.name, e.defect))
        continue
      if image.shape != (image_size, image_size):
        bad.append((f.name, f"image size {image.shape[0]}x{image.shape[1]} differs from the "
                            f"model's {image_size}x{image_size}"))
        continue
      images.append(image)
      ok.append(f)
    if not ok:
      continue
    batch = np.zeros((local_batch, image_size, image_size, 1), np.float32)
    batch[:len(ok)] = normalize(np.stack(images))
    logits = forward(params, batch_stats, parallel.global_batch({"x": batch}, mesh)["x"])
    probs = metrics_lib.softmax(np.asarray(logits, np.float64))[:len(ok)]
    done += list(zip(ok, probs))
  return done, sorted(bad)


def _csv(rows: list[list[Any]]) -> bytes:
  buf = io.StringIO()
  csv.writer(buf, lineterminator="\n").writerows(rows)
  return buf.getvalue().encode()


def _prediction_rows(done: list[tuple[InputFile, np.ndarray]],
                     labelled: bool) -> list[list[str]]:
  """predictions.csv: a header, then per file its predicted class and probabilities (and
  its true class when some file has one)."""
  names = layout.CLASS_NAMES
  header = ["file", "predicted_class", *(f"p_{c}" for c in names)]
  header += ["true_class"] if labelled else []
  return [header] + [[f.name, names[int(np.argmax(p))], *(f"{v:.6f}" for v in p)]
                     + ([names[f.label] if f.label is not None else ""] if labelled else [])
                     for f, p in done]


def _write_metrics(workdir: Path, input_path: str, done: list[tuple[InputFile, np.ndarray]],
                   step: int, run_config: ml_collections.ConfigDict) -> Path:
  """metrics.json (the model's own evaluators, with bootstrap intervals), plots/roc.png,
  plots/confusion.png and each evaluator's figure, of the files with a true class."""
  known = [(f.label, p) for f, p in done if f.label is not None]
  labels = np.array([k for k, _ in known])
  probs = np.stack([p for _, p in known])
  evals = tuple(run_config.get("evals", evaluators.DEFAULT_EVALS))
  scores = evaluators.evaluate(probs, labels, evals, seed=int(run_config.get("seed", 0)))
  fileio.write_json_atomic(workdir / METRICS_FILE, {
      **scores.to_json(), "checkpoint_step": step, "input": str(Path(input_path).absolute())})
  title = f"predictions on {Path(input_path).name} ({len(labels)} labelled files)"
  folder = workdir / workdir_lib.PLOTS
  plots.roc(metrics_lib.roc_curves(probs, labels), folder / "roc.png", title=title)
  if "confusion_matrix" in scores.values:
    accuracy = scores.get("accuracy")
    plots.confusion(scores["confusion_matrix"], layout.CLASS_NAMES, folder / "confusion.png",
                    title=title + (f", accuracy {accuracy:.3f}" if accuracy is not None else ""))
  evaluators.figures(probs, labels, evals, folder, title)
  logging.info("labelled files: %s", ", ".join(
      f"{name} {scores.get(name)}" for name in evaluators.scalars(evals)))
  return workdir / METRICS_FILE


@registry.register("predict")
def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Classifies `config.input` with the best checkpoint under `config.model_dir`."""
  workdir = Path(workdir)
  if not config.input:
    raise errors.LayoutError("set --config.input to a .npy file or a folder of them")
  files = list_inputs(config.input)
  run_dir = find_model(config.model_dir)
  model, params, batch_stats, run_config, step = load_model(run_dir)
  logging.info("classifying %d file(s) of %s with %s step %d", len(files), config.input,
               run_dir, step)
  done, bad = classify_files(files, model, params, batch_stats, run_config.model.image_size,
                             config.batch_size)
  labelled = any(f.label is not None for f, _ in done)
  table = _prediction_rows(done, labelled)
  workdir.mkdir(parents=True, exist_ok=True)
  fileio.write_atomic(workdir / PREDICTIONS_FILE, lambda f: f.write(_csv(table)))
  tsv = "file\tdefect\n" + "".join(f"{n}\t{' '.join(d.split())}\n" for n, d in bad)
  fileio.write_atomic(workdir / BAD_FILES, lambda f: f.write(tsv.encode()))
  for name, defect in bad:
    logging.warning("bad file %s: %s", name, defect)
  counts = {c: sum(r[1] == c for r in table[1:]) for c in layout.CLASS_NAMES}
  summary = {"input": str(Path(config.input).absolute()), "model": str(run_dir.absolute()),
             "checkpoint_step": step, "files": len(files), "classified": len(done),
             "bad_files": len(bad), "predicted": counts,
             "predictions": str(workdir / PREDICTIONS_FILE), "metrics": None}
  if labelled:
    summary["metrics"] = str(_write_metrics(workdir, config.input, done, step, run_config))
  fileio.write_json_atomic(workdir / SUMMARY_FILE, summary)
  logging.info("wrote %s: %d classified (%s), %d bad file(s)%s", workdir / PREDICTIONS_FILE,
               len(done), ", ".join(f"{c} {n}" for c, n in counts.items()), len(bad),
               f" listed in {workdir / BAD_FILES}" if bad else "")
  print(json.dumps(summary, indent=1))
  return summary
