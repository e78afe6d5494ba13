"""Figures (matplotlib, headless): sample grids, loss curves, MAE reconstructions,
ROC curves and confusion matrices.

  python -m mae_jax.eval.plots samples --data DIR --out samples.png [--per_class 6]
"""

from __future__ import annotations

import argparse
import json
import os
import textwrap
from pathlib import Path
from typing import Mapping

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from mae_jax.data import layout  # pylint: disable=g-import-not-at-top
from mae_jax.data import npy_io  # pylint: disable=g-import-not-at-top


def _jsonable(value):
  """Arrays as nested lists (4 significant digits, NaN as None), mappings recursively."""
  if isinstance(value, Mapping):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if isinstance(value, (np.ndarray, np.generic)):
    array = np.asarray(value)
    if array.dtype.kind == "f":
      rounded = np.round(array.astype(np.float64), 4)
      return np.where(np.isnan(rounded), None, rounded).tolist()
    return array.tolist()
  return value


def save(fig, path: str | os.PathLike[str], data=None, title: str | None = None) -> Path:
  """Saves the figure, and beside it (`<name>.json`) the data it draws, so every figure
  can be checked or redrawn without its PNG."""
  fig.tight_layout()
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  if data is not None:
    path.with_suffix(".json").write_text(json.dumps(
        {"figure": path.name, "title": title, "data": _jsonable(data)}))
  return path


def sample_grid(images: Mapping[str, np.ndarray], path: str | os.PathLike[str],
                title: str | None = None,
                captions: Mapping[str, list[str]] | None = None) -> Path:
  """Saves a grid with one row per class of (N, H, W) or (N, H, W, 1) images.

  Each image is shown on its own [min, max] colour scale (as the models see it).
  """
  names = [n for n in images if len(images[n])]
  cols = max(len(images[n]) for n in names)
  fig, axes = plt.subplots(len(names), cols, figsize=(1.6 * cols + 0.6, 1.7 * len(names)),
                           squeeze=False)
  for r, name in enumerate(names):
    for c in range(cols):
      ax = axes[r, c]
      ax.set_xticks([])
      ax.set_yticks([])
      if c >= len(images[name]):
        ax.axis("off")
        continue
      ax.imshow(np.squeeze(images[name][c]), cmap="inferno", interpolation="nearest")
      if captions and name in captions:
        ax.set_title(captions[name][c], fontsize=7)
      if c == 0:
        ax.set_ylabel(name, fontsize=11)
  if title:
    fig.suptitle(title, fontsize=11)
  return save(fig, path, {"images": dict(images), "captions": dict(captions or {})}, title)


def loss_curves(history: list[dict], path: str | os.PathLike[str],
                phase_starts: list[int] | None = None, title: str | None = None,
                ylabel: str = "reconstruction loss") -> Path:
  """Train and validation loss per epoch; dashed lines where a new phase starts.

  `history` holds one dict per epoch with `epoch` (1-based) and any of
  `train_loss`, `val_loss`.
  """
  fig, ax = plt.subplots(figsize=(7, 4))
  for key, label in (("train_loss", "train"), ("val_loss", "validation")):
    pts = [(h["epoch"], h[key]) for h in history if h.get(key) is not None]
    if pts:
      ax.plot(*zip(*pts), marker="o" if len(pts) < 30 else None, ms=3, label=label)
  for i, start in enumerate(phase_starts or []):
    if start > 0:
      ax.axvline(start + 0.5, color="grey", ls="--", lw=1)
      ax.text(start + 0.6, 0.98, f"phase {i + 1}", transform=ax.get_xaxis_transform(),
              va="top", fontsize=8, color="grey")
  ax.set_xlabel("epoch")
  ax.set_ylabel(ylabel)
  ax.grid(alpha=0.3)
  ax.legend()
  if title:
    ax.set_title(title)
  return save(fig, path, {"history": history, "phase_starts": list(phase_starts or []),
                           "ylabel": ylabel}, title)


def online_probe(history: list[dict], path: str | os.PathLike[str],
                 phase_starts: list[int] | None = None, title: str | None = None) -> Path:
  """The online probe's validation macro AUC per epoch (history records with `probe_auc`)
  beside the validation loss on a second axis: does the representation learn while the
  loss falls?"""
  fig, ax = plt.subplots(figsize=(7, 4))
  pts = [(h["epoch"], h["probe_auc"]) for h in history if h.get("probe_auc") is not None]
  if pts:
    ax.plot(*zip(*pts), marker="o", ms=4, color="C2", label="few-shot probe (validation)")
  ax.set_xlabel("epoch")
  ax.set_ylabel("macro AUC of the few-shot probe")
  ax.grid(alpha=0.3)
  loss = [(h["epoch"], h["val_loss"]) for h in history if h.get("val_loss") is not None]
  if loss:
    twin = ax.twinx()
    twin.plot(*zip(*loss), color="C1", alpha=0.6, lw=1, label="validation loss")
    twin.set_ylabel("reconstruction loss (validation)")
    lines = ax.get_legend_handles_labels()
    more = twin.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], loc="lower right", fontsize=8)
  elif pts:
    ax.legend(loc="lower right", fontsize=8)
  for start in phase_starts or []:
    if start > 0:
      ax.axvline(start + 0.5, color="grey", ls="--", lw=1)
  if title:
    ax.set_title(title)
  return save(fig, path, {"history": [{k: h.get(k) for k in ("epoch", "probe_auc", "probe_feature",
                                                            "val_loss")} for h in history],
                          "phase_starts": list(phase_starts or [])}, title)


def reconstructions(rows: Mapping[str, np.ndarray], path: str | os.PathLike[str],
                    title: str | None = None) -> Path:
  """One row per entry of `rows` ((N, H, W[, 1]) images), one column per example.

  Rows share a [0, 1] colour scale; NaN pixels (masked patches) are drawn grey.
  """
  names = list(rows)
  cols = len(rows[names[0]])
  fig, axes = plt.subplots(len(names), cols, figsize=(1.5 * cols + 1.2, 1.55 * len(names)),
                           squeeze=False)
  cmap = matplotlib.colormaps["inferno"].copy()
  cmap.set_bad("0.55")
  for r, name in enumerate(names):
    for c in range(cols):
      ax = axes[r, c]
      ax.imshow(np.squeeze(rows[name][c]), cmap=cmap, vmin=0.0, vmax=1.0,
                interpolation="nearest")
      ax.set_xticks([])
      ax.set_yticks([])
      if c == 0:
        ax.set_ylabel(name, fontsize=9)
  if title:
    fig.suptitle(title, fontsize=10)
  return save(fig, path, {"rows": dict(rows)}, title)


def roc(curves: Mapping[str, tuple], path: str | os.PathLike[str], title: str | None = None,
        baseline: Mapping[str, tuple] | None = None) -> Path:
  """One-vs-rest ROC curve per class plus the micro average, AUC in the legend.

  `curves` maps a class name (and 'micro') to (fpr, tpr, auc); `baseline`, if
  given, is drawn dashed in the same colours.
  """
  fig, ax = plt.subplots(figsize=(5.2, 5))
  colours = {}
  for name, (fpr, tpr, auc) in curves.items():
    style = dict(ls=":", lw=2, color="black") if name == "micro" else dict(lw=1.8)
    (line,) = ax.plot(fpr, tpr, label=f"{name} (AUC = {auc:.3f})", **style)
    colours[name] = line.get_color()
  for name, (fpr, tpr, auc) in (baseline or {}).items():
    ax.plot(fpr, tpr, ls="--", lw=1, alpha=0.7, color=colours.get(name, "grey"),
            label=f"baseline {name} ({auc:.3f})")
  ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
  ax.set_xlim(0, 1)
  ax.set_ylim(0, 1.01)
  ax.set_xlabel("false positive rate")
  ax.set_ylabel("true positive rate")
  ax.legend(loc="lower right", fontsize=8)
  ax.grid(alpha=0.3)
  if title:
    ax.set_title(title, fontsize=10)
  return save(fig, path, {"curves": {k: {"fpr": c[0], "tpr": c[1], "auc": c[2]} for k, c in curves.items()},
                           "baseline": {k: {"fpr": c[0], "tpr": c[1], "auc": c[2]}
                                        for k, c in (baseline or {}).items()}}, title)


def label_efficiency(summary: list[dict], path: str | os.PathLike[str],
                     title: str | None = None, goals: list[dict] | None = None) -> Path:
  """Test macro AUC against labels per class, one panel per simulator variant, one line
  per arm: the mean over seeds, bars from the lowest to the highest seed, and the mean
  bootstrap 95% interval as a shaded band. 'all' labels sit at the right end. Each goal
  (`value`, `target`, `gap`; see `stages.study.goals`) is a black bar at its target,
  joined to the arm's mean by a dotted line and labelled with the gap."""
  variants = list(dict.fromkeys(s["variant"] for s in summary))
  fig, axes = plt.subplots(1, max(len(variants), 1), figsize=(5.4 * max(len(variants), 1), 4.4),
                           squeeze=False)
  budgets = sorted({s["labels_per_class"] for s in summary if s["labels_per_class"] > 0})
  all_x = (max(budgets) * 3 if budgets else 1)
  xs = lambda labels: labels if labels > 0 else all_x  # pylint: disable=unnecessary-lambda-assignment
  for ax, variant in zip(axes[0], variants):
    arms = list(dict.fromkeys(s["arm"] for s in summary if s["variant"] == variant))
    for arm in arms:
      cells = sorted((s for s in summary if s["variant"] == variant and s["arm"] == arm
                      and s["mean_test_macro_auc"] is not None), key=lambda s: xs(s["labels_per_class"]))
      x = np.array([xs(c["labels_per_class"]) for c in cells], float)
      y = np.array([c["mean_test_macro_auc"] for c in cells])
      err = np.array([[c["mean_test_macro_auc"] - c["min"], c["max"] - c["mean_test_macro_auc"]]
                      for c in cells]).T
      line = ax.errorbar(x, y, yerr=err, marker="o", capsize=3, lw=1.6, label=arm.replace("_", " "))
      band = [c["mean_interval"] for c in cells]
      if all(band):
        ax.fill_between(x, [b[0] for b in band], [b[1] for b in band], alpha=0.12,
                        color=line[0].get_color())
    for i, g in enumerate(g for g in goals or [] if g["variant"] == variant):
      x = xs(g["labels_per_class"])
      ax.plot([x, x], [g["value"], g["target"]], ls=":", color="black", lw=1)
      ax.scatter([x], [g["target"]], marker="_", s=220, color="black", zorder=5,
                 label="goal (gap to it)" if i == 0 else None)
      ax.annotate(f"{g['gap']:+.3f}", (x, g["target"]), textcoords="offset points",
                  xytext=(5, 2), fontsize=7)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.minorticks_off()
    has_all = any(s["labels_per_class"] <= 0 for s in summary)
    ax.set_xticks(budgets + [all_x] * has_all)
    ax.set_xticklabels([str(b) for b in budgets] + ["all"] * has_all)
    ax.set_xlabel("labelled images per class")
    ax.set_ylabel("test macro AUC")
    ax.set_title(variant, fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
  if title:
    fig.suptitle(title, fontsize=12)
  return save(fig, path, {"summary": summary, "goals": goals or []}, title)


def confusion(matrix, class_names, path: str | os.PathLike[str],
              title: str | None = None) -> Path:
  """Confusion matrix (rows: true class, columns: predicted), counts and row shares."""
  m = np.asarray(matrix, dtype=np.float64)
  share = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
  fig, ax = plt.subplots(figsize=(4.6, 4))
  ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
  for i in range(m.shape[0]):
    for j in range(m.shape[1]):
      ax.text(j, i, f"{int(m[i, j])}\n{share[i, j]:.0%}", ha="center", va="center",
              fontsize=9, color="white" if share[i, j] > 0.5 else "black")
  ax.set_xticks(range(len(class_names)), class_names)
  ax.set_yticks(range(len(class_names)), class_names)
  ax.set_xlabel("predicted")
  ax.set_ylabel("true")
  if title:
    ax.set_title(title, fontsize=10)
  return save(fig, path, {"matrix": np.asarray(matrix), "class_names": list(class_names)},
               title)


def image_array(path: str | os.PathLike[str]) -> np.ndarray:
  """A PNG as a uint8 (H, W, 3) array, e.g. for a TensorBoard image summary."""
  rgba = plt.imread(Path(path))
  if rgba.dtype != np.uint8:
    rgba = np.round(np.clip(rgba, 0.0, 1.0) * 255.0).astype(np.uint8)
  if rgba.ndim == 2:
    rgba = np.repeat(rgba[..., None], 3, axis=-1)
  return np.ascontiguousarray(rgba[..., :3])


def figure_grid(figures: list[tuple[str, str | os.PathLike[str]]],
                path: str | os.PathLike[str], cols: int = 3, title: str | None = None) -> Path:
  """Tiles saved figures ((caption, PNG path) pairs) into one image, row by row."""
  if not figures:
    raise ValueError("figure_grid needs at least one figure")
  cols = min(cols, len(figures))
  rows = -(-len(figures) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.4 * rows), squeeze=False)
  for ax in axes.ravel():
    ax.axis("off")
  for ax, (caption, png) in zip(axes.ravel(), figures):
    ax.imshow(image_array(png), interpolation="lanczos")
    # A tile is about 45 characters of 12-point text wide: longer captions wrap, not clip.
    ax.set_title(textwrap.fill(caption, 45), fontsize=12)
  if title:
    fig.suptitle(title, fontsize=14)
  return save(fig, path)


def _samples_from_folder(data: str, per_class: int):
  images, captions = {}, {}
  for name, paths in layout.list_class_files(data).items():
    imgs, caps = [], []
    for p in paths[:per_class]:
      rec = npy_io.read_lens_file(p)
      imgs.append(rec.image)
      caps.append(f"m_a={rec.axion_mass:.1e} eV" if rec.axion_mass else "")
    images[name], captions[name] = np.stack(imgs) if imgs else np.zeros((0, 1, 1)), caps
  return images, captions


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m mae_jax.eval.plots",
                                   description="mae_jax figures")
  sub = parser.add_subparsers(dest="what", required=True)
  s = sub.add_parser("samples", help="grid of images per class of a DeepLense folder")
  s.add_argument("--data", required=True, help="DeepLense-layout folder")
  s.add_argument("--out", required=True, help="PNG file to write")
  s.add_argument("--per_class", type=int, default=6)
  s.add_argument("--title", default=None)
  args = parser.parse_args(argv)
  images, captions = _samples_from_folder(args.data, args.per_class)
  out = sample_grid(images, args.out, title=args.title or f"samples of {args.data}",
                    captions=captions)
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
