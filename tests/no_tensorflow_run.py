"""Runs main.py where TensorFlow, tensorflow_datasets and clu cannot be imported.

  no_tensorflow_run.py [main.py flags...]

The path finder is made blind to those packages, so they look exactly as on a GPU or
TPU host that lacks them: `import tensorflow` raises ModuleNotFoundError and
`importlib.util.find_spec("tensorflow")` is None. Run by test_main.py.
"""

import importlib.machinery
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REFUSED = ("tensorflow", "tensorflow_datasets", "clu")


def _hide_refused_packages() -> None:
  find = importlib.machinery.PathFinder.find_spec

  def find_spec(name, path=None, target=None):
    if name.split(".")[0] in REFUSED:
      return None
    return find(name, path, target)

  importlib.machinery.PathFinder.find_spec = staticmethod(find_spec)


def main():
  _hide_refused_packages()
  sys.path.insert(0, str(ROOT))
  sys.argv = [str(ROOT / "main.py"), *sys.argv[1:]]
  runpy.run_path(str(ROOT / "main.py"), run_name="__main__")


if __name__ == "__main__":
  main()
