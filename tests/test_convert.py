"""Weight import and parity with Hugging Face ViTMAEForPreTraining."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mae_jax.models import build
from mae_jax.models import heads
from mae_jax.models import load as convert
from mae_jax.models import mae as mae_lib
from mae_jax.models import masking
from mae_jax.models import vit
from mae_jax.runtime import checkpoint
from mae_jax.runtime import errors
from mae_jax.objectives import reconstruction


def _torch():
  """torch, or skip the test that needs it (the other tests here run without it)."""
  return pytest.importorskip("torch")


def _transformers():
  """transformers, or skip the test that needs it."""
  return pytest.importorskip("transformers")

SHAPES = {
    # image, channels, patch, dim, depth, heads, decoder dim, depth, heads
    "seed": (64, 1, 4, 256, 8, 8, 128, 4, 8),
    "rgb32": (32, 3, 8, 64, 2, 4, 32, 1, 2),
}


def _pair(shape, norm_pix):
  torch = _torch()
  transformers = _transformers()
  size, ch, p, dim, depth, heads, ddim, ddepth, dheads = SHAPES[shape]
  hf_config = transformers.ViTMAEConfig(
      image_size=size, patch_size=p, num_channels=ch, hidden_size=dim,
      num_hidden_layers=depth, num_attention_heads=heads, intermediate_size=4 * dim,
      decoder_hidden_size=ddim, decoder_num_hidden_layers=ddepth,
      decoder_num_attention_heads=dheads, decoder_intermediate_size=4 * ddim,
      mask_ratio=0.75, norm_pix_loss=norm_pix, layer_norm_eps=1e-6, hidden_act="gelu",
      qkv_bias=True)
  torch.manual_seed(0)
  hf = transformers.ViTMAEForPreTraining(hf_config).eval()
  # Published ViTMAE checkpoints hold the fixed sin-cos embeddings; some transformers
  # releases initialise them to zeros, so set them as a real checkpoint has them.
  grid = (size // p, size // p)
  with torch.no_grad():
    hf.vit.embeddings.position_embeddings.copy_(
        torch.from_numpy(masking.sincos_pos_embed(dim, grid))[None])
    hf.decoder.decoder_pos_embed.copy_(torch.from_numpy(masking.sincos_pos_embed(ddim, grid))[None])
  ours = mae_lib.MAE(
      encoder=vit.ViTConfig(image_size=size, channels=ch, patch=p, dim=dim, depth=depth,
                               heads=heads),
      decoder=mae_lib.DecoderConfig(dim=ddim, depth=ddepth, heads=dheads), mask_ratio=0.75)
  return hf, ours


@pytest.mark.slow
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("norm_pix", [False, True])
def test_parity_with_hugging_face(shape, norm_pix):
  torch = _torch()
  hf, ours = _pair(shape, norm_pix)
  enc = ours.encoder
  template = jax.jit(ours.init)(jax.random.key(0), jnp.zeros((1, enc.image_size, enc.image_size,
                                                               enc.channels)),
                                jnp.zeros((1, enc.num_patches)))["params"]
  params = convert.convert(hf.state_dict(), template)
  rng = np.random.default_rng(1)
  images = rng.random((3, enc.image_size, enc.image_size, enc.channels), dtype=np.float32)
  noise = rng.random((3, enc.num_patches), dtype=np.float32)
  with torch.no_grad():
    out = hf(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)),
             noise=torch.from_numpy(noise))
  ref_logits, ref_mask, ref_loss = out.logits.numpy(), out.mask.numpy(), float(out.loss)
  ours_out = ours.apply({"params": params}, jnp.asarray(images), jnp.asarray(noise))
  np.testing.assert_array_equal(np.asarray(ours_out["mask"]), ref_mask)
  np.testing.assert_allclose(np.asarray(ours_out["logits"]), ref_logits, atol=1e-5, rtol=0)
  loss = reconstruction.Reconstruction(type="mse", norm_pix=norm_pix).loss(
      ours_out["logits"], jnp.asarray(images), ours_out["mask"], enc.patch)
  assert abs(float(loss) - ref_loss) <= 1e-5


def _fb_state(params, with_pos: bool = True) -> dict[str, np.ndarray]:
  """A facebookresearch/mae-style state dict made from our params (inverse mapping)."""
  enc, dec = params["encoder"], params["decoder"]
  sd = {"cls_token": enc["cls_token"], "mask_token": dec["mask_token"],
        "patch_embed.proj.weight": np.asarray(enc["patch_embed"]["kernel"]).transpose(3, 2, 0, 1),
        "patch_embed.proj.bias": enc["patch_embed"]["bias"]}

  def block(prefix, b):
    for name, sub in (("norm1", b["norm1"]), ("norm2", b["norm2"])):
      sd[f"{prefix}.{name}.weight"], sd[f"{prefix}.{name}.bias"] = sub["scale"], sub["bias"]
    for name, sub in (("attn.qkv", b["attn"]["qkv"]), ("attn.proj", b["attn"]["proj"]),
                      ("mlp.fc1", b["mlp"]["fc1"]), ("mlp.fc2", b["mlp"]["fc2"])):
      sd[f"{prefix}.{name}.weight"] = np.asarray(sub["kernel"]).T
      sd[f"{prefix}.{name}.bias"] = sub["bias"]

  for k, v in enc.items():
    if k.startswith("block_"):
      block(f"blocks.{k[6:]}", v)
  for k, v in dec.items():
    if k.startswith("block_"):
      block(f"decoder_blocks.{k[6:]}", v)
  for name, key in (("norm", enc["norm"]), ("decoder_norm", dec["norm"])):
    sd[f"{name}.weight"], sd[f"{name}.bias"] = key["scale"], key["bias"]
  for name, key in (("decoder_embed", dec["embed"]), ("decoder_pred", dec["pred"])):
    sd[f"{name}.weight"], sd[f"{name}.bias"] = np.asarray(key["kernel"]).T, key["bias"]
  if with_pos:
    sd["pos_embed"] = masking.sincos_pos_embed(16, (4, 4))[None]
  return {k: np.asarray(v) for k, v in sd.items()}


def _fb_state_any(params) -> dict[str, np.ndarray]:
  return _fb_state(params, with_pos=False)


@pytest.fixture
def small():
  mae = mae_lib.MAE(encoder=vit.ViTConfig(image_size=16, patch=4, dim=16, depth=2, heads=2),
                   decoder=mae_lib.DecoderConfig(dim=8, depth=1, heads=2))
  params = mae.init(jax.random.key(3), jnp.zeros((1, 16, 16, 1)), jnp.zeros((1, 16)))["params"]
  return mae, jax.device_get(params)


def test_facebook_format_roundtrip_and_pth_file(small, tmp_path):
  torch = _torch()
  mae, params = small
  state = _fb_state(params)
  back = convert.convert(state, params)
  jax.tree.map(np.testing.assert_array_equal, back, jax.tree.map(np.asarray, params))
  torch.save({"model": {k: torch.from_numpy(np.array(v)) for k, v in state.items()}}, tmp_path / "m.pth")
  loaded = convert.convert(convert.load_state_dict(tmp_path / "m.pth"), params)
  jax.tree.map(np.testing.assert_array_equal, loaded, jax.tree.map(np.asarray, params))
  encoder_only = convert.convert(state, {"encoder": params["encoder"]})
  assert set(encoder_only) == {"encoder"}


def test_mismatched_shape_names_the_tensor(small):
  _, params = small
  state = _fb_state(params)
  state["blocks.1.mlp.fc1.weight"] = np.zeros((32, 16), np.float32)  # hidden 64 expected
  with pytest.raises(convert.ConversionError, match=r"encoder/block_1/mlp/fc1/kernel.*\(16, 32\)"):
    convert.convert(state, params)


def test_not_an_mae_checkpoint(small):
  _, params = small
  with pytest.raises(convert.ConversionError, match="not an MAE checkpoint"):
    convert.convert({"fc.weight": np.zeros((2, 2))}, params)


def test_unreadable_pth_file_is_refused(tmp_path):
  _torch()
  (tmp_path / "junk.pth").write_bytes(b"junk")
  with pytest.raises(convert.ConversionError, match="not a readable PyTorch checkpoint"):
    convert.load_state_dict(tmp_path / "junk.pth")


def test_sincos_matches_mae_reference_formula():
  """facebookresearch/mae get_2d_sincos_pos_embed, transcribed for a 2x3 check."""
  dim, gs = 8, 3
  grid = np.stack(np.meshgrid(np.arange(gs, dtype=np.float32), np.arange(gs, dtype=np.float32)))

  def one_d(d, pos):
    omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  ref = np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)
  ref = np.concatenate([np.zeros((1, dim)), ref])
  np.testing.assert_allclose(masking.sincos_pos_embed(dim, (gs, gs)), ref, atol=1e-7)


def test_position_embeddings_that_differ_are_reported(small, caplog):
  _, params = small
  state = _fb_state(params)
  state["pos_embed"] = np.ones_like(state["pos_embed"])
  with caplog.at_level("WARNING"):
    convert.convert(state, params)
  assert "pos_embed" in caplog.text and "sin-cos" in caplog.text


def test_hugging_face_folder_and_cli(tmp_path):
  """A model written by save_pretrained (legacy key names on disk) converts like the live one."""
  hf, ours = _pair("rgb32", False)
  hf.save_pretrained(tmp_path / "hf")
  enc = ours.encoder
  template = jax.jit(ours.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                                jnp.zeros((1, enc.num_patches)))["params"]
  live = convert.convert(hf.state_dict(), template)
  from_disk = convert.convert(convert.load_state_dict(tmp_path / "hf"), template)
  jax.tree.map(np.testing.assert_array_equal, from_disk, live)


@pytest.mark.slow
def test_cli_output_initialises_a_stage(tmp_path):
  """The CLI writes a stage-style checkpoint that restore_from_stage (init_from) reads."""
  torch = _torch()
  from configs import pretrain as pretrain_config  # pylint: disable=g-import-not-at-top
  mae = build.build_mae(pretrain_config.get_config("tiny").model)
  params = jax.device_get(build.init_mae(mae, jax.random.key(5)))
  torch.save({"model": {k: torch.from_numpy(np.array(v)) for k, v in
                        _fb_state_any(params).items()}}, tmp_path / "m.pth")
  convert.main(["--checkpoint", str(tmp_path / "m.pth"), "--config", "configs/pretrain.py:tiny",
                "--out", str(tmp_path / "imported")])
  fresh = build.init_mae(mae, jax.random.key(6))
  loaded, _, step, left = convert.restore_from_stage(tmp_path / "imported", fresh, {},
                                                        dont_load=[])
  assert step == 0 and not left
  jax.tree.map(np.testing.assert_array_equal, loaded, params)


def _hf_rgb_checkpoint(path, image=32, patch=8, dim=64, depth=2, heads=4, ddim=32, ddepth=1,
                       dheads=2):
  """A randomly initialised 3-channel ViTMAEForPreTraining saved to `path` (sin-cos embeddings
  set, as published checkpoints hold them)."""
  torch = _torch()
  transformers = _transformers()
  hf_config = transformers.ViTMAEConfig(
      image_size=image, patch_size=patch, num_channels=3, hidden_size=dim,
      num_hidden_layers=depth, num_attention_heads=heads, intermediate_size=4 * dim,
      decoder_hidden_size=ddim, decoder_num_hidden_layers=ddepth,
      decoder_num_attention_heads=dheads, decoder_intermediate_size=4 * ddim,
      mask_ratio=0.75, layer_norm_eps=1e-6, hidden_act="gelu", qkv_bias=True)
  torch.manual_seed(1)
  hf = transformers.ViTMAEForPreTraining(hf_config).eval()
  grid = (image // patch, image // patch)
  with torch.no_grad():
    hf.vit.embeddings.position_embeddings.copy_(
        torch.from_numpy(masking.sincos_pos_embed(dim, grid))[None])
    hf.decoder.decoder_pos_embed.copy_(torch.from_numpy(masking.sincos_pos_embed(ddim, grid))[None])
  hf.save_pretrained(path)
  return hf


def _grey_mae(image):
  return mae_lib.MAE(encoder=vit.ViTConfig(image_size=image, channels=1, patch=8, dim=64,
                                             depth=2, heads=4),
                    decoder=mae_lib.DecoderConfig(dim=32, depth=1, heads=2), mask_ratio=0.75)


def _init(mae):
  enc = mae.encoder
  return jax.device_get(jax.jit(mae.init)(
      jax.random.key(0), jnp.zeros((1, enc.image_size, enc.image_size, 1)),
      jnp.zeros((1, enc.num_patches)))["params"])


def test_rgb_hugging_face_checkpoint_into_grey_model_on_another_grid(tmp_path, caplog):
  """A 3-channel 32x32 (4x4 grid) ViTMAE on disk -> a 1-channel 64x64 (8x8 grid) MAE."""
  hf = _hf_rgb_checkpoint(tmp_path / "hf")
  ours = _grey_mae(64)
  template = _init(ours)
  with caplog.at_level("INFO"):
    params, kept = convert.load_params(tmp_path / "hf", template, ours.encoder.num_patches)
  assert not kept  # encoder and decoder both came from the file
  assert "16 patches, this model's 64" in caplog.text
  rgb_kernel = hf.vit.embeddings.patch_embeddings.projection.weight.detach().numpy()
  np.testing.assert_allclose(params["encoder"]["patch_embed"]["kernel"],
                             rgb_kernel.sum(axis=1, keepdims=True).transpose(2, 3, 1, 0),
                             rtol=1e-6)
  assert params["decoder"]["pred"]["kernel"].shape == (32, 8 * 8 * 1)
  rng = np.random.default_rng(0)
  out = ours.apply({"params": params}, jnp.asarray(rng.random((2, 64, 64, 1), np.float32)),
                   jnp.asarray(rng.random((2, 64), np.float32)))
  assert out["logits"].shape == (2, 64, 64) and np.isfinite(np.asarray(out["logits"])).all()


def test_channel_sum_reproduces_the_rgb_model_on_grey_images(tmp_path):
  """Same grid: a grey image through the converted 1-channel MAE gives the 3-channel model's
  output for that image repeated in R, G and B, its prediction averaged over channels."""
  torch = _torch()
  hf = _hf_rgb_checkpoint(tmp_path / "hf")
  ours = _grey_mae(32)
  params, _ = convert.load_params(tmp_path / "hf", _init(ours))
  rng = np.random.default_rng(2)
  grey = rng.random((3, 32, 32, 1), dtype=np.float32)
  noise = rng.random((3, 16), dtype=np.float32)
  with torch.no_grad():
    ref = hf(pixel_values=torch.from_numpy(np.repeat(grey, 3, -1).transpose(0, 3, 1, 2)),
             noise=torch.from_numpy(noise)).logits.numpy()
  got = np.asarray(ours.apply({"params": params}, jnp.asarray(grey), jnp.asarray(noise))["logits"])
  np.testing.assert_allclose(got, ref.reshape(3, 16, 64, 3).mean(-1), atol=2e-5, rtol=0)


def test_import_weights_into_a_classifier_keeps_the_head(tmp_path):
  from configs import finetune as finetune_config  # pylint: disable=g-import-not-at-top
  _hf_rgb_checkpoint(tmp_path / "hf", image=64, patch=16, dim=32, depth=2, heads=2)
  config = finetune_config.get_config("tiny")   # 64x64, patch 16, dim 32, depth 2
  model = build.build_classifier(config.model, 3)
  params, stats = build.init_classifier(model, jax.random.key(0))
  loaded = convert.import_weights(tmp_path / "hf", params, model.vit.num_patches)
  jax.tree.map(np.testing.assert_array_equal, loaded["classifier"],
               jax.device_get(params["classifier"]))
  assert not np.allclose(loaded["encoder"]["cls_token"], params["encoder"]["cls_token"])
  logits = model.apply({"params": loaded, "batch_stats": stats}, jnp.ones((2, 64, 64, 1)))["logits"]
  assert logits.shape == (2, 3) and np.isfinite(np.asarray(logits)).all()


def test_encoder_only_checkpoint_leaves_the_decoder_fresh(small, tmp_path, caplog):
  _, params = small
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  state = {k: np.ascontiguousarray(v) for k, v in _fb_state(params).items()
           if not k.startswith(("decoder", "mask_token"))}
  save_file(state, str(tmp_path / "encoder.safetensors"))
  loaded, kept = convert.load_params(tmp_path / "encoder.safetensors", params)
  assert kept and all(n.startswith("decoder/") for n in kept)
  assert "holds no MAE decoder" in caplog.text
  jax.tree.map(np.testing.assert_array_equal, loaded["encoder"], params["encoder"])


def test_files_that_are_not_mae_checkpoints_are_refused_clearly(small, tmp_path):
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  _, params = small
  save_file({"fc.weight": np.zeros((2, 2), np.float32)}, str(tmp_path / "other.safetensors"))
  with pytest.raises(errors.ConversionError,
                     match=r"init_weights=.*other.safetensors: not an MAE checkpoint"):
    convert.import_weights(tmp_path / "other.safetensors", params)
  (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 20)
  with pytest.raises(convert.ConversionError, match="not a readable safetensors file"):
    convert.load_params(tmp_path / "bad.safetensors", params)
  (tmp_path / "stage" / "checkpoints").mkdir(parents=True)
  with pytest.raises(convert.ConversionError, match="stage workdir.*init_from"):
    convert.load_params(tmp_path / "stage", params)
  rgb = dict(_fb_state(params))
  rgb["patch_embed.proj.weight"] = np.zeros((16, 3, 8, 8), np.float32)  # patch 8, model's 4
  with pytest.raises(convert.ConversionError, match="patch size is 8x8, the model's 4x4"):
    convert.convert(rgb, params)
