"""The seed MAE and its fine-tune classifier in PyTorch, for the throughput benchmark.

The same architecture, masking, loss and optimiser as `mae_jax` (models/,
objectives/reconstruction.py, train/optim.py), written the way a PyTorch user would
(facebookresearch/mae `models_mae.py`, timm blocks), so that
`benchmarks/throughput.py` compares like with like:

- patch embedding as a strided Conv2d, fixed 2-D sin-cos positions, a CLS token;
- pre-norm blocks: LayerNorm eps 1e-6, fused qkv with bias, exact GELU, MLP ratio 4;
- MAE random masking: argsort of per-sample noise, keep `int(L * (1 - ratio))`;
- the MAE decoder (mask tokens, un-shuffle, positions, blocks, norm, per-patch logits);
- BCE-with-logits on the removed patches (or MSE, optionally on normalised pixels);
- AdamW with linear warmup then cosine per step, no decay on biases, norms, tokens;
- the classifier: the encoder on all patches, CLS after the final norm, the seed's
  MLP head 256 -> 512 -> 256 (BatchNorm, ReLU, dropout) -> classes; AdamW with an
  encoder rate and a head rate.

Parameter names are facebookresearch/mae's, so `mae_jax.models.load` reads a state
dict of `MaskedAutoencoder`; `state_dict_from_jax` goes the other way, so both
systems can start from the same weights (`tests/test_throughput.py` checks that
they then give the same outputs).
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

LN_EPS = 1e-6


def sincos_pos_embed(dim: int, side: int) -> np.ndarray:
  """(1 + side², dim) fixed 2-D sin-cos embeddings with a zero CLS row (MAE formula)."""
  def one_d(d, pos):
    omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)
  cols, rows = np.meshgrid(np.arange(side, dtype=np.float64), np.arange(side, dtype=np.float64))
  emb = np.concatenate([one_d(dim // 2, cols), one_d(dim // 2, rows)], axis=1)
  return np.concatenate([np.zeros((1, dim)), emb], axis=0).astype(np.float32)


class Attention(nn.Module):
  """Multi-head self-attention, fused qkv; `F.scaled_dot_product_attention` (as timm)."""

  def __init__(self, dim: int, heads: int):
    super().__init__()
    self.heads = heads
    self.qkv = nn.Linear(dim, 3 * dim)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    n, length, dim = x.shape
    qkv = self.qkv(x).reshape(n, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
    out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
    return self.proj(out.transpose(1, 2).reshape(n, length, dim))


class Mlp(nn.Module):

  def __init__(self, dim: int, hidden: int):
    super().__init__()
    self.fc1 = nn.Linear(dim, hidden)
    self.act = nn.GELU()   # exact (erf)
    self.fc2 = nn.Linear(hidden, dim)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
  """Pre-norm transformer block (timm / MAE)."""

  def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
    self.attn = Attention(dim, heads)
    self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
    self.mlp = Mlp(dim, int(dim * mlp_ratio))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):

  def __init__(self, patch: int, channels: int, dim: int):
    super().__init__()
    self.proj = nn.Conv2d(channels, dim, patch, stride=patch)

  def forward(self, images: torch.Tensor) -> torch.Tensor:
    return self.proj(images).flatten(2).transpose(1, 2)   # (N, L, dim), row-major patches


def _init_weights(module: nn.Module) -> None:
  """MAE's initialisation: xavier-uniform linears (and the patch conv as a linear)."""
  for m in module.modules():
    if isinstance(m, nn.Linear):
      nn.init.xavier_uniform_(m.weight)
      nn.init.zeros_(m.bias)
    elif isinstance(m, PatchEmbed):
      nn.init.xavier_uniform_(m.proj.weight.view(m.proj.weight.shape[0], -1))
      nn.init.zeros_(m.proj.bias)
    elif isinstance(m, nn.LayerNorm):
      nn.init.ones_(m.weight)
      nn.init.zeros_(m.bias)


class Encoder(nn.Module):
  """ViT encoder; with `noise`, MAE random masking before the blocks."""

  def __init__(self, image_size=64, channels=1, patch=4, dim=256, depth=8, heads=8,
               mlp_ratio=4.0):
    super().__init__()
    self.patch, self.channels = patch, channels
    side = image_size // patch
    self.patch_embed = PatchEmbed(patch, channels, dim)
    self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
    self.register_buffer("pos_embed", torch.from_numpy(sincos_pos_embed(dim, side))[None])
    self.blocks = nn.ModuleList([Block(dim, heads, mlp_ratio) for _ in range(depth)])
    self.norm = nn.LayerNorm(dim, eps=LN_EPS)

  def forward(self, images: torch.Tensor, noise: torch.Tensor | None = None,
              mask_ratio: float = 0.0):
    x = self.patch_embed(images) + self.pos_embed[:, 1:]
    n, length, dim = x.shape
    mask = ids_restore = None
    if noise is not None:   # facebookresearch/mae random_masking
      keep = int(length * (1 - mask_ratio))
      ids_shuffle = torch.argsort(noise, dim=1)
      ids_restore = torch.argsort(ids_shuffle, dim=1)
      x = torch.gather(x, 1, ids_shuffle[:, :keep, None].expand(-1, -1, dim))
      mask = torch.ones(n, length, device=x.device)
      mask[:, :keep] = 0
      mask = torch.gather(mask, 1, ids_restore)
    cls = (self.cls_token + self.pos_embed[:, :1]).expand(n, -1, -1)
    x = torch.cat([cls, x], dim=1)
    for block in self.blocks:
      x = block(x)
    return self.norm(x), mask, ids_restore


class MaskedAutoencoder(nn.Module):
  """MAE with facebookresearch/mae parameter names; `forward` returns (loss, logits, mask)."""

  def __init__(self, image_size=64, channels=1, patch=4, dim=256, depth=8, heads=8,
               decoder_dim=128, decoder_depth=4, decoder_heads=8, mlp_ratio=4.0,
               mask_ratio=0.75, loss="bce", norm_pix=False, masked_only=True, target="pixels",
               highpass_sigma=1.0):
    super().__init__()
    self.patch, self.mask_ratio = patch, mask_ratio
    self.loss_type, self.norm_pix, self.masked_only = loss, norm_pix, masked_only
    self.target, self.highpass_sigma = target, highpass_sigma
    self.encoder = Encoder(image_size, channels, patch, dim, depth, heads, mlp_ratio)
    side = image_size // patch
    self.decoder_embed = nn.Linear(dim, decoder_dim)
    self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
    self.register_buffer("decoder_pos_embed",
                         torch.from_numpy(sincos_pos_embed(decoder_dim, side))[None])
    self.decoder_blocks = nn.ModuleList(
        [Block(decoder_dim, decoder_heads, mlp_ratio) for _ in range(decoder_depth)])
    self.decoder_norm = nn.LayerNorm(decoder_dim, eps=LN_EPS)
    self.decoder_pred = nn.Linear(decoder_dim, patch * patch * channels)
    _init_weights(self)
    nn.init.normal_(self.encoder.cls_token, std=0.02)
    nn.init.normal_(self.mask_token, std=0.02)

  def state_dict_mae(self) -> dict[str, torch.Tensor]:
    """The state dict under facebookresearch/mae names (encoder modules at the top)."""
    return {k.removeprefix("encoder."): v for k, v in self.state_dict().items()}

  def patchify(self, images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, L, p*p*C), patches ordered (row, col, channel) as in MAE."""
    n, c, h, w = images.shape
    p = self.patch
    x = images.reshape(n, c, h // p, p, w // p, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(n, (h // p) * (w // p), p * p * c)

  def decode(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
    x = self.decoder_embed(latent)
    n, visible, dim = x.shape[0], x.shape[1] - 1, x.shape[2]
    tokens = self.mask_token.expand(n, ids_restore.shape[1] - visible, -1)
    patches = torch.cat([x[:, 1:], tokens], dim=1)
    patches = torch.gather(patches, 1, ids_restore[:, :, None].expand(-1, -1, dim))
    x = torch.cat([x[:, :1], patches], dim=1) + self.decoder_pos_embed
    for block in self.decoder_blocks:
      x = block(x)
    return self.decoder_pred(self.decoder_norm(x))[:, 1:]

  def patch_blur(self, patches: torch.Tensor, channels: int) -> torch.Tensor:
    """Each patch blurred on its own (separable Gaussian of `highpass_sigma` pixels, radius
    ceil(2 sigma), border pixels repeated outward), as mae_jax's `objectives.reconstruction.patch_blur`."""
    radius = max(1, math.ceil(2 * self.highpass_sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / self.highpass_sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(device=patches.device, dtype=patches.dtype)
    n, length, _ = patches.shape
    p = self.patch
    x = patches.reshape(n * length, p, p, channels).permute(0, 3, 1, 2)   # (B, C, p, p)
    x = x.reshape(-1, 1, p, p)
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    x = x.reshape(n * length, channels, p, p).permute(0, 2, 3, 1)
    return x.reshape(n, length, -1)

  def loss(self, images: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    target = self.patchify(images)
    if self.target == "highpass":
      target = target - self.patch_blur(target, images.shape[1])
    if self.norm_pix:
      mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
      target = (target - mean) / (var + 1e-6) ** 0.5
    if self.loss_type == "bce":
      per_patch = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(-1)
    else:
      per_patch = ((logits - target) ** 2).mean(-1)
    weights = mask if self.masked_only else torch.ones_like(per_patch)
    return (per_patch * weights).sum() / weights.sum()

  def forward(self, images: torch.Tensor, noise: torch.Tensor):
    latent, mask, ids_restore = self.encoder(images, noise, self.mask_ratio)
    logits = self.decode(latent, ids_restore)
    return self.loss(images, logits, mask), logits, mask


class Classifier(nn.Module):
  """The encoder on all patches, CLS after the final norm, the seed's MLP head."""

  def __init__(self, image_size=64, channels=1, patch=4, dim=256, depth=8, heads=8,
               mlp_ratio=4.0, num_classes=3, hidden: Sequence[int] = (512, 256),
               dropout=0.2):
    super().__init__()
    self.encoder = Encoder(image_size, channels, patch, dim, depth, heads, mlp_ratio)
    layers, width = [], dim
    for h in hidden:   # flax BatchNorm momentum 0.9 == torch momentum 0.1
      layers += [nn.Linear(width, h), nn.BatchNorm1d(h, eps=1e-5, momentum=0.1), nn.ReLU(),
                 nn.Dropout(dropout)]
      width = h
    layers.append(nn.Linear(width, num_classes))
    self.head = nn.Sequential(*layers)
    _init_weights(self)
    nn.init.normal_(self.encoder.cls_token, std=0.02)

  def forward(self, images: torch.Tensor) -> torch.Tensor:
    latent, _, _ = self.encoder(images)
    return self.head(latent[:, 0])


# --- Optimiser -------------------------------------------------------------------


def warmup_cosine(total_steps: int, warmup_steps: int, peak: float,
                  min_lr: float = 0.0) -> Callable[[int], float]:
  """optax.warmup_cosine_decay_schedule as a factor of `peak` (for LambdaLR)."""
  warmup_steps = min(warmup_steps, total_steps - 1) if total_steps > 1 else 0

  def factor(step: int) -> float:
    if step < warmup_steps:
      return step / warmup_steps
    t = min(step - warmup_steps, total_steps - warmup_steps) / max(total_steps - warmup_steps, 1)
    return (min_lr + 0.5 * (peak - min_lr) * (1 + math.cos(math.pi * t))) / peak
  return factor


def adamw(model: nn.Module, groups: Sequence[tuple[str, float]], *, weight_decay: float,
          no_decay: Sequence[str], betas: tuple[float, float], total_steps: int,
          warmup_steps: int, min_lr: float = 0.0):
  """AdamW with per-pattern peak rates (first match wins), no decay on `no_decay`
  names, and a warmup + cosine schedule per step; returns (optimizer, scheduler).

  Patterns are matched against `mae_jax`'s `/`-joined param names (see `jax_name`).
  """
  buckets: dict[tuple[float, bool], list[torch.Tensor]] = {}
  for name, p in model.named_parameters():
    jname = jax_name(model, name)
    lr = next(lr for pattern, lr in groups if re.fullmatch(pattern, jname))
    decays = not any(re.fullmatch(pattern, jname) for pattern in no_decay)
    buckets.setdefault((lr, decays), []).append(p)
  param_groups = [{"params": ps, "lr": lr, "weight_decay": weight_decay if decays else 0.0}
                  for (lr, decays), ps in buckets.items()]
  opt = torch.optim.AdamW(param_groups, betas=betas, eps=1e-8)
  scheds = [warmup_cosine(total_steps, warmup_steps, g["lr"], min(min_lr, g["lr"]))
            for g in param_groups]
  return opt, torch.optim.lr_scheduler.LambdaLR(opt, scheds)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, sched, loss_fn: Callable[[int], Any],
               pieces: int = 1) -> dict[str, Any]:
  """One step: loss, backward, global grad norm; the update only when both are finite
  (as `mae_jax.train.steps.keep_if_finite`). `loss_fn(i)` is the mean loss of the i-th of
  `pieces` equal micro-batches; gradients accumulate over them, as in
  `mae_jax.train.steps.accumulated_value_and_grad`."""
  opt.zero_grad(set_to_none=True)
  loss = 0.0
  for i in range(pieces):
    piece = loss_fn(i) / pieces
    piece.backward()
    loss = loss + piece.detach()
  grads = [p.grad for p in model.parameters() if p.grad is not None]
  grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
  finite = bool(torch.isfinite(loss) & torch.isfinite(grad_norm))
  if finite:
    opt.step()
    sched.step()
  return {"loss": loss.detach(), "grad_norm": grad_norm, "finite": finite}


# --- Names and weights shared with mae_jax ----------------------------------------------


def jax_name(model: nn.Module, name: str) -> str:
  """The `mae_jax` param name (e.g. `encoder/block_0/attn/qkv/kernel`) of a torch param."""
  rules = [
      (r"encoder\.blocks\.(\d+)\.(.+)", r"encoder/block_\1/\2"),
      (r"decoder_blocks\.(\d+)\.(.+)", r"decoder/block_\1/\2"),
      (r"encoder\.patch_embed\.proj\.(.+)", r"encoder/patch_embed/\1"),
      (r"encoder\.(cls_token|norm\..+)", r"encoder/\1"),
      (r"decoder_(embed|norm|pred)\.(.+)", r"decoder/\1/\2"),
      (r"mask_token", r"decoder/mask_token"),
      (r"head\.(\d+)\.(.+)", r"classifier/head\1/\2"),
  ]
  for pattern, repl in rules:
    if re.fullmatch(pattern, name):
      name = re.sub(pattern, repl, name)
      break
  name = name.replace(".", "/")
  if isinstance(model, Classifier):   # head.{0,4,8} -> fc0, fc1, out; {1,5} -> bn0, bn1
    m = re.fullmatch(r"classifier/head(\d+)/(.+)", name)
    if m:
      idx, leaf = int(m.group(1)), m.group(2)
      kind = type(model.head[idx])
      last = idx == len(model.head) - 1
      label = "out" if last else (f"fc{idx // 4}" if kind is nn.Linear else f"bn{idx // 4}")
      name = f"classifier/{label}/{leaf}"
  return (name.replace("/weight", "/kernel" if not re.search(r"norm|/bn\d", name) else "/scale")
          .replace("/running_mean", "/mean").replace("/running_var", "/var"))


def state_dict_from_jax(model: nn.Module, params: Mapping[str, Any],
                        batch_stats: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
  """A state dict for `model` holding `mae_jax` params (and BatchNorm statistics)."""
  flat = {}

  def walk(tree, prefix):
    for k, v in tree.items():
      if isinstance(v, Mapping):
        walk(v, f"{prefix}{k}/")
      else:
        flat[f"{prefix}{k}"] = np.array(v, np.float32)   # a writable copy
  walk(params, "")
  walk(batch_stats or {}, "")
  out = {}
  for name, tensor in model.state_dict().items():
    if name.endswith("pos_embed"):
      out[name] = tensor
      continue
    if name.endswith("num_batches_tracked"):
      out[name] = tensor
      continue
    value = flat[jax_name(model, name)]
    if value.ndim == 4:        # conv (p, p, C, D) -> (D, C, p, p)
      value = value.transpose(3, 2, 0, 1)
    elif value.ndim == 2:      # dense (in, out) -> (out, in)
      value = value.T
    out[name] = torch.from_numpy(np.ascontiguousarray(value)).reshape(tensor.shape)
  return out
