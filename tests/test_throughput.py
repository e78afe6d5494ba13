"""benchmarks/throughput.py: its PyTorch twin computes what our model computes, its FLOP
count matches the model's matmuls, and a tiny run prints every line it promises."""

from __future__ import annotations

import functools
import math
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import throughput  # pylint: disable=g-import-not-at-top,wrong-import-position
from configs import finetune as finetune_config  # pylint: disable=g-import-not-at-top,wrong-import-position
from configs import pretrain as pretrain_config  # pylint: disable=g-import-not-at-top,wrong-import-position
from mae_jax.models import attention  # pylint: disable=g-import-not-at-top,wrong-import-position
from mae_jax.models import build  # pylint: disable=g-import-not-at-top,wrong-import-position
from mae_jax.models import load as convert  # pylint: disable=g-import-not-at-top,wrong-import-position
from mae_jax.objectives import reconstruction  # pylint: disable=g-import-not-at-top,wrong-import-position


def _torch_mae():
  """(torch, benchmarks/torch_mae.py), or skip the test that needs them."""
  torch = pytest.importorskip("torch")
  import torch_mae  # pylint: disable=g-import-not-at-top
  return torch, torch_mae


def _sizes(m):
  return dict(image_size=m.image_size, channels=m.channels, patch=m.patch, dim=m.dim,
              depth=m.depth, heads=m.heads, mlp_ratio=m.mlp_ratio)


def _inputs(n, num_patches):
  rng = np.random.default_rng(0)
  return (rng.random((n, 64, 64, 1), dtype=np.float32),
          rng.random((n, num_patches), dtype=np.float32))


def test_torch_mae_matches_ours_with_the_same_weights():
  torch, torch_mae = _torch_mae()
  config = pretrain_config.get_config("tiny")
  m = config.model
  mae = build.build_mae(m)
  params = build.init_mae(mae, jax.random.key(0))
  model = torch_mae.MaskedAutoencoder(**_sizes(m), decoder_dim=m.decoder_dim,
                                      decoder_depth=m.decoder_depth,
                                      decoder_heads=m.decoder_heads, mask_ratio=m.mask_ratio)
  model.load_state_dict(torch_mae.state_dict_from_jax(model, params))
  images, noise = _inputs(3, mae.encoder.num_patches)
  out = mae.apply({"params": params}, images, noise)
  loss = reconstruction.Reconstruction().loss(out["logits"], images, out["mask"], m.patch)
  t_loss, t_logits, t_mask = model(torch.from_numpy(images).permute(0, 3, 1, 2),
                                   torch.from_numpy(noise))
  np.testing.assert_array_equal(t_mask.numpy(), out["mask"])
  np.testing.assert_allclose(t_logits.detach().numpy(), out["logits"], atol=2e-5)
  np.testing.assert_allclose(float(t_loss.detach()), float(loss), rtol=1e-5)
  # The demo preset's loss (MSE on every patch's normalised high-pass part), the same.
  demo = pretrain_config.get_config("demo").loss
  model.loss_type, model.norm_pix, model.masked_only = demo.type, demo.norm_pix, demo.masked_only
  model.target, model.highpass_sigma = demo.target, demo.highpass_sigma
  hp_loss = reconstruction.Reconstruction.from_config(demo).loss(
      out["logits"], images, out["mask"], m.patch)
  t_hp_loss, _, _ = model(torch.from_numpy(images).permute(0, 3, 1, 2), torch.from_numpy(noise))
  np.testing.assert_allclose(float(t_hp_loss.detach()), float(hp_loss), rtol=1e-5)
  # The blur itself, patch by patch, with several channels, patch sizes and widths.
  rng = np.random.default_rng(1)
  for patch, sigma in ((4, 1.0), (8, 1.5)):
    patches = rng.random((2, 5, patch * patch * 3), dtype=np.float32)
    model.patch, model.highpass_sigma = patch, sigma
    np.testing.assert_allclose(model.patch_blur(torch.from_numpy(patches), 3).numpy(),
                               reconstruction.patch_blur(jnp.asarray(patches), patch, 3, sigma),
                               atol=1e-6)
  # Names are facebookresearch/mae's: mae_jax.models.load reads the torch model back.
  back = convert.convert(model.state_dict_mae(), params)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)


def test_torch_classifier_matches_ours_with_the_same_weights():
  torch, torch_mae = _torch_mae()
  config = finetune_config.get_config("tiny")
  model = build.build_classifier(config.model, 3)
  params, stats = build.init_classifier(model, jax.random.key(0))
  stats = jax.tree.map(lambda s: s + 0.5, stats)   # non-trivial BatchNorm statistics
  t_model = torch_mae.Classifier(**_sizes(config.model), hidden=tuple(config.model.head_hidden))
  t_model.load_state_dict(torch_mae.state_dict_from_jax(t_model, params, stats))
  images, _ = _inputs(4, 1)
  logits = model.apply({"params": params, "batch_stats": stats}, images, False)["logits"]
  t_logits = t_model.eval()(torch.from_numpy(images).permute(0, 3, 1, 2))
  np.testing.assert_allclose(t_logits.detach().numpy(), logits, atol=2e-5)


def test_torch_optimizer_groups_follow_our_configs():
  _, torch_mae = _torch_mae()
  config = finetune_config.get_config("seed")
  model = torch_mae.Classifier()
  opt, _ = torch_mae.adamw(model, config.optim.lr_groups, weight_decay=0.1,
                           no_decay=config.optim.no_decay, betas=(0.9, 0.999),
                           total_steps=100, warmup_steps=10)
  groups = {(g["initial_lr"], g["weight_decay"]): len(g["params"]) for g in opt.param_groups}
  assert set(groups) == {(9.5e-5, 0.1), (9.5e-5, 0.0), (8e-4, 0.1), (8e-4, 0.0)}
  assert groups[(8e-4, 0.1)] == 3                        # the head's three Dense kernels
  assert sum(groups.values()) == len(list(model.parameters()))
  schedule = torch_mae.warmup_cosine(100, 10, 1e-3, 1e-5)
  assert schedule(0) == 0 and schedule(10) == pytest.approx(1.0)
  assert schedule(100) == pytest.approx(1e-2)


def _matmul_flops(jaxpr) -> int:
  """2 x multiply-adds of every dot_general / convolution in a jaxpr, loops unrolled."""
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      lhs = eqn.invars[0].aval
      (contract, _), _ = eqn.params["dimension_numbers"]
      total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(
          lhs.shape[i] for i in contract)
    elif name == "conv_general_dilated":
      kernel = eqn.invars[1].aval.shape
      total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(kernel) // kernel[-1]
    times = eqn.params.get("length", 1) if name == "scan" else 1
    for value in eqn.params.values():
      inner = getattr(value, "jaxpr", value)
      if hasattr(inner, "eqns"):
        total += times * _matmul_flops(inner)
  return total


@pytest.mark.parametrize("stem", ["linear", "conv"])
def test_flop_count_matches_the_models_matmuls(stem):
  """train_flops / 3 is the forward pass's matmul FLOPs, counted here from the jaxpr."""
  pre = pretrain_config.get_config("seed")
  pre.model.stem = stem
  mae = build.build_mae(pre.model)
  params = jax.eval_shape(lambda k: build.init_mae(mae, k), jax.random.key(0))
  images = jax.ShapeDtypeStruct((2, 64, 64, 1), jnp.float32)
  noise = jax.ShapeDtypeStruct((2, mae.encoder.num_patches), jnp.float32)
  for removed_only in (True, False):
    pre.loss.masked_only = removed_only
    jaxpr = jax.make_jaxpr(functools.partial(mae.apply, removed_only=removed_only))(
        {"params": params}, images, noise)
    assert _matmul_flops(jaxpr.jaxpr) == throughput.train_flops("pretrain", pre, 2) // 3

  fine = finetune_config.get_config("seed")
  fine.model.stem = stem
  model = build.build_classifier(fine.model, 3)
  variables = jax.eval_shape(lambda k: model.init(k, jnp.zeros((2, 64, 64, 1)), False),
                             jax.random.key(0))
  jaxpr = jax.make_jaxpr(functools.partial(model.apply, train=False))(variables, images)
  assert _matmul_flops(jaxpr.jaxpr) == throughput.train_flops("finetune", fine, 2) // 3


@pytest.mark.parametrize("preset", ["tiny", "demo"])   # decoder depth 1 and 2
def test_attention_line_asks_the_shapes_the_model_asked(preset, monkeypatch):
  """`attention_used` reports the choices the traced step made: every shape it asks
  `attention.choose` about is one the model asked, with the same arguments (a cache hit)."""
  monkeypatch.setenv(attention.ENV_VAR, "xla")   # 'blocked' never asks choose
  for masked_only in (True, False):
    pre = pretrain_config.get_config(preset)
    pre.loss.masked_only = masked_only
    mae = build.build_mae(pre.model)
    params = jax.eval_shape(lambda k, m=mae: build.init_mae(m, k), jax.random.key(0))
    size = pre.model.image_size
    jax.make_jaxpr(functools.partial(mae.apply, removed_only=masked_only))(
        {"params": params}, jnp.zeros((2, size, size, 1)), jnp.zeros((2, mae.encoder.num_patches)))
    misses = attention.choose.cache_info().misses
    line = throughput.attention_used("pretrain", pre)
    assert attention.choose.cache_info().misses == misses, line
    assert line.startswith("asked xla; encoder ") and "last block's" in line
  fine = finetune_config.get_config(preset)
  model = build.build_classifier(fine.model, 3)
  images = jnp.zeros((2, size, size, 1))
  variables = jax.eval_shape(lambda k: model.init(k, images, False), jax.random.key(0))
  jax.make_jaxpr(functools.partial(model.apply, train=False))(variables, images)
  misses = attention.choose.cache_info().misses
  throughput.attention_used("finetune", fine)
  assert attention.choose.cache_info().misses == misses


def test_peak_flops_of_known_accelerators():
  assert throughput.peak_flops("NVIDIA H100 80GB HBM3", "bfloat16") == 989e12
  assert throughput.peak_flops("cpu", "float32") is None


@pytest.mark.slow
def test_tiny_run_prints_every_line():
  """End to end at tiny size (~30 s on 2 cores): the feed, ours and PyTorch eager."""
  _torch_mae()
  cmd = [sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--preset", "tiny",
         "--batch", "8", "--steps", "2", "--repeats", "2", "--systems", "ours,torch"]
  result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.strip().splitlines()
  number = r"([\d,]+\.?\d*)"
  rates = {}
  for task in ("pretrain", "finetune"):
    assert any(re.match(rf"{task}\s+device feed\s+{number} images/s", l) for l in lines), lines
    for system in ("ours \\(jax\\)", "pytorch eager"):
      found = [re.match(rf"{task}\s+{system}\s+{number} images/s \(min .*loss", l) for l in lines]
      found = [f for f in found if f]
      assert len(found) == 1, lines
      rates[task, system] = float(found[0].group(1).replace(",", ""))
  assert "compile" in next(l for l in lines if "ours (jax)" in l)
  last = re.fullmatch(r"ratio ours/pytorch-eager: pretrain (\d+\.\d\d) finetune (\d+\.\d\d)",
                      lines[-1])
  assert last, lines[-1]
  for task, value in zip(("pretrain", "finetune"), last.groups()):
    expected = rates[task, "ours \\(jax\\)"] / rates[task, "pytorch eager"]
    assert float(value) == pytest.approx(expected, rel=0.02, abs=0.01)
