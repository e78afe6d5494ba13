"""The small supervised CNN (the study's ceiling arm): its layers, its config checks, and a
fine-tune stage that trains it end to end."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import finetune as finetune_config
from mae_jax.models import build
from mae_jax.models import cnn
from mae_jax.models import convs
from mae_jax.runtime import workdir as workdir_lib
from mae_jax.stages import classify
from mae_jax.stages import validate
from tests.conftest import write_folder


@pytest.mark.parametrize("size", [3, 2])
def test_shift_conv_is_a_same_padded_convolution(size):
  x = jax.random.normal(jax.random.key(0), (2, 9, 7, 3))
  layer = convs.ShiftConv(5, size)
  params = layer.init(jax.random.key(1), x)
  kernel = params["params"]["kernel"]
  lo = (size - 1) // 2
  want = jax.lax.conv_general_dilated(
      x, kernel, (1, 1), ((lo, size - 1 - lo), (lo, size - 1 - lo)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_allclose(layer.apply(params, x), want, rtol=1e-5, atol=1e-5)


def test_space_to_depth_keeps_every_pixel_once():
  x = jnp.arange(2 * 4 * 6 * 3, dtype=jnp.float32).reshape(2, 4, 6, 3)
  y = convs.space_to_depth(x, 2)
  assert y.shape == (2, 2, 3, 12)
  assert sorted(np.asarray(y).ravel().tolist()) == sorted(np.asarray(x).ravel().tolist())
  np.testing.assert_array_equal(y[1, 1, 2].reshape(2, 2, 3), x[1, 2:4, 4:6])


def test_cnn_classifier_shapes_and_parameter_groups():
  config = finetune_config.get_config("demo,arch=cnn")
  model = build.build_classifier(config.model, 3)
  params, stats = build.init_classifier(model, jax.random.key(0))
  assert set(params) == {"encoder", "classifier"} and "encoder" in stats
  widths = tuple(config.model.cnn_widths)
  assert params["encoder"][f"conv{len(widths) - 1}_1"]["kernel"].shape == (3, 3, widths[-1],
                                                                            widths[-1])
  out = model.apply({"params": params, "batch_stats": stats}, jnp.zeros((4, 64, 64, 1)))
  assert out["logits"].shape == (4, 3) and out["pre_logits"].shape == (4, widths[-1])
  with pytest.raises(ValueError, match="model.arch"):
    config.model.arch = "resnet"
    build.build_classifier(config.model, 3)


def test_cnn_configs_are_checked(tmp_path):
  """The CNN's keys come with its config argument; a ViT config switched to the CNN by an
  override is refused in one line that names the argument."""
  config = finetune_config.get_config("tiny")
  config.model.arch = "cnn"
  config.init_from = ""
  assert validate.problems(config, tmp_path / "run") == [
      "model.arch='cnn' comes with its own keys: choose it in the config argument, "
      "--config=configs/finetune.py:tiny,arch=cnn"]
  config = finetune_config.get_config("tiny,arch=cnn")
  assert validate.problems(config, tmp_path / "run") == []
  assert "init_from" not in config and "patch" not in config.model   # the ViT's keys are not
  assert "layer_decay" not in config.optim and "trainable_blocks" not in config
  config.model.cnn_widths = (8,) * 8
  assert any("model.cnn_widths" in p for p in validate.problems(config, tmp_path / "run"))
  config = finetune_config.get_config("tiny,arch=cnn")
  config.optim.frozen = (r"encoder/.*",)
  assert any("no pretrained encoder to freeze" in p
             for p in validate.problems(config, tmp_path / "run"))
  with pytest.raises(ValueError, match="unknown option 'arch=resnet'"):
    finetune_config.get_config("tiny,arch=resnet")


@pytest.mark.slow
def test_a_cnn_fine_tune_trains_and_reports(tmp_path):
  root = tmp_path / "src"
  write_folder(root, per_class=16)
  config = finetune_config.get_config("tiny,arch=cnn")
  config.data.source = "deeplense"
  config.data.dir = str(root)
  config.data.cache_dir = str(tmp_path / "cache")
  config.data.validation_fraction = config.data.test_fraction = 0.25
  config.model.update(image_size=16, cnn_widths=(4, 8))
  config.epochs = 3
  classify.run(config, str(tmp_path / "run"))
  metrics = json.loads((tmp_path / "run" / workdir_lib.EVAL_FILE).read_text())
  assert 0.0 <= metrics["macro_auc"] <= 1.0 and metrics["baseline"]["macro_auc"] is not None
  history = json.loads((tmp_path / "run" / "history.json").read_text())
  assert len(history) == 3 and all(np.isfinite(h["train_loss"]) for h in history)
