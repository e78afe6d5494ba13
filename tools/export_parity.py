"""How closely a Hugging Face export reproduces mae_jax on real images: exports a trained
workdir (`python -m mae_jax.stages.export`), runs the export in transformers and mae_jax on
the same images (and the same masking noise for an MAE), and prints the largest absolute
difference of the outputs, their scale, and each one's distance from the export run in
float64 (how much of the difference is float32 rounding).

  python tools/export_parity.py --workdir runs/pretrain_demo --data data/model_ii_sim_demo
  python tools/export_parity.py --workdir runs/finetune_demo --data DIR --encoder_only

A pretraining workdir is compared on the reconstruction logits (and the mask); a probe or
fine-tune workdir on the class scores, or with --encoder_only on the CLS features. Needs
torch and transformers (requirements-test.txt).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import jax.numpy as jnp
import ml_collections
import numpy as np
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mae_jax.data import layout  # noqa: E402
from mae_jax.models import build  # noqa: E402
from mae_jax.runtime import checkpoint  # noqa: E402
from mae_jax.runtime import fileio  # noqa: E402
from mae_jax.runtime import workdir as workdir_lib  # noqa: E402
from mae_jax.stages import export  # noqa: E402
from mae_jax.stages import predict  # noqa: E402


def _images(data: Path, per_class: int, size: int) -> np.ndarray:
  """The first `per_class` images of each class folder, normalised as mae_jax does."""
  files = layout.list_class_files(data)
  raw = []
  for name in layout.CLASS_NAMES:
    for path in files[name][:per_class]:
      item = np.load(path, allow_pickle=name == "axion")
      image = np.asarray(item[0] if item.dtype == object else item, np.float32)
      raw.append(image.reshape(size, size))
  return predict.normalize(np.stack(raw))


def _report(what: str, hf: np.ndarray, ours: np.ndarray, exact: np.ndarray) -> None:
  """The float32 outputs' largest difference, and each one's from the export run in
  float64 (the rounding a float32 forward pass carries anyway)."""
  diff = np.abs(hf - ours)
  print(f"{what}: {ours.size:,} values (max |x| {np.abs(ours).max():.3g}); max |HF - mae_jax| "
        f"{diff.max():.2e} (mean {diff.mean():.1e}); from the float64 forward pass: HF "
        f"{np.abs(hf - exact).max():.2e}, mae_jax {np.abs(ours - exact).max():.2e}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--data", required=True, help="a DeepLense-layout folder")
  parser.add_argument("--per_class", type=int, default=32)
  parser.add_argument("--encoder_only", action="store_true")
  args = parser.parse_args()

  workdir = Path(args.workdir)
  config = ml_collections.ConfigDict(fileio.read_json(workdir / workdir_lib.CONFIG_FILE))
  images = _images(Path(args.data), args.per_class, config.model.image_size)
  pixels = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
  state, step = checkpoint.restore_latest_on_one_device(workdir / workdir_lib.CHECKPOINTS)
  with tempfile.TemporaryDirectory() as out:
    done = export.export(workdir, out, args.encoder_only)
    print(f"{workdir} (step {step}) -> {done['class']}, {done['tensors']} tensors; "
          f"{len(images)} images of {args.data}")
    if config.stage == "pretrain":
      mae = build.build_mae(config.model)
      noise = np.random.default_rng(0).random((len(images), mae.encoder.num_patches), np.float32)
      hf = transformers.ViTMAEForPreTraining.from_pretrained(out).eval()
      with torch.no_grad():
        theirs = hf(pixel_values=pixels, noise=torch.from_numpy(noise))
        exact = hf.double()(pixel_values=pixels.double(),
                            noise=torch.from_numpy(noise).double()).logits.numpy()
      ours = mae.apply({"params": state["params"]}, jnp.asarray(images), jnp.asarray(noise))
      same = np.array_equal(theirs.mask.numpy(), np.asarray(ours["mask"]))
      print(f"mask: {'identical' if same else 'DIFFERENT'}")
      _report("reconstruction logits", theirs.logits.numpy(), np.asarray(ours["logits"]), exact)
      return
    model = build.build_classifier(config.model, len(layout.CLASS_NAMES))
    variables = {"params": state["params"], "batch_stats": state.get("batch_stats") or {}}
    if args.encoder_only:
      vit = transformers.ViTModel.from_pretrained(out, add_pooling_layer=False).eval()
      with torch.no_grad():
        cls = vit(pixel_values=pixels).last_hidden_state[:, 0].numpy()
        exact = vit.double()(pixel_values=pixels.double()).last_hidden_state[:, 0].numpy()
      feats = model.apply(variables, jnp.asarray(images), method="features")
      _report("CLS features", cls, np.asarray(feats), exact)
      return
    hf = transformers.ViTForImageClassification.from_pretrained(out).eval()
    with torch.no_grad():
      logits = hf(pixel_values=pixels).logits.numpy()
      exact = hf.double()(pixel_values=pixels.double()).logits.numpy()
    _report("class scores", logits, np.asarray(model.apply(variables, jnp.asarray(images))["logits"]),
            exact)


if __name__ == "__main__":
  main()
