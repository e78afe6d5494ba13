"""An encoder on another grid or with more bands than it was pretrained on (issue 37,
item 3): fixed sin-cos positions for the new grid, a single-band patch embedding
repeated over the bands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mae_jax.models import load
from mae_jax.models import masking
from mae_jax.models import vit
from mae_jax.stages import validate
from tests.conftest import write_folder

ROOT = Path(__file__).resolve().parents[1]


def _mae_sincos(dim: int, size: int) -> np.ndarray:
  """MAE's get_2d_sincos_pos_embed (facebookresearch/mae util/pos_embed.py), written out."""
  def one_d(d, pos):
    omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)
  grid = np.stack(np.meshgrid(np.arange(size, dtype=np.float64),
                              np.arange(size, dtype=np.float64)), axis=0)
  emb = np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)
  return np.concatenate([np.zeros((1, dim)), emb], axis=0)


@pytest.mark.parametrize("size", [4, 9, 18])
def test_positions_on_any_grid_are_maes_sincos_formula(size):
  np.testing.assert_allclose(masking.sincos_pos_embed(32, (size, size)),
                             _mae_sincos(32, size), rtol=0, atol=1e-6)


def test_one_band_kernel_repeated_over_bands_embeds_equal_bands_as_before():
  embed = vit.PatchEmbed(dim=8, patch=4, channels=1)
  patches = jax.random.uniform(jax.random.key(0), (2, 5, 4 * 4 * 1))
  params = embed.init(jax.random.key(1), patches)["params"]
  kernel = load.adapt_bands("encoder/patch_embed/kernel", params["kernel"], (4, 4, 3, 8))
  assert kernel.shape == (4, 4, 3, 8)
  three = vit.PatchEmbed(dim=8, patch=4, channels=3)
  # Patches are flattened (p, p, C): each pixel's bands side by side.
  equal_bands = jnp.repeat(patches.reshape(2, 5, 16, 1), 3, axis=-1).reshape(2, 5, 48)
  np.testing.assert_allclose(three.apply({"params": {"kernel": kernel, "bias": params["bias"]}},
                                         equal_bands),
                             embed.apply({"params": params}, patches), rtol=1e-5, atol=1e-6)
  assert load.adapt_bands("encoder/block_0/mlp/kernel", params["kernel"], (4, 4, 3, 8)) is None
  assert load.adapt_bands("encoder/patch_embed/kernel", np.zeros((4, 4, 3, 8)),
                          (4, 4, 1, 8)) is None


def test_a_new_image_size_and_one_band_to_three_adapt_other_keys_do_not(tmp_path):
  source = tmp_path / "pre"
  source.mkdir()
  (source / "config.json").write_text(json.dumps(
      {"model": {"image_size": 64, "channels": 1, "patch": 16, "dim": 32}}))
  model = ml_collections.ConfigDict({"image_size": 144, "channels": 3, "patch": 16, "dim": 32})
  assert validate.encoder_problems(model, source) == []
  notes = validate.encoder_adaptations(model, source)
  assert len(notes) == 1 and "9x9 grid" in notes[0] and "4x4 grid" in notes[0]
  model.patch = 8
  assert [p.split(":")[1].split(";")[0].strip() for p in validate.encoder_problems(model, source)] \
      == [f"the source stage {source} used model.patch=16, this one model.patch=8"]
  (source / "config.json").write_text(json.dumps({"model": {"channels": 3}}))
  one = ml_collections.ConfigDict({"channels": 1})
  assert "only one band adapts to several" in validate.encoder_problems(one, source)[0]


@pytest.mark.slow
def test_a_64_pixel_mae_fine_tunes_at_128_pixels(tmp_path):
  """The tiny MAE pretrained on 64-px images fine-tunes on 128-px ones (patch 16: a 4x4
  grid, then 8x8), saying so in one line."""
  write_folder(tmp_path / "small", per_class=16, size=64)
  write_folder(tmp_path / "big", per_class=16, size=128)
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}

  def main(*args):
    return subprocess.run([sys.executable, str(ROOT / "main.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)

  pre = main("--config=configs/pretrain.py:tiny", f"--workdir={tmp_path / 'pre'}",
             "--config.data.source=deeplense", f"--config.data.dir={tmp_path / 'small'}",
             f"--config.data.cache_dir={tmp_path / 'cache'}", "--config.probe_every_epochs=0")
  assert pre.returncode == 0, pre.stderr[-3000:]
  fine = main("--config=configs/finetune.py:tiny", f"--workdir={tmp_path / 'fine'}",
              f"--config.init_from={tmp_path / 'pre'}", "--config.model.image_size=128",
              "--config.data.source=deeplense", f"--config.data.dir={tmp_path / 'big'}",
              f"--config.data.cache_dir={tmp_path / 'cache'}")
  assert fine.returncode == 0, fine.stderr[-3000:]
  assert "runs at 128 px: sin-cos positions of the 8x8 grid" in fine.stderr
  assert json.loads((tmp_path / "fine" / "eval_metrics.json").read_text())["split"] == "test"
