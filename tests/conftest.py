"""Shared fixtures: small DeepLense-layout folders of synthetic images."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
import pytest  # pylint: disable=g-import-not-at-top

from configs import finetune as finetune_config  # pylint: disable=g-import-not-at-top
from mae_jax.data import layout  # pylint: disable=g-import-not-at-top
from mae_jax.data import npy_io  # pylint: disable=g-import-not-at-top
from mae_jax.models import build  # pylint: disable=g-import-not-at-top
from mae_jax.runtime import parallel  # pylint: disable=g-import-not-at-top
from mae_jax.train import optim  # pylint: disable=g-import-not-at-top

ID_SCALE = 100_000.0


def tagged_image(uid: int, size: int = 16, seed: int = 0) -> np.ndarray:
  """A random image whose pixel (1, 0) encodes `uid` after min-max normalisation."""
  img = np.random.default_rng([seed, uid]).uniform(0.1, 0.9, (size, size))
  img[0, 0], img[0, 1] = 0.0, 1.0
  img[1, 0] = uid / ID_SCALE
  return img


def image_id(normalised: np.ndarray) -> int:
  """Recovers the uid of a (normalised, un-augmented) tagged image."""
  return int(round(float(np.squeeze(normalised)[1, 0]) * ID_SCALE))


def write_folder(root: Path, per_class: int, size: int = 16, start: int = 0) -> dict[int, str]:
  """Writes `per_class` tagged images per class; returns uid -> class name."""
  classes = {}
  for label, name in enumerate(layout.CLASS_NAMES):
    (root / name).mkdir(parents=True, exist_ok=True)
    for i in range(start, start + per_class):
      uid = label * 10_000 + i + 1
      npy_io.write_lens_file(root / name / f"{name}_sim_{uid}.npy", tagged_image(uid, size),
                             axion_mass=1e-23 * (1 + i % 7) if name == "axion" else None)
      classes[uid] = name
  return classes


@pytest.fixture
def small_folder(tmp_path: Path) -> tuple[Path, dict[int, str]]:
  root = tmp_path / "src"
  return root, write_folder(root, per_class=40)


def bfloat16_classifier(total_steps: int, steps_per_epoch: int, global_batch: int):
  """The `tiny` fine-tune's classifier in bfloat16: (model, params, batch_stats, optimiser)."""
  config = finetune_config.get_config("tiny")
  config.model.dtype = "bfloat16"
  model = build.build_classifier(config.model, 3, parallel.AXIS)
  params, stats = build.init_classifier(model, jax.random.key(0))
  tx, _ = optim.classifier_optimizer(
      params, optim.ClassifierOptimSettings.from_config(config.optim), total_steps=total_steps,
      steps_per_epoch=steps_per_epoch, global_batch=global_batch, depth=config.model.depth)
  return model, params, stats, tx
