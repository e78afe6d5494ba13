"""Export to Hugging Face: a pretraining workdir becomes a ViTMAEForPreTraining folder and a
linear-head fine-tune a ViTForImageClassification folder, with the same reconstruction
logits and class scores in transformers as in mae_jax; importing the export gives back
the same params; what does not map is refused with the reason."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from configs import finetune as finetune_config
from configs import pretrain as pretrain_config
from mae_jax.models import build
from mae_jax.models import load
from mae_jax.runtime import checkpoint
from mae_jax.runtime import errors
from mae_jax.runtime import workdir as workdir_lib
from mae_jax.stages import export
from mae_jax.train import batching

ROOT = Path(__file__).resolve().parents[1]


def _workdir(path: Path, config, state: dict) -> Path:
  """A stage workdir as the stages leave it: config.json and an orbax checkpoint."""
  path.mkdir(parents=True)
  (path / workdir_lib.CONFIG_FILE).write_text(json.dumps(config.to_dict()))
  mngr = checkpoint.manager(path, 2)
  checkpoint.save(mngr, 7, state)
  checkpoint.seal(mngr)
  mngr.close()
  return path


def _pretrained(tmp_path: Path, loss_type: str = "bce"):
  config = pretrain_config.get_config("tiny")
  config.model.update(image_size=32, patch=8, dim=32, depth=2, heads=4, decoder_dim=16,
                      decoder_depth=2, decoder_heads=2)
  config.loss.type = loss_type
  mae = build.build_mae(config.model)
  params = build.init_mae(mae, jax.random.key(3))
  # Params away from their initialisation (biases, norms, tokens all non-trivial).
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(p.size), p.shape),
                        params)
  return mae, params, _workdir(tmp_path / "pre", config, {"params": params, "step": 7})


def _images(n: int, size: int, seed: int = 0) -> np.ndarray:
  raw = np.random.default_rng(seed).random((n, size, size), np.float32) ** 2
  return np.array(batching.normalize(jnp.asarray(raw)))[..., None]   # writable, for torch


def test_pretraining_export_gives_the_same_logits_in_transformers_and_imports_back(tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  mae, params, workdir = _pretrained(tmp_path)
  done = export.export(workdir, tmp_path / "hf")
  assert done["class"] == "ViTMAEForPreTraining" and done["step"] == 7
  hf = transformers.ViTMAEForPreTraining.from_pretrained(tmp_path / "hf").eval()
  images = _images(3, 32)
  noise = np.random.default_rng(1).random((3, mae.encoder.num_patches), np.float32)
  with torch.no_grad():
    out = hf(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)),
             noise=torch.from_numpy(noise))
  ours = mae.apply({"params": params}, jnp.asarray(images), jnp.asarray(noise))
  np.testing.assert_array_equal(out.mask.numpy(), np.asarray(ours["mask"]))
  np.testing.assert_allclose(out.logits.numpy(), np.asarray(ours["logits"]), atol=1e-5, rtol=0)
  back, kept = load.load_params(tmp_path / "hf", jax.tree.map(jnp.zeros_like, params))
  assert not kept
  flat_back, flat = (traverse_util.flatten_dict(t, sep="/") for t in (back, params))
  assert set(flat_back) == set(flat)
  for name, value in flat.items():
    np.testing.assert_allclose(flat_back[name], value, atol=1e-7, err_msg=name)


def _finetuned(tmp_path: Path, head: str = "linear"):
  config = finetune_config.get_config("tiny")
  config.model.update(image_size=32, patch=8, dim=32, depth=2, heads=4, head=head)
  model = build.build_classifier(config.model, 3)
  params, stats = build.init_classifier(model, jax.random.key(4))
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(p.size), p.shape),
                        params)
  if head == "linear":   # trained BatchNorm statistics, not the initial 0 / 1
    rng = np.random.default_rng(2)
    stats = {"classifier": {"bn": {"mean": jnp.asarray(rng.normal(0, 0.3, 32), jnp.float32),
                                   "var": jnp.asarray(rng.uniform(0.2, 3.0, 32), jnp.float32)}}}
  state = {"params": params, "batch_stats": stats, "step": 7}
  return model, params, stats, _workdir(tmp_path / "fine", config, state)


def test_finetune_export_gives_the_same_class_scores_in_transformers(tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  model, params, stats, workdir = _finetuned(tmp_path)
  done = export.export(workdir, tmp_path / "hf")
  assert done["class"] == "ViTForImageClassification"
  hf = transformers.ViTForImageClassification.from_pretrained(tmp_path / "hf").eval()
  assert hf.config.id2label == {0: "no_sub", 1: "cdm", 2: "axion"}
  images = _images(5, 32, seed=3)
  with torch.no_grad():
    logits = hf(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2))).logits.numpy()
  ours = model.apply({"params": params, "batch_stats": stats}, jnp.asarray(images))["logits"]
  np.testing.assert_allclose(logits, np.asarray(ours), atol=1e-5, rtol=0)
  encoder = export.export(workdir, tmp_path / "enc", encoder_only=True)
  assert encoder["class"] == "ViTModel"
  vit = transformers.ViTModel.from_pretrained(tmp_path / "enc", add_pooling_layer=False).eval()
  with torch.no_grad():
    cls = vit(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2))).last_hidden_state[:, 0]
  feats = model.apply({"params": params, "batch_stats": stats}, jnp.asarray(images),
                      method="features")
  np.testing.assert_allclose(cls.numpy(), np.asarray(feats), atol=1e-5, rtol=0)


def test_what_does_not_map_is_refused_with_the_reason(tmp_path):
  _, _, _, workdir = _finetuned(tmp_path, head="mlp")
  with pytest.raises(errors.ConversionError, match="MLP head; --encoder_only exports"):
    export.export(workdir, tmp_path / "hf")
  assert export.export(workdir, tmp_path / "enc", encoder_only=True)["class"] == "ViTModel"
  with pytest.raises(errors.ConversionError, match="not a pretrain, probe or fine-tune workdir"):
    export.export(tmp_path, tmp_path / "x")
  cli = subprocess.run([sys.executable, "-m", "mae_jax.stages.export", f"--workdir={workdir}",
                        f"--out={tmp_path / 'cli'}"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
  assert cli.returncode != 0 and "Traceback" not in cli.stderr
  assert cli.stderr.strip().splitlines()[-1].startswith("error: cannot export this model")


def test_the_exported_config_says_what_each_preset_s_decoder_predicts():
  """transformers' own loss is MSE on pixels: the note in config.json says what the
  decoder was trained to give, from the preset's loss."""
  notes = {}
  for preset in ("seed", "demo"):
    config = pretrain_config.get_config(preset)
    hf = export.mae_config(config.model.to_dict(), config.loss.to_dict())
    notes[preset] = hf["mae_jax"]["note"]
    assert hf["norm_pix_loss"] == (config.loss.type == "mse" and config.loss.norm_pix)
  assert "logits of [0, 1] pixels" in notes["seed"]
  assert "Gaussian blur (sigma 1.0 px), normalised per patch" in notes["demo"]
  assert export.mae_config(config.model.to_dict(), {"type": "mse"})["mae_jax"]["note"] == \
      "decoder outputs are pixels"
  assert "logits of [0, 1] pixels" in export.mae_config(config.model.to_dict(), {})["mae_jax"][
      "note"]   # a config without loss keys: the loss's defaults (BCE)
