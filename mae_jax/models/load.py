"""Where a model's starting params come from, other than its own initialisation.

Two sources: another stage's checkpoint (`restore_from_stage`: the probe and the
fine-tune start from pretraining), and public PyTorch MAE weights
(facebookresearch/mae state dicts or Hugging Face `ViTMAEForPreTraining`
checkpoints, `load_params` / `import_weights`).

  python -m mae_jax.models.load --checkpoint mae_pretrain.pth \
      --config configs/pretrain.py:seed --out runs/imported
  python main.py --config=configs/finetune.py:seed --config.init_from=runs/imported ...

Or, from a config, as a stage's starting point (before any resume):
`--config.init_weights=mae_pretrain.pth` (pretrain: encoder and, when the file
has one, decoder; probe / fine-tune: the encoder).

Position embeddings are fixed sin-cos in both codebases: this model computes
them from its own patch grid and stores none, so a checkpoint made for another
image size (another grid) loads unchanged, its embeddings recomputed, not
interpolated. A checkpoint for C-channel images loads into a 1-channel model:
the patch kernel is summed over channels (a grey image then gives the features
the original gives that image repeated in every channel), and the decoder's
per-pixel prediction is averaged over channels. Every other shape must match
the target model exactly; a mismatch names the tensor and both shapes.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np
from absl import logging
from flax import traverse_util

from mae_jax.models import build
from mae_jax.models import masking
from mae_jax.runtime import checkpoint
from mae_jax.runtime import errors
from mae_jax.runtime import workdir as workdir_lib

PyTree = Any
ConversionError = errors.ConversionError

# Hugging Face ViTMAE names (transformers 4.x and 5.x) -> facebookresearch/mae names.
_HF_RULES = [
    (r"vit\.embeddings\.cls_token", "cls_token"),
    (r"vit\.embeddings\.position_embeddings", "pos_embed"),
    (r"vit\.embeddings\.patch_embeddings\.projection\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"vit\.(?:layers|encoder\.layer)\.(\d+)\.(.+)", r"blocks.\1.\2"),
    (r"vit\.layernorm\.(weight|bias)", r"norm.\1"),
    # Files written by save_pretrained use the legacy names (decoder_encoder.layer.N).
    (r"decoder\.decoder_(?:layers|encoder\.layer)\.(\d+)\.(.+)", r"decoder_blocks.\1.\2"),
    (r"decoder\.(mask_token|decoder_pos_embed|decoder_embed\..+|decoder_norm\..+|"
     r"decoder_pred\..+)", r"\1"),
]
# Inside a block: HF sub-module names -> MAE's; q/k/v are fused afterwards.
_HF_BLOCK_RULES = [
    (r"attention\.(?:q_proj|attention\.query)\.(weight|bias)", r"attn.q.\1"),
    (r"attention\.(?:k_proj|attention\.key)\.(weight|bias)", r"attn.k.\1"),
    (r"attention\.(?:v_proj|attention\.value)\.(weight|bias)", r"attn.v.\1"),
    (r"attention\.(?:o_proj|output\.dense)\.(weight|bias)", r"attn.proj.\1"),
    (r"layernorm_before\.(weight|bias)", r"norm1.\1"),
    (r"layernorm_after\.(weight|bias)", r"norm2.\1"),
    (r"(?:mlp\.fc1|intermediate\.dense)\.(weight|bias)", r"mlp.fc1.\1"),
    (r"(?:mlp\.fc2|output\.dense)\.(weight|bias)", r"mlp.fc2.\1"),
]


def _rename(name: str, rules) -> str | None:
  for pattern, repl in rules:
    if re.fullmatch(pattern, name):
      return re.sub(pattern, repl, name)
  return None


def _from_hf(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  out, unused = {}, []
  for name, value in state.items():
    new = _rename(name, _HF_RULES)
    if new is None:
      unused.append(name)
      continue
    m = re.fullmatch(r"((?:decoder_)?blocks\.\d+)\.(.+)", new)
    if m:
      inner = _rename(m.group(2), _HF_BLOCK_RULES)
      if inner is None:
        unused.append(name)
        continue
      new = f"{m.group(1)}.{inner}"
    out[new] = value
  for key in [k for k in out if re.fullmatch(r".*\.attn\.q\.(weight|bias)", k)]:
    prefix, kind = key.rsplit(".attn.q.", 1)
    parts = [out.pop(f"{prefix}.attn.{x}.{kind}", None) for x in "qkv"]
    if any(p is None for p in parts):
      raise ConversionError(f"{prefix}: q, k and v projections are not all present")
    out[f"{prefix}.attn.qkv.{kind}"] = np.concatenate(parts, axis=0)
  if unused:
    logging.info("ignored %d checkpoint tensors: %s", len(unused), ", ".join(unused[:8]))
  return out


def canonical_state(state: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Numpy tensors under facebookresearch/mae names, from either format.

  Raises:
    ConversionError: the mapping is neither an MAE nor a ViTMAE state dict.
  """
  state = {k: np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v, np.float32)
           for k, v in state.items() if hasattr(v, "shape")}
  if "embeddings.cls_token" in state:  # a bare ViTMAEModel (encoder only)
    state = {f"vit.{k}": v for k, v in state.items()}
  if "vit.embeddings.cls_token" in state:
    return _from_hf(state)
  if "cls_token" in state and "patch_embed.proj.weight" in state:
    return dict(state)
  keys = ", ".join(list(state)[:6]) or "none"
  raise ConversionError(
      "not an MAE checkpoint: expected facebookresearch/mae keys (cls_token, "
      "patch_embed.proj.weight, blocks.N.attn.qkv.weight, ...) or Hugging Face ViTMAE keys "
      f"(vit.embeddings.cls_token, ...); found: {keys}")


def _linear(state, name):
  return {"kernel": state[f"{name}.weight"].T, "bias": state[f"{name}.bias"]}


def _norm(state, name):
  return {"scale": state[f"{name}.weight"], "bias": state[f"{name}.bias"]}


def _block(state, prefix):
  return {
      "norm1": _norm(state, f"{prefix}.norm1"),
      "attn": {"qkv": _linear(state, f"{prefix}.attn.qkv"),
               "proj": _linear(state, f"{prefix}.attn.proj")},
      "norm2": _norm(state, f"{prefix}.norm2"),
      "mlp": {"fc1": _linear(state, f"{prefix}.mlp.fc1"),
              "fc2": _linear(state, f"{prefix}.mlp.fc2")},
  }


def _count_blocks(state, prefix):
  return len({int(m.group(1)) for k in state
              if (m := re.fullmatch(rf"{prefix}\.(\d+)\..+", k))})


def _to_tree(state: dict[str, np.ndarray], with_decoder: bool) -> PyTree:
  try:
    encoder = {
        "patch_embed": {"kernel": state["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
                        "bias": state["patch_embed.proj.bias"]},
        "cls_token": state["cls_token"],
        **{f"block_{i}": _block(state, f"blocks.{i}")
           for i in range(_count_blocks(state, "blocks"))},
        "norm": _norm(state, "norm"),
    }
    if not with_decoder:
      return {"encoder": encoder}
    decoder = {
        "embed": _linear(state, "decoder_embed"),
        "mask_token": state["mask_token"],
        **{f"block_{i}": _block(state, f"decoder_blocks.{i}")
           for i in range(_count_blocks(state, "decoder_blocks"))},
        "norm": _norm(state, "decoder_norm"),
        "pred": _linear(state, "decoder_pred"),
    }
  except KeyError as e:
    raise ConversionError(f"checkpoint lacks tensor {e.args[0]}") from None
  return {"encoder": encoder, "decoder": decoder}


def _check_against(tree: PyTree, template: PyTree, path: str = "") -> None:
  if isinstance(template, Mapping):
    if not isinstance(tree, Mapping):
      raise ConversionError(f"{path or 'params'}: expected a group, found a tensor")
    missing = sorted(set(template) - set(tree))
    extra = sorted(set(tree) - set(template))
    if missing or extra:
      raise ConversionError(f"{path or 'params'}: checkpoint lacks {missing or 'nothing'}, "
                            f"has unexpected {extra or 'nothing'} (different depth?)")
    for k in template:
      _check_against(tree[k], template[k], f"{path}/{k}" if path else k)
    return
  if tuple(np.shape(tree)) != tuple(template.shape):
    raise ConversionError(f"tensor {path}: checkpoint shape {tuple(np.shape(tree))} != "
                          f"model shape {tuple(template.shape)}")


def _check_pos_embed(canonical: dict[str, np.ndarray], name: str, dim: int,
                     num_patches: int) -> None:
  """Warns when a checkpoint's position embeddings are not the fixed sin-cos ones we use."""
  if name not in canonical:
    return
  side = int(round(num_patches ** 0.5))
  expected = masking.sincos_pos_embed(dim, (side, side))
  found = canonical[name].reshape(-1, canonical[name].shape[-1])
  if found.shape != expected.shape or np.abs(found - expected).max() > 1e-4:
    logging.warning("checkpoint %s differs from the fixed 2-D sin-cos embeddings this model "
                    "uses (shape %s vs %s); the imported model will not reproduce the "
                    "original's outputs exactly", name, found.shape, expected.shape)


def adapt_patch_layers(canonical: dict[str, np.ndarray], patch: int,
                       channels: int) -> dict[str, np.ndarray]:
  """Maps the patch layers of a checkpoint for C-channel images onto `channels`.

  Only C -> 1 is defined: the patch-embedding kernel (D, C, p, p) is summed over
  C, and the decoder's prediction (p*p*C outputs per patch, channel fastest, as
  both codebases patchify) is averaged over C.

  Raises:
    ConversionError: the patch size differs, or C -> `channels` with `channels` > 1.
  """
  weight = canonical.get("patch_embed.proj.weight")
  if weight is None or weight.ndim != 4:
    return canonical
  if weight.shape[2:] != (patch, patch):
    raise ConversionError(f"the checkpoint's patch size is {weight.shape[2]}x{weight.shape[3]}, "
                          f"the model's {patch}x{patch}: set model.patch={weight.shape[2]}")
  c = weight.shape[1]
  if c == channels:
    return canonical
  if channels != 1:
    raise ConversionError(f"the checkpoint is for {c}-channel images, the model for {channels}; "
                          f"only {c} -> 1 (kernel summed over channels) is supported")
  out = dict(canonical)
  out["patch_embed.proj.weight"] = weight.sum(axis=1, keepdims=True)
  if "decoder_pred.weight" in out and out["decoder_pred.weight"].shape[0] == patch * patch * c:
    w, b = out["decoder_pred.weight"], out["decoder_pred.bias"]
    out["decoder_pred.weight"] = w.reshape(patch * patch, c, w.shape[-1]).mean(axis=1)
    out["decoder_pred.bias"] = b.reshape(patch * patch, c).mean(axis=1)
  logging.info("checkpoint for %d-channel images: patch kernel summed over channels%s", c,
               ", decoder prediction averaged over them" if "decoder_pred.weight" in out else "")
  return out


def has_decoder(canonical: Mapping[str, np.ndarray]) -> bool:
  """Whether a canonical state dict holds an MAE decoder (released encoders often don't)."""
  return "decoder_embed.weight" in canonical


def convert(state: Mapping[str, Any], template: PyTree, num_patches: int | None = None) -> PyTree:
  """Params shaped like `template` (an MAE's params, or `{'encoder': ...}`) from a
  PyTorch state dict in facebookresearch/mae or Hugging Face ViTMAE naming.

  `num_patches`, the model's patch count if known, only serves to say when the
  checkpoint's grid differs (its position embeddings are recomputed either way).
  """
  canonical = canonical_state(state)
  kernel = template["encoder"]["patch_embed"]["kernel"]   # (p, p, C, D)
  canonical = adapt_patch_layers(canonical, kernel.shape[0], kernel.shape[2])
  tree = _to_tree(canonical, with_decoder="decoder" in template)
  _check_against(tree, template)
  theirs = None
  if "pos_embed" in canonical:
    theirs = canonical["pos_embed"].reshape(-1, kernel.shape[-1]).shape[0] - 1
  if theirs:
    _check_pos_embed(canonical, "pos_embed", kernel.shape[-1], theirs)
    if "decoder" in template:
      _check_pos_embed(canonical, "decoder_pos_embed",
                       template["decoder"]["embed"]["kernel"].shape[-1], theirs)
    if num_patches and theirs != num_patches:
      logging.info("the checkpoint's patch grid has %d patches, this model's %d: position "
                   "embeddings are fixed sin-cos, recomputed for this grid", theirs, num_patches)
  return tree


def load_params(path: str | Path, template: PyTree,
                num_patches: int | None = None) -> tuple[PyTree, list[str]]:
  """`template` (an MAE's or a classifier's params) with its encoder, and its decoder
  if both it and the file have one, taken from the checkpoint at `path`.

  Returns:
    (params, names of the params left as in `template`).

  Raises:
    ConversionError: the file is unreadable, not an MAE / ViTMAE checkpoint, or
      made for another architecture.
  """
  canonical = canonical_state(load_state_dict(path))
  wanted = {"encoder": template["encoder"]}
  if "decoder" in template:
    if has_decoder(canonical):
      wanted["decoder"] = template["decoder"]
    else:
      logging.warning("%s holds no MAE decoder: the decoder starts from scratch", path)
  loaded = convert(canonical, wanted, num_patches)
  params = {**template, **loaded}
  kept = [n for n in traverse_util.flatten_dict(template, sep="/")
          if n.split("/", 1)[0] not in loaded]
  return params, kept


def import_weights(path: str | Path, params: PyTree, num_patches: int | None = None) -> PyTree:
  """A stage's `init_weights`: `params` with what `load_params` takes from `path`.

  Raises:
    errors.ConversionError: whatever `load_params` refuses, with the file named.
  """
  try:
    loaded, kept = load_params(path, params, num_patches)
  except ConversionError as e:
    raise ConversionError(f"init_weights={path}: {e}") from None
  logging.info("initialised from weights %s; fresh: %s", path,
               ", ".join(sorted({n.split("/")[0] for n in kept})) or "none")
  return loaded


def load_state_dict(path: str | Path) -> dict[str, Any]:
  """Reads a `.pth`/`.pt`/`.bin` (torch), `.safetensors` file, or a Hugging Face folder."""
  path = Path(path)
  if path.is_dir():
    for name in (workdir_lib.HF_WEIGHTS, "pytorch_model.bin"):
      if (path / name).exists():
        return load_state_dict(path / name)
    if (path / workdir_lib.CHECKPOINTS).is_dir():
      raise ConversionError(f"{path} is a mae_jax stage workdir, not a PyTorch checkpoint: "
                            f"start from it with --config.init_from={path}")
    raise ConversionError(f"{path} holds neither model.safetensors nor pytorch_model.bin")
  if not path.exists():
    raise ConversionError(f"{path} does not exist")
  if path.suffix == ".safetensors":
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    try:
      return load_file(str(path))
    except Exception as e:  # pylint: disable=broad-except
      raise ConversionError(f"{path} is not a readable safetensors file ({e})") from None
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ConversionError("reading PyTorch checkpoints needs torch: pip install torch") from None
  try:
    # facebookresearch/mae training checkpoints also hold their argparse.Namespace.
    with torch.serialization.safe_globals([argparse.Namespace]):
      obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    raise ConversionError(f"{path} is not a readable PyTorch checkpoint ({e})") from None
  for key in ("model", "state_dict"):
    if isinstance(obj, dict) and isinstance(obj.get(key), dict):
      obj = obj[key]
  if not isinstance(obj, dict):
    raise ConversionError(f"{path} holds a {type(obj).__name__}, not a state dict")
  return obj


def adapt_bands(name: str, value: Any, shape: tuple[int, ...]) -> np.ndarray | None:
  """A single-band patch-embedding kernel `value` for a model of `shape[2]` bands: repeated
  over the bands and scaled by 1/bands, so an image whose bands are equal embeds as the
  single-band image did; None where `name` and the shapes are not such a pair."""
  value = np.asarray(value)
  if not (name.startswith("encoder/patch_embed/") and name.endswith("kernel")) or \
      value.ndim != 4 or len(shape) != 4 or value.shape[2] != 1 or shape[2] < 2 or \
      value.shape[:2] != tuple(shape[:2]) or value.shape[3] != shape[3]:
    return None
  return np.repeat(value, shape[2], axis=2) / shape[2]


def _merge(template: PyTree, loaded: dict[str, Any], dont_load: list[str], required: str,
           what: str) -> tuple[PyTree, list[str]]:
  """`template` with each leaf replaced by the same-named (`/`-joined) loaded one,
  shape-checked (a single-band patch embedding adapted to more bands, `adapt_bands`, in
  one log line); returns it and the names left as they were."""
  fresh, out = [], {}
  for name, node in traverse_util.flatten_dict(template, sep="/").items():
    if any(re.fullmatch(p, name) for p in dont_load) or name not in loaded:
      if name not in loaded and re.fullmatch(required, name):
        raise errors.IncompatibleCheckpointError(
            f"{what} has no param {name} (model shape {tuple(node.shape)}): it was made for "
            "another architecture")
      fresh.append(name)
      out[name] = node
      continue
    value = loaded[name]
    adapted = adapt_bands(name, value, tuple(node.shape))
    if adapted is not None:
      logging.info("%s: %s of one band repeated over %d bands and scaled by 1/%d", what, name,
                   node.shape[2], node.shape[2])
      value = adapted
    if tuple(value.shape) != tuple(node.shape):
      raise errors.IncompatibleCheckpointError(
          f"{what}: param {name} has shape {tuple(value.shape)} there but "
          f"{tuple(node.shape)} in this model; the model config must match the source stage's")
    out[name] = jax.numpy.asarray(value, node.dtype)
  return traverse_util.unflatten_dict(out, sep="/"), fresh


def restore_from_stage(source_workdir: str | Path, params: PyTree, batch_stats: PyTree,
                       *, dont_load: list[str], required: str = r"encoder/.*",
                       make_it: str = "") -> tuple[PyTree, PyTree, int, list[str]]:
  """Initialises params (and BatchNorm statistics) from another stage's latest checkpoint.

  Every param whose name is in the checkpoint with the same shape is taken,
  except those matching a `dont_load` pattern; the rest keep their fresh
  initialisation (listed in the result). Optimiser state is never taken. Encoder
  settings no shape reveals (e.g. heads) are the stage's to check beforehand, against
  the source's `config.json` (`stages/validate.py`, `check_source_encoder`).

  Raises:
    errors.MissingCheckpointError: no checkpoint there (`make_it` says how to make one).
    errors.IncompatibleCheckpointError: a `required` param is missing, any shape
      differs, or the checkpoint has encoder params this model lacks (a deeper encoder).

  Returns:
    (params, batch_stats, the source step, names left freshly initialised).
  """
  path = Path(source_workdir).absolute() / workdir_lib.CHECKPOINTS
  try:
    restored, step = checkpoint.restore_latest_on_one_device(path)
  except errors.MissingCheckpointError:
    raise errors.MissingCheckpointError(
        f"no checkpoint in {path}" + (f"; make one with:\n  {make_it}" if make_it else "")
    ) from None
  what = f"checkpoint {path}/{step}"
  loaded = traverse_util.flatten_dict(restored["params"], sep="/")
  params, fresh = _merge(params, loaded, dont_load, required, what)
  ours = set(traverse_util.flatten_dict(params, sep="/"))
  extra = sorted(n for n in loaded if n.startswith("encoder/") and n not in ours)
  if extra:
    raise errors.IncompatibleCheckpointError(
        f"{what} has encoder param {extra[0]} that this model lacks ({len(extra)} in all): "
        "it was made for a deeper or different encoder")
  if batch_stats:
    stats = traverse_util.flatten_dict(restored.get("batch_stats") or {}, sep="/")
    batch_stats, _ = _merge(batch_stats, stats, dont_load, r"$^", what)
  return params, batch_stats, step, fresh


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m mae_jax.models.load", description=__doc__)
  parser.add_argument("--checkpoint", required=True, help=".pth/.safetensors file or HF folder")
  parser.add_argument("--config", default="configs/pretrain.py:seed",
                      help="pretrain config (file.py:preset) whose model sizes to match")
  parser.add_argument("--out", required=True, help="folder for the converted params (orbax)")
  args = parser.parse_args(argv)

  file, _, preset = args.config.partition(":")
  spec = importlib.util.spec_from_file_location("mae_jax_convert_config", file)
  if spec is None or not Path(file).exists():
    raise ConversionError(f"config file {file} not found")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(preset or None)
  mae = build.build_mae(config.model)
  template = build.init_mae(mae, jax.random.key(0))
  params = convert(load_state_dict(args.checkpoint), template)
  # Written like a stage's checkpoint, so `--config.init_from=OUT` can start from it.
  mngr = checkpoint.manager(args.out, max_to_keep=1)
  checkpoint.save(mngr, 0, {"params": params})
  checkpoint.seal(mngr)
  mngr.close()
  saved = Path(args.out).absolute() / workdir_lib.CHECKPOINTS / "0"
  print(f"converted {args.checkpoint} -> {saved}; "
        f"start a stage from it with --config.init_from={args.out}")


if __name__ == "__main__":
  main()
