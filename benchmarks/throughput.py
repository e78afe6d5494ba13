"""Images/s of the MAE pretrain step and the fine-tune step: ours (JAX) against PyTorch.

  python benchmarks/throughput.py [--preset seed] [--batch 256] [--task pretrain,finetune]
      [--systems ours,ours_1dev,torch,torch_compile] [--repeats 3] [--steps 2]
      [--dtype float32] [--host_devices N] [--no_pipeline]
      [--loop] [--loop_batches 256,1024] [--loop_feeds device,host] [--loop_steps 20]
      [--compilation_cache DIR] [--torch_timeout 300]

Ours are the real jitted steps (`steps.make_pretrain_step`,
`steps.make_classifier_step`) of the preset's configs (configs/pretrain.py,
configs/finetune.py); `torch` and `torch_compile` run the same architecture,
masking, loss and optimiser written in PyTorch (`benchmarks/torch_mae.py`),
eagerly and under `torch.compile`, from the same initial weights. Each system
runs in its own subprocess, one after the other, so thread pools never compete.
`ours` runs data-parallel over `--host_devices` XLA host devices (default one per
CPU core; this only matters on a CPU), `ours_1dev` on a single device.

Per system: a warm-up (compilation, reported apart and excluded), then `repeats`
timed runs of `steps` steps on a fixed batch; the line shows the median images/s
(min and max). The input feed's images/s (the device feed making training batches of
the same size from random images in device memory: order, normalisation and, in
pretraining, augmentation) is printed beside the steps. With a known GPU it also prints achieved TFLOP/s and
model-FLOPs utilisation (MFU) from an analytic count of the matmul FLOPs
(forward x 3 for a training step). The last line is
`ratio ours/pytorch-eager: pretrain X.XX finetune Y.YY`.

With `--loop`, it also times the real training loop (`train.loop.run_epochs`: the
stage's feed, its chunks of `steps_per_call` steps in one dispatch, metrics fetched at
log boundaries, a checkpoint at the end; evaluation left out) over whole epochs of
`--loop_steps` steps on random images, for each feed and each batch size in
`--loop_batches` (default: the stage's configured batch and `--batch`). Each line is
the median images/s of the epochs after the first (which compiles), and the attention
implementation each of the model's attention shapes got is printed (`attention ...`).

Workers write their stderr straight through (JAX's and cuDNN's logs stay visible). Ours
keep XLA's compiled steps in `--compilation_cache` (default `MAE_JAX_COMPILATION_CACHE`),
so a second invocation compiles nothing again. PyTorch is optional: its systems run
last, a failing one or one past `--torch_timeout` seconds is reported and skipped, and
where ours ran on an accelerator but torch sees none, torch is skipped rather than timed
on the CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_ROOT))
sys.path.insert(0, str(_ROOT / "benchmarks"))

TASKS = ("pretrain", "finetune")
SYSTEMS = ("ours", "ours_1dev", "torch", "torch_compile")
LABELS = {"ours": "ours (jax)", "ours_1dev": "ours, 1 device", "torch": "pytorch eager",
          "torch_compile": "torch.compile", "loop": "real loop"}
RESULT = "RESULT "

# Dense peak FLOP/s of known accelerators (bf16; float32 matmuls run as TF32 by default).
PEAK_FLOPS = {  # device-kind substring: {dtype: FLOP/s}
    "H200": {"bfloat16": 989e12, "float32": 494e12},
    "H100": {"bfloat16": 989e12, "float32": 494e12},
    "A100": {"bfloat16": 312e12, "float32": 156e12},
    "L4": {"bfloat16": 121e12, "float32": 60e12},
    "V100": {"bfloat16": 125e12, "float32": 15.7e12},
}


# --- FLOP count ---------------------------------------------------------------------


def _block_flops(tokens: int, dim: int, mlp_ratio: float, queries: int | None = None) -> int:
  """Matmul FLOPs of one transformer block's forward pass on one example, computing
  the outputs of `queries` tokens (default: all of them)."""
  queries = tokens if queries is None else queries
  qkv = 2 * tokens * dim * 3 * dim
  attention = 2 * 2 * queries * tokens * dim    # q k^T and weights v
  proj = 2 * queries * dim * dim
  mlp = 2 * 2 * queries * dim * int(dim * mlp_ratio)
  return qkv + attention + proj + mlp


def _stem_flops(model: Any) -> int:
  """Forward FLOPs of embedding one patch: the linear patch embedding, or the
  convolutional stem's layers (`models/convs.PatchConvStem`)."""
  p, c, d = model.patch, model.channels, model.dim
  if model.get("stem", "linear") == "linear":
    return 2 * p * p * c * d
  w, half = model.stem_width, (p // 2) ** 2
  return 2 * (p * p * 9 * c * w + half * 4 * w * 2 * w + half * 9 * 2 * w * 2 * w
              + half * 2 * w * d)


def train_flops(task: str, config: Any, batch: int) -> int:
  """Model FLOPs of one training step: 3 x the forward matmul FLOPs (the backward
  pass costs twice the forward), summed over the batch.

  `config` is the stage's config; for 'pretrain' the patch embedding and the encoder see
  the kept patches (plus CLS) and the decoder all of them, its last block, norm and
  prediction only the patches the loss reads (the removed ones with `loss.masked_only`);
  for 'finetune' the encoder sees every patch (its last block only the CLS token, where
  a CLS feature is read) and the MLP head the CLS feature.
  """
  from mae_jax.models import masking  # pylint: disable=g-import-not-at-top
  model = config.model
  patches = (model.image_size // model.patch) ** 2
  patch_dim = model.patch * model.patch * model.channels
  embed = _stem_flops(model)   # per patch
  if task == "pretrain":
    enc_tokens = 1 + masking.num_kept(patches, model.mask_ratio)
    fwd = (enc_tokens - 1) * embed
    fwd += model.depth * _block_flops(enc_tokens, model.dim, model.mlp_ratio)
    fwd += 2 * enc_tokens * model.dim * model.decoder_dim
    read = patches - (enc_tokens - 1 if config.loss.masked_only else 0)
    fwd += (model.decoder_depth - 1) * _block_flops(1 + patches, model.decoder_dim,
                                                    model.mlp_ratio)
    fwd += _block_flops(1 + patches, model.decoder_dim, model.mlp_ratio, queries=read)
    fwd += 2 * read * model.decoder_dim * patch_dim
  else:
    tokens = 1 + patches
    fwd = patches * embed
    fwd += (model.depth - 1) * _block_flops(tokens, model.dim, model.mlp_ratio)
    if model.pool == "cls" and model.feature_block in (-1, model.depth - 1):
      # The last block runs the CLS token alone (qkv still for every token).
      fwd += _block_flops(tokens, model.dim, model.mlp_ratio, queries=1)
    else:
      fwd += _block_flops(tokens, model.dim, model.mlp_ratio)
    widths = (model.dim, *model.head_hidden, 3)
    fwd += sum(2 * a * b for a, b in zip(widths[:-1], widths[1:]))
  return 3 * fwd * batch


def peak_flops(device_kind: str, dtype: str) -> float | None:
  for name, peaks in PEAK_FLOPS.items():
    if name in device_kind:
      return peaks[dtype]
  return None


# --- Timing -------------------------------------------------------------------------


def time_steps(step: Callable[[], Any], sync: Callable[[Any], None], *, warmup: int,
               repeats: int, steps: int, batch: int) -> dict[str, Any]:
  """Warm-up steps (timed apart), then `repeats` x `steps` timed steps: images/s each."""
  start = time.perf_counter()
  for _ in range(warmup):
    out = step()
  sync(out)
  warmup_s = time.perf_counter() - start
  rates = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(steps):
      out = step()
    sync(out)
    rates.append(steps * batch / (time.perf_counter() - start))
  return {"rates": rates, "warmup_s": warmup_s}


def _configs(preset: str, dtype: str):
  from configs import finetune as finetune_config  # pylint: disable=g-import-not-at-top
  from configs import pretrain as pretrain_config  # pylint: disable=g-import-not-at-top
  pre, fine = pretrain_config.get_config(preset), finetune_config.get_config(preset)
  pre.model.dtype = fine.model.dtype = dtype
  return {"pretrain": pre, "finetune": fine}


def _random_batch(config, batch: int) -> dict[str, Any]:
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  size, channels = config.model.image_size, config.model.channels
  return {"image": rng.random((batch, size, size, channels), np.float32),
          "label": rng.integers(0, 3, batch).astype(np.int32)}


# --- Systems (each runs in a worker subprocess) ------------------------------------------


def _enable_cache(folder: str) -> None:
  """XLA's persistent compilation cache in `folder` ('' off), as main.py keeps it."""
  if not folder:
    return
  import jax  # pylint: disable=g-import-not-at-top
  path = os.path.expanduser(folder)
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def attention_used(task: str, config: Any) -> str:
  """The attention implementation asked for and the one each attention shape of the
  task's model gets (`attention.choose`, cached: the shapes the step compiled). The
  decoder's last block has fewer queries than tokens: the removed patches alone under
  `loss.masked_only`, else every patch (never the CLS token). Each shape is asked as
  the model asks it (queries given), so the cache answers and nothing compiles again."""
  from mae_jax.models import attention  # pylint: disable=g-import-not-at-top
  from mae_jax.models import build  # pylint: disable=g-import-not-at-top
  from mae_jax.models import masking  # pylint: disable=g-import-not-at-top
  requested = attention.implementation()
  model = config.model
  patches = (model.image_size // model.patch) ** 2
  dtype = build.dtype_of(model.dtype).name
  shapes = []
  if task == "pretrain":
    kept = masking.num_kept(patches, model.mask_ratio)
    decoder = (1 + patches, model.decoder_heads, model.decoder_dim // model.decoder_heads)
    shapes.append((f"encoder {1 + kept} tokens", 1 + kept, model.heads,
                   model.dim // model.heads, 1 + kept))
    if model.decoder_depth > 1:   # blocks before the last: every token a query
      shapes.append((f"decoder {1 + patches} tokens", *decoder, 1 + patches))
    last = patches - kept if config.loss.masked_only else patches
    shapes.append((f"its last block's {last} queries", *decoder, last))
  else:
    shapes.append((f"encoder {1 + patches} tokens", 1 + patches, model.heads,
                   model.dim // model.heads, 1 + patches))
  parts = [f"{name}: {attention.choose(requested, heads, length, hd, dtype, q)}"
           for name, length, heads, hd, q in shapes]
  return f"asked {requested}; " + ", ".join(parts)


def _ours(task: str, config, batch: int, args) -> dict[str, Any]:
  """The real mae_jax steps, jitted over a mesh of every JAX device."""
  import jax  # pylint: disable=g-import-not-at-top
  from mae_jax.models import build  # pylint: disable=g-import-not-at-top
  from mae_jax.runtime import parallel  # pylint: disable=g-import-not-at-top
  from mae_jax import objectives  # pylint: disable=g-import-not-at-top
  from mae_jax.train import optim  # pylint: disable=g-import-not-at-top
  from mae_jax.train import steps  # pylint: disable=g-import-not-at-top

  mesh = parallel.make_mesh()
  parallel.check_batch(batch)
  data = parallel.global_batch(_random_batch(config, batch), mesh)
  key = jax.random.key(1)
  if task == "pretrain":
    model = build.build_mae(config.model)
    params = build.init_mae(model, jax.random.key(0))
    tx, _ = optim.adamw(params, optim.AdamWSettings.from_config(config.optim), total_steps=1000,
                        steps_per_epoch=100)
    state = steps.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
    fn = steps.make_pretrain_step(model, objectives.from_config(config.loss), mesh,
                                  steps.backend_micro_batch(**config.micro_batch))
    inputs = (data["image"], key)
  else:
    model = build.build_classifier(config.model, 3, parallel.AXIS)
    params, stats = build.init_classifier(model, jax.random.key(0))
    tx, _ = optim.classifier_optimizer(
        params, optim.ClassifierOptimSettings.from_config(config.optim), total_steps=1000,
        steps_per_epoch=100, global_batch=batch, depth=config.model.depth)
    state = steps.ClassifierState.create(apply_fn=model.apply, params=params, tx=tx,
                                         batch_stats=stats)
    fn = steps.make_classifier_step(model, mesh, frozen_encoder=False,
                                    label_smoothing=config.label_smoothing)
    inputs = (data["image"], data["label"], key)
  state = parallel.replicate(state, mesh)
  start = time.perf_counter()
  compiled = fn.lower(state, *inputs).compile()
  compile_s = time.perf_counter() - start
  holder = {"state": state}

  def step():
    holder["state"], metrics = compiled(holder["state"], *inputs)
    return metrics

  out = time_steps(step, jax.block_until_ready, warmup=1, repeats=args.repeats,
                   steps=args.steps, batch=batch)
  metrics = jax.device_get(step())
  out.update(compile_s=compile_s, loss=float(metrics["loss"]),
             device=f"{jax.device_count()} x {jax.devices()[0].device_kind}",
             threads=os.environ.get("XLA_FLAGS", ""),
             attention=attention_used(task, config))
  return out


def _torch(task: str, config, batch: int, args, compiled: bool) -> dict[str, Any]:
  """The same step in PyTorch (eager or torch.compile), from the same initial weights."""
  import contextlib  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  import torch_mae  # pylint: disable=g-import-not-at-top
  from mae_jax.models import build  # pylint: disable=g-import-not-at-top
  from mae_jax.train import steps  # pylint: disable=g-import-not-at-top

  jax.config.update("jax_platforms", "cpu")
  device = "cuda" if torch.cuda.is_available() else "cpu"
  if device == "cpu" and args.torch_needs_gpu:
    return {"skipped": "torch sees no GPU where ours ran on one (a CPU run would stall "
                       "the benchmark)", "rates": []}
  m = config.model
  sizes = dict(image_size=m.image_size, channels=m.channels, patch=m.patch, dim=m.dim,
               depth=m.depth, heads=m.heads, mlp_ratio=m.mlp_ratio)
  o = config.optim
  data = _random_batch(config, batch)
  images = torch.from_numpy(data["image"]).permute(0, 3, 1, 2).contiguous().to(device)
  labels = torch.from_numpy(data["label"]).long().to(device)
  if task == "pretrain":
    model = torch_mae.MaskedAutoencoder(
        **sizes, decoder_dim=m.decoder_dim, decoder_depth=m.decoder_depth,
        decoder_heads=m.decoder_heads, mask_ratio=m.mask_ratio, loss=config.loss.type,
        norm_pix=config.loss.norm_pix, masked_only=config.loss.masked_only,
        target=config.loss.target, highpass_sigma=config.loss.highpass_sigma)
    params = build.init_mae(build.build_mae(m), jax.random.key(0))
    model.load_state_dict(torch_mae.state_dict_from_jax(model, params))
    groups, wd, betas, min_lr = [(".*", o.lr)], o.weight_decay, (o.b1, o.b2), o.min_lr
    patches = (m.image_size // m.patch) ** 2
  else:
    model = torch_mae.Classifier(**sizes, hidden=tuple(m.head_hidden), dropout=m.dropout)
    params, stats = build.init_classifier(build.build_classifier(config.model, 3),
                                          jax.random.key(0))
    model.load_state_dict(torch_mae.state_dict_from_jax(model, params, stats))
    groups, wd, betas, min_lr = list(o.lr_groups), o.weight_decay, (o.b1, o.b2), o.min_lr
  model = model.to(device).train()
  opt, sched = torch_mae.adamw(model, groups, weight_decay=wd, no_decay=o.no_decay,
                               betas=betas, total_steps=1000,
                               warmup_steps=int(o.warmup_epochs * 100), min_lr=min_lr)
  forward = torch.compile(model) if compiled else model
  autocast = (torch.autocast(device, dtype=torch.bfloat16) if m.dtype == "bfloat16"
              else contextlib.nullcontext())

  # Pretraining accumulates over the same micro-batches as ours (config.micro_batch per
  # device, times ours' device count on a CPU): the same step, not a larger working set.
  pieces = 1
  if task == "pretrain":
    micro = config.micro_batch.cpu * args.host_devices if device == "cpu" else (
        config.micro_batch.accelerator)
    pieces = steps.micro_batches(batch, micro)
  size = batch // pieces

  def loss_fn(i):
    with autocast:
      if task == "pretrain":
        noise = torch.rand(size, patches, device=device)
        return forward(images[i * size:(i + 1) * size], noise)[0].float()
      return F.cross_entropy(forward(images).float(), labels)

  def step():
    return torch_mae.train_step(model, opt, sched, loss_fn, pieces)

  def sync(_):
    if device == "cuda":
      torch.cuda.synchronize()

  out = time_steps(step, sync, warmup=2 if compiled else 1, repeats=args.repeats,
                   steps=args.steps, batch=batch)
  median_step = batch / statistics.median(out["rates"])
  out.update(compile_s=max(out["warmup_s"] - (2 if compiled else 1) * median_step, 0.0)
             if compiled else None,
             loss=float(step()["loss"]),
             device=(torch.cuda.get_device_name() if device == "cuda"
                     else f"cpu, {torch.get_num_threads()} threads"))
  return out


def _pipeline(task: str, config, batch: int, args) -> dict[str, Any]:
  """Images/s of the device feed making training batches (order, normalisation and, in
  pretraining, augmentation; no model) from random images in device memory."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from mae_jax.data import source  # pylint: disable=g-import-not-at-top
  from mae_jax.stages import data as data_stage  # pylint: disable=g-import-not-at-top

  size = config.model.image_size
  images = np.random.default_rng(0).random((max(4 * batch, 64), size, size), np.float32)
  augment = task == "pretrain" or config.augment
  augmentation = source.DataSettings.from_config(config.data).augment if augment else None
  rates = [data_stage.feed_rate(images, batch, augmentation, num_steps=4)
           for _ in range(max(args.repeats, 3))]
  return {"rates": rates, "augment": augment}


def _loop(task: str, config, args) -> list[dict[str, Any]]:
  """Whole epochs of the real training loop on random images, per feed and batch size."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from mae_jax.data import feeds  # pylint: disable=g-import-not-at-top
  from mae_jax.models import build  # pylint: disable=g-import-not-at-top
  from mae_jax.runtime import checkpoint  # pylint: disable=g-import-not-at-top
  from mae_jax.runtime import parallel  # pylint: disable=g-import-not-at-top
  from mae_jax.stages import common  # pylint: disable=g-import-not-at-top
  from mae_jax.stages import writers  # pylint: disable=g-import-not-at-top
  from mae_jax.train import loop  # pylint: disable=g-import-not-at-top
  from mae_jax import objectives  # pylint: disable=g-import-not-at-top
  from mae_jax.train import optim  # pylint: disable=g-import-not-at-top
  from mae_jax.train import steps  # pylint: disable=g-import-not-at-top

  mesh = parallel.make_mesh()
  dtype = build.dtype_of(config.model.dtype)
  size = config.model.image_size
  batches = [int(b) for b in args.loop_batches.split(",") if b] or [config.batch_size, args.batch]
  out = []
  for batch in dict.fromkeys(batches):
    if batch % mesh.devices.size:
      continue
    lb = batch // mesh.devices.size
    n = args.loop_steps * batch
    rng = np.random.default_rng(0)
    images = rng.random((n, size, size), np.float32)
    labels = rng.integers(0, 3, n).astype(np.int32)
    for kind in [k for k in args.loop_feeds.split(",") if k]:
      cfg = config.copy_and_resolve_references()
      cfg.batch_size = batch
      feed = feeds.make(kind, images, labels, mesh, cfg.seed, np.float32)   # as the stages
      feeding = steps.Feeding(source=kind, local_batch=lb, seed=cfg.seed, dtype=dtype)
      total = args.loop_epochs * args.loop_steps
      if task == "pretrain":
        model = build.build_mae(cfg.model)
        params = build.init_mae(model, jax.random.key(0))
        tx, schedule = optim.adamw(params, optim.AdamWSettings.from_config(cfg.optim), total,
                                   args.loop_steps)
        state = steps.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
        body = steps.pretrain_body(model, objectives.from_config(cfg.loss), batch,
                                   steps.backend_micro_batch(**cfg.micro_batch))
      else:
        model = build.build_classifier(cfg.model, 3, parallel.AXIS)
        params, stats = build.init_classifier(model, jax.random.key(0))
        tx, peaks = optim.classifier_optimizer(params,
                                               optim.ClassifierOptimSettings.from_config(cfg.optim),
                                               total_steps=total,
                                               steps_per_epoch=args.loop_steps,
                                               global_batch=batch, depth=cfg.model.depth)
        schedule = optim.warmup_cosine(max(jax.tree.leaves(peaks)), total, 0)
        state = steps.ClassifierState.create(apply_fn=model.apply, params=params, tx=tx,
                                             batch_stats=stats)
        body = steps.classifier_body(model, frozen_encoder=False)
      chunks = common.Chunks(body, mesh, feed, feeding)
      with tempfile.TemporaryDirectory() as tmp:
        cfg.checkpoint_every_epochs = 0
        cfg.checkpoint_every_steps = 0
        the_loop = loop.Loop(settings=loop.LoopSettings.from_config(cfg), workdir=Path(tmp),
                             state=parallel.replicate(state, mesh),
                             run_chunk=lambda s, e, f, k, key: chunks(s, e, f, k, key),
                             train_examples=n, global_batch=batch,
                             steps_per_epoch=args.loop_steps, total_epochs=args.loop_epochs,
                             schedule=schedule)
        mngr = checkpoint.manager(tmp, 1)
        writer = writers.create(tmp, True, tensorboard="none")
        history: list[dict] = []
        marks = [time.perf_counter()]   # the end of each epoch (its steps and metrics)
        with checkpoint.finishing(mngr):
          loop.run_epochs(the_loop, 0, history, mngr, writer,
                          lambda *_: marks.append(time.perf_counter()))
        wall = time.perf_counter() - marks[0]
        mngr.close()
      seconds = list(np.diff(marks))
      out.append({"task": task, "system": "loop", "feed": kind, "batch": batch,
                  "dispatch_steps": [n for _, n in loop.chunk_plan(0, 0, the_loop)],
                  "epoch_seconds": seconds,
                  "rates": [args.loop_steps * batch / t for t in seconds[1:]],
                  "first_epoch_s": seconds[0], "wall_s": wall,
                  "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
                  "attention": attention_used(task, cfg)})
  return out


def worker(args) -> None:
  if args.worker in ("ours", "ours_1dev", "loop"):
    _enable_cache(args.compilation_cache)
  configs = _configs(args.preset, args.dtype)
  for task in args.task:
    config = configs[task]
    if args.worker in ("ours", "ours_1dev"):
      outs = [_ours(task, config, args.batch, args)]
    elif args.worker == "pipeline":
      outs = [_pipeline(task, config, args.batch, args)]
    elif args.worker == "loop":
      outs = _loop(task, config, args)
    else:
      outs = [_torch(task, config, args.batch, args, compiled=args.worker == "torch_compile")]
    for out in outs:
      print(RESULT + json.dumps({"task": task, "system": args.worker, **out}), flush=True)


# --- Driver -------------------------------------------------------------------------


OPTIONAL = ("torch", "torch_compile")


def _run_worker(system: str, args, needs_gpu: bool = False) -> list[dict[str, Any]]:
  """One system in its own process, its stderr passed straight through. Ours failing
  stops the benchmark; an optional (PyTorch) one failing or timing out is reported and
  left out."""
  cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", system,
         "--preset", args.preset, "--batch", str(args.batch), "--task", ",".join(args.task),
         "--repeats", str(args.repeats), "--steps", str(args.steps), "--dtype", args.dtype,
         "--loop_batches", args.loop_batches, "--loop_feeds", args.loop_feeds,
         "--loop_steps", str(args.loop_steps), "--loop_epochs", str(args.loop_epochs),
         "--compilation_cache", args.compilation_cache]
  cmd += ["--torch_needs_gpu"] if needs_gpu else []
  env = dict(os.environ)
  devices = math.gcd(args.batch, max(args.host_devices, 1))   # the batch must divide
  cmd += ["--host_devices", str(devices)]
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  if system in ("ours", "loop") and devices > 1:
    # One XLA host device per core, the step data-parallel over them (the same
    # shard_map step a multi-GPU run uses): XLA runs small batched matmuls, such
    # as attention's, on one thread, so a single device leaves a core idle.
    flags.append(f"--xla_force_host_platform_device_count={devices}")
  env["XLA_FLAGS"] = " ".join(flags)
  optional = system in OPTIONAL
  try:
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False, env=env,
                          timeout=args.torch_timeout if optional else None)
  except subprocess.TimeoutExpired:
    print(f"{system}: skipped, still running after {args.torch_timeout} s", file=sys.stderr,
          flush=True)
    return []
  if proc.returncode:
    if optional:
      print(f"{system}: skipped, failed (exit {proc.returncode}; its stderr is above)",
            file=sys.stderr, flush=True)
      return []
    raise SystemExit(f"{system} failed (exit {proc.returncode}; its stderr is above)")
  results = [json.loads(line[len(RESULT):]) for line in proc.stdout.splitlines()
             if line.startswith(RESULT)]
  for r in results:
    if r.get("skipped"):
      print(f"{r['task']} {system}: skipped, {r['skipped']}", file=sys.stderr, flush=True)
  return [r for r in results if not r.get("skipped")]


def _line(r: dict[str, Any], flops: int, peak: float | None) -> str:
  rates = r["rates"]
  med = statistics.median(rates)
  text = (f"{r['task']:<9}{LABELS[r['system']]:<15}{med:9.1f} images/s "
          f"(min {min(rates):.1f}, max {max(rates):.1f})")
  text += f"  compile {r['compile_s']:.1f} s" if r.get("compile_s") is not None else ""
  text += f"  loss {r['loss']:.4f}"
  if peak:
    achieved = flops * med / r["batch"]
    text += f"  {achieved / 1e12:.1f} TFLOP/s  MFU {100 * achieved / peak:.1f}%"
  return text


def _loop_line(r: dict[str, Any], flops: int, peak: float | None) -> str:
  med = statistics.median(r["rates"]) if r["rates"] else float("nan")
  text = (f"{r['task']:<9}real loop, {r['feed']} feed, batch {r['batch']}: {med:,.1f} images/s "
          f"(median of {len(r['rates'])} epochs after the first; dispatches of "
          f"{' + '.join(map(str, r['dispatch_steps']))} steps per epoch; first epoch with "
          f"compilation {r['first_epoch_s']:.1f} s)")
  if peak:
    achieved = flops * med / r["batch"]
    text += f"  {achieved / 1e12:.1f} TFLOP/s  MFU {100 * achieved / peak:.1f}%"
  return text


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="seed")
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--task", default="pretrain,finetune")
  parser.add_argument("--systems", default="ours,torch,torch_compile")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--steps", type=int, default=2, help="steps per timed repeat")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--no_pipeline", action="store_true", help="skip the input pipeline")
  parser.add_argument("--host_devices", type=int, default=os.cpu_count() or 1,
                      help="XLA host (CPU) devices for `ours` (default: one per core); "
                           "`ours_1dev` always uses one")
  parser.add_argument("--loop", action="store_true",
                      help="also time whole epochs of the real training loop")
  parser.add_argument("--loop_batches", default="",
                      help="batch sizes of the loop timing (default: the stage's and --batch)")
  parser.add_argument("--loop_feeds", default="device,host")
  parser.add_argument("--loop_steps", type=int, default=20, help="steps per loop epoch")
  parser.add_argument("--loop_epochs", type=int, default=3, help="loop epochs (first compiles)")
  parser.add_argument("--compilation_cache",
                      default=os.environ.get("MAE_JAX_COMPILATION_CACHE", ""),
                      help="XLA's compilation cache for ours ('' off; default "
                           "MAE_JAX_COMPILATION_CACHE)")
  parser.add_argument("--torch_timeout", type=float, default=600,
                      help="seconds a PyTorch system may run before it is skipped")
  parser.add_argument("--torch_needs_gpu", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--worker", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  args.task = [t for t in args.task.split(",") if t]
  systems = [s for s in args.systems.split(",") if s]
  bad = [t for t in args.task if t not in TASKS] + [s for s in systems if s not in SYSTEMS]
  if bad:
    parser.error(f"unknown task or system {bad}; tasks: {TASKS}, systems: {SYSTEMS}")
  if args.worker:
    worker(args)
    return

  configs = _configs(args.preset, args.dtype)
  load = os.getloadavg()
  print(f"preset {args.preset}, batch {args.batch}, {args.dtype}, {args.repeats} timed runs of "
        f"{args.steps} steps (median images/s; compilation excluded); {os.cpu_count()} CPUs "
        f"({platform.processor() or platform.machine()}), load {load[0]:.2f}", flush=True)
  results = []
  required = [s for s in systems if s not in OPTIONAL]
  for system in (([] if args.no_pipeline else ["pipeline"]) + required
                 + (["loop"] if args.loop else []) + [s for s in systems if s in OPTIONAL]):
    on_gpu = any("cpu" not in r.get("device", "cpu").lower() for r in results)
    results += _run_worker(system, args, needs_gpu=on_gpu)
  device = next((r["device"] for r in results if r["system"] in ("ours", "ours_1dev", "loop")),
                "")
  peak = peak_flops(device, args.dtype)
  for r in results:
    r.setdefault("batch", args.batch)
  for r in results:
    if r["system"] == "pipeline":
      print(f"{r['task']:<9}{'device feed':<15}{statistics.median(r['rates']):9,.0f} images/s "
            f"(batches made in JAX, {'augmented' if r['augment'] else 'no augmentation'})")
  for task in args.task:
    flops = train_flops(task, configs[task], args.batch)
    for r in results:
      if r["task"] == task and r["system"] not in ("pipeline", "loop"):
        print(_line(r, flops, peak))
    for r in results:
      if r["task"] == task and r["system"] == "loop":
        print(_loop_line(r, train_flops(task, configs[task], r["batch"]), peak))
  for task in args.task:
    for r in results:
      if r["task"] == task and r.get("attention"):
        print(f"{task:<9}attention ({LABELS[r['system']]}): {r['attention']}")
        break
  devices = sorted({f"{LABELS[r['system']]}: {r['device']}" for r in results if "device" in r})
  print("devices: " + "; ".join(devices) + f"; load at end {os.getloadavg()[0]:.2f}")
  ratios = []
  for task in TASKS:
    rate = {r["system"]: statistics.median(r["rates"]) for r in results if r["task"] == task}
    ratios.append(f"{task} {rate['ours'] / rate['torch']:.2f}"
                  if "ours" in rate and "torch" in rate else f"{task} n/a")
  print("ratio ours/pytorch-eager: " + " ".join(ratios))


if __name__ == "__main__":
  main()
