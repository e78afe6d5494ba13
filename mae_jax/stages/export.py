"""Hand a trained model to PyTorch users: Hugging Face folders from a stage's workdir.

  python -m mae_jax.stages.export --workdir runs/pretrain_demo --out exports/mae_demo
  python -m mae_jax.stages.export --workdir runs/finetune_demo --out exports/vit_demo
  python -m mae_jax.stages.export --workdir runs/finetune_demo --out exports/enc --encoder_only

Then, in PyTorch (`pip install transformers torch`):

  from transformers import ViTMAEForPreTraining, ViTForImageClassification, ViTModel
  mae = ViTMAEForPreTraining.from_pretrained("exports/mae_demo")

What is written, from the workdir's latest checkpoint that restores and its config.json:

- a **pretraining** workdir: a `ViTMAEForPreTraining` folder (config.json +
  model.safetensors), encoder and decoder. Given the same images and masking noise it
  returns mae_jax's decoder outputs: logits of [0, 1] pixels with `loss.type='bce'` (the
  `seed` preset; apply a sigmoid), each patch's high-pass part with
  `loss.target='highpass'` (the `demo` preset); config.json's `mae_jax.note` says which
  (Hugging Face's own loss is MSE on pixels).
- a **probe or fine-tune** workdir whose head maps onto Hugging Face's (the MAE linear
  head, `model.head='linear'`, on the CLS token after the final norm): a
  `ViTForImageClassification` folder, the head's BatchNorm (inference statistics) folded
  into the classifier, labels named no_sub / cdm / axion; same class scores.
- `--encoder_only`, from either: a `ViTModel` folder (the encoder alone), for any head.

Does not map (refused with the reason): the seed's MLP head (Dense, BatchNorm, ReLU,
dropout twice: no Hugging Face class has it; export the encoder alone), mean pooling or
features of an inner block, the convolutional patch stem (`model.stem='conv'`), the CNN.
Position embeddings are the fixed 2-D sin-cos ones in both. Inputs are mae_jax's: each
image min-max normalised to [0, 1] on its own (`mae_jax.train.batching.normalize`), as
(N, C, H, W) `pixel_values`; Hugging Face's image processors do not do that.
Names are those transformers 5.24's `save_pretrained` writes; `mae_jax.models.load`
reads such a folder back into the same params.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from mae_jax import objectives
from mae_jax.data import layout
from mae_jax.models import masking
from mae_jax.runtime import checkpoint
from mae_jax.runtime import errors
from mae_jax.runtime import fileio
from mae_jax.runtime import workdir as workdir_lib

PyTree = Any
ConversionError = errors.ConversionError
LN_EPS = 1e-6   # vit.LN_EPS; the MAE reference's LayerNorm epsilon
HEAD_BN_EPS = 1e-6   # heads.LinearHead's BatchNorm epsilon


def _linear(p: dict) -> dict[str, np.ndarray]:
  return {"weight": np.asarray(p["kernel"]).T, "bias": np.asarray(p["bias"])}


def _norm(p: dict) -> dict[str, np.ndarray]:
  return {"weight": np.asarray(p["scale"]), "bias": np.asarray(p["bias"])}


def _put(out: dict, prefix: str, tensors: dict[str, np.ndarray]) -> None:
  for k, v in tensors.items():
    out[f"{prefix}.{k}"] = np.ascontiguousarray(v, np.float32)


def _block(out: dict, prefix: str, block: dict) -> None:
  """One pre-norm block under Hugging Face's ViT layer names (q, k, v split)."""
  qkv = _linear(block["attn"]["qkv"])
  for i, name in enumerate(("query", "key", "value")):
    d = qkv["weight"].shape[0] // 3
    _put(out, f"{prefix}.attention.attention.{name}",
         {"weight": qkv["weight"][i * d:(i + 1) * d], "bias": qkv["bias"][i * d:(i + 1) * d]})
  _put(out, f"{prefix}.attention.output.dense", _linear(block["attn"]["proj"]))
  _put(out, f"{prefix}.layernorm_before", _norm(block["norm1"]))
  _put(out, f"{prefix}.layernorm_after", _norm(block["norm2"]))
  _put(out, f"{prefix}.intermediate.dense", _linear(block["mlp"]["fc1"]))
  _put(out, f"{prefix}.output.dense", _linear(block["mlp"]["fc2"]))


def _depth(group: dict) -> int:
  return len([k for k in group if k.startswith("block_")])


def encoder_tensors(encoder: dict, model: dict, prefix: str = "vit") -> dict[str, np.ndarray]:
  """The encoder under Hugging Face's ViT names (`prefix`: 'vit', or '' for a ViTModel)."""
  p = f"{prefix}." if prefix else ""
  grid = (model["image_size"] // model["patch"],) * 2
  out: dict[str, np.ndarray] = {}
  kernel = np.asarray(encoder["patch_embed"]["kernel"])          # (p, p, C, D)
  _put(out, f"{p}embeddings.patch_embeddings.projection",
       {"weight": kernel.transpose(3, 2, 0, 1), "bias": np.asarray(encoder["patch_embed"]["bias"])})
  out[f"{p}embeddings.cls_token"] = np.asarray(encoder["cls_token"], np.float32)
  out[f"{p}embeddings.position_embeddings"] = masking.sincos_pos_embed(model["dim"], grid)[None]
  for i in range(_depth(encoder)):
    _block(out, f"{p}encoder.layer.{i}", encoder[f"block_{i}"])
  _put(out, f"{p}layernorm", _norm(encoder["norm"]))
  return out


def decoder_tensors(decoder: dict, model: dict) -> dict[str, np.ndarray]:
  """The MAE decoder under Hugging Face's ViTMAE decoder names."""
  grid = (model["image_size"] // model["patch"],) * 2
  out: dict[str, np.ndarray] = {}
  _put(out, "decoder.decoder_embed", _linear(decoder["embed"]))
  out["decoder.mask_token"] = np.asarray(decoder["mask_token"], np.float32)
  out["decoder.decoder_pos_embed"] = masking.sincos_pos_embed(model["decoder_dim"], grid)[None]
  for i in range(_depth(decoder)):
    _block(out, f"decoder.decoder_encoder.layer.{i}", decoder[f"block_{i}"])
  _put(out, "decoder.decoder_norm", _norm(decoder["norm"]))
  _put(out, "decoder.decoder_pred", _linear(decoder["pred"]))
  return out


def _vit_config(model: dict) -> dict[str, Any]:
  return {
      "hidden_size": model["dim"], "num_hidden_layers": model["depth"],
      "num_attention_heads": model["heads"],
      "intermediate_size": int(model["dim"] * model["mlp_ratio"]), "hidden_act": "gelu",
      "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
      "layer_norm_eps": LN_EPS, "image_size": model["image_size"], "patch_size": model["patch"],
      "num_channels": model["channels"], "qkv_bias": True, "initializer_range": 0.02,
  }


def mae_config(model: dict, loss: dict) -> dict[str, Any]:
  """config.json of a `ViTMAEForPreTraining` with the MAE's sizes; what its decoder
  outputs is the objective's to say (a saved `loss` lacking keys takes their defaults)."""
  objective = objectives.from_config(loss)
  return {
      "architectures": ["ViTMAEForPreTraining"], "model_type": "vit_mae", **_vit_config(model),
      "decoder_hidden_size": model["decoder_dim"],
      "decoder_num_hidden_layers": model["decoder_depth"],
      "decoder_num_attention_heads": model["decoder_heads"],
      "decoder_intermediate_size": int(model["decoder_dim"] * model["mlp_ratio"]),
      "mask_ratio": model["mask_ratio"],
      **objective.export_fields(),
      "mae_jax": {"loss": loss, "note": objective.export_note()},
  }


def classifier_config(model: dict, encoder_only: bool) -> dict[str, Any]:
  """config.json of a `ViTForImageClassification` (or a bare `ViTModel`)."""
  config = {"architectures": ["ViTModel" if encoder_only else "ViTForImageClassification"],
            "model_type": "vit", **_vit_config(model)}
  if not encoder_only:
    config["id2label"] = {str(i): n for i, n in enumerate(layout.CLASS_NAMES)}
    config["label2id"] = {n: i for i, n in enumerate(layout.CLASS_NAMES)}
  return config


def folded_linear_head(head: dict, stats: dict) -> dict[str, np.ndarray]:
  """The MAE linear head (BatchNorm without affine, inference statistics, then a linear
  layer) as one linear layer: W' = W / sigma per input row, b' = b - mean / sigma . W."""
  mean, var = np.asarray(stats["bn"]["mean"]), np.asarray(stats["bn"]["var"])
  sigma = np.sqrt(var + HEAD_BN_EPS)
  kernel, bias = np.asarray(head["out"]["kernel"]), np.asarray(head["out"]["bias"])
  folded = kernel / sigma[:, None]
  return {"weight": folded.T, "bias": bias - (mean / sigma) @ kernel}


def _refuse_unmappable(model: dict, classifier: bool, encoder_only: bool) -> None:
  problems = []
  if model.get("arch", "vit") != "vit":
    problems.append(f"model.arch={model['arch']!r} (only the ViT maps)")
  if model.get("stem", "linear") != "linear":
    problems.append("model.stem='conv' (Hugging Face's ViT embeds patches linearly)")
  if classifier and not encoder_only:
    if model.get("head") != "linear":
      problems.append(f"model.head={model.get('head')!r} (no Hugging Face class has the seed's "
                      "MLP head; --encoder_only exports the encoder)")
    if model.get("pool") != "cls" or model.get("feature_block", -1) != -1:
      problems.append(f"pool={model.get('pool')!r}, feature_block={model.get('feature_block')} "
                      "(ViTForImageClassification reads the CLS token after the final norm)")
  if problems:
    raise ConversionError("cannot export this model to Hugging Face: " + "; ".join(problems))


def _tensors_and_config(state: dict, config: dict, classifier: bool, encoder_only: bool
                        ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """The Hugging Face tensors and config.json of a restored state (see `export`)."""
  params, model = state["params"], config["model"]
  if encoder_only:
    return encoder_tensors(params["encoder"], model, prefix=""), classifier_config(model, True)
  if classifier:
    tensors = encoder_tensors(params["encoder"], model)
    _put(tensors, "classifier", folded_linear_head(params["classifier"],
                                                   state["batch_stats"]["classifier"]))
    return tensors, classifier_config(model, False)
  return ({**encoder_tensors(params["encoder"], model),
           **decoder_tensors(params["decoder"], model)},
          mae_config(model, config.get("loss", {})))


def export(workdir: str | Path, out: str | Path, encoder_only: bool = False) -> dict[str, Any]:
  """Writes the Hugging Face folder of `workdir`'s latest checkpoint to `out`.

  Returns:
    A summary: the class written, the source step, the tensor count.

  Raises:
    errors.ConversionError: the workdir's model does not map (says why), or it is not a
      training stage's workdir.
    errors.MissingCheckpointError / DamagedCheckpointError: no checkpoint restores.
  """
  workdir, out = Path(workdir), Path(out)
  saved = workdir / workdir_lib.CONFIG_FILE
  if not saved.exists():
    raise ConversionError(f"{workdir} has no {workdir_lib.CONFIG_FILE}: not a pretrain, probe "
                          "or fine-tune workdir")
  config = json.loads(saved.read_text())
  model, stage = config["model"], config.get("stage")
  classifier = stage in ("probe", "finetune")
  _refuse_unmappable(model, classifier, encoder_only)
  state, step = checkpoint.restore_latest_on_one_device(workdir / workdir_lib.CHECKPOINTS)
  tensors, hf = _tensors_and_config(state, config, classifier, encoder_only)
  hf["mae_jax_source"] = {"workdir": str(workdir), "stage": stage, "step": int(step)}
  out.mkdir(parents=True, exist_ok=True)
  save_file(tensors, str(out / workdir_lib.HF_WEIGHTS), metadata={"format": "pt"})
  fileio.write_json_atomic(out / workdir_lib.HF_CONFIG, hf)
  return {"class": hf["architectures"][0], "step": int(step), "tensors": len(tensors),
          "out": str(out)}


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m mae_jax.stages.export",
                                   description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, help="a pretrain, probe or fine-tune workdir")
  parser.add_argument("--out", required=True, help="the Hugging Face folder to write")
  parser.add_argument("--encoder_only", action="store_true",
                      help="write the encoder alone, as a ViTModel")
  args = parser.parse_args(argv)
  try:
    done = export(args.workdir, args.out, args.encoder_only)
  except errors.UserError as e:
    raise SystemExit(f"error: {e}") from None
  print(f"wrote {done['class']} ({done['tensors']} tensors, checkpoint step {done['step']}) "
        f"to {done['out']}")


if __name__ == "__main__":
  main()
