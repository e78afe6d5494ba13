"""The DeepLense on-disk layout: one folder per class, one `.npy` file per image.

Shared by the simulator (which writes it), the tfds builder (which reads it) and
the error messages that tell a user what is expected.
"""

from __future__ import annotations

import os
from pathlib import Path

from mae_jax.runtime import errors

# Fixed label order: index i of a ClassLabel is CLASS_NAMES[i], never os.listdir order.
CLASS_NAMES: tuple[str, ...] = ("no_sub", "cdm", "axion")

# Stored as `axion_mass` for images that carry no axion mass (no_sub, cdm).
# Axion masses are positive (1e-24..1e-22 eV), so a negative value cannot collide.
AXION_MASS_NONE: float = -1.0


LayoutError = errors.LayoutError


def expected_layout_message(root: str | os.PathLike[str]) -> str:
  """Says what layout is expected under `root` and how to simulate one."""
  root = Path(root)
  lines = [
      f"expected the DeepLense layout under {root}:",
      *(f"  {root / name}/<file>.npy" for name in CLASS_NAMES),
      "with one .npy file per image (no_sub/cdm: float (H, W) arrays; axion: "
      "object arrays [image, axion_mass]).",
      "To simulate such a folder (DeepLense Model II recipe):",
      f"  python -m mae_jax.data.simulate --out {root} --per_class 1000",
      "or set --config.data.source=simulated to generate it on first use.",
  ]
  return "\n".join(lines)


def list_class_files(root: str | os.PathLike[str]) -> dict[str, list[Path]]:
  """Lists the `.npy` files of each class folder, sorted by name.

  Hidden files (such as the simulator's temporary files) and other extensions
  are ignored.

  Raises:
    LayoutError: `root` is missing, or lacks a class folder, or holds no file.
  """
  root = Path(root)
  if not root.is_dir():
    raise LayoutError(f"data folder {root} does not exist.\n"
                      + expected_layout_message(root))
  missing = [name for name in CLASS_NAMES if not (root / name).is_dir()]
  if missing:
    raise LayoutError(
        f"data folder {root} lacks the class folder(s) {', '.join(missing)}.\n"
        + expected_layout_message(root))
  files = {}
  for name in CLASS_NAMES:
    with os.scandir(root / name) as entries:
      files[name] = sorted(
          (Path(e.path) for e in entries
           if e.name.endswith(".npy") and not e.name.startswith(".")
           and e.is_file()),
          key=lambda p: p.name)
  if not any(files.values()):
    raise LayoutError(f"data folder {root} holds no .npy file.\n"
                      + expected_layout_message(root))
  return files
