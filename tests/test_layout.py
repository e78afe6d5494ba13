"""The package's layering rules, read from its source.

- `models/`, `objectives/`, `train/` and `runtime/` import no TensorFlow, tfds, clu, matplotlib or
  scikit-learn: a subprocess that refuses those imports still imports every module
  there and runs one tiny pretraining step and one classifier step.
- No import circles between the modules of `mae_jax` (function-level imports count).
- `models/`, `objectives/`, `train/` and `runtime/` import nothing from `data/` or `eval/` (the
  batches' pure-JAX order, normalisation and augmentation live in `train/batching.py`,
  which `data/` reuses).
- `train/` and `data/` import no ml_collections: the stages turn the config into frozen
  settings (`LoopSettings`, `AdamWSettings`, `ClassifierOptimSettings`, `DataSettings`)
  where it crosses into them.
- Nothing outside `stages/` imports `stages/`; stages are dispatched through one
  registry; config problems are raised in one place; flattening goes through
  `flax.traverse_util`, never a hand-written walk; the names of a workdir's files are
  spelled in `runtime/workdir.py` only; functions in `stages/` and `train/loop.py` are
  under 40 lines.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mae_jax"
JAX_ONLY = ("models", "objectives", "train", "runtime")
REFUSED = ("tensorflow", "tensorflow_datasets", "clu", "matplotlib", "sklearn")
STAGE_NAMES = {"data", "pretrain", "probe", "finetune", "pipeline", "predict", "study"}


def _modules() -> dict[str, Path]:
  """Dotted module name -> file, for every module of the package."""
  out = {}
  for f in PACKAGE.rglob("*.py"):
    parts = f.relative_to(ROOT).with_suffix("").parts
    name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    out[name] = f
  return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
  """The package modules `name` imports anywhere in its file (functions included)."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      found.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = name.split(".")
        parts = parts if path.name == "__init__.py" else parts[:-1]
        base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
      found.add(base)
      found.update(f"{base}.{a.name}" for a in node.names)
  # A module's import of its own package's __init__ (as `from mae_jax.x import y` names
  # it) is the import of y, not a dependency on the package's other modules.
  return {m for m in found if m in modules and m != name and not _is_package(m, modules)}


def _is_package(name: str, modules: dict[str, Path]) -> bool:
  return modules[name].name == "__init__.py"


def _graph() -> dict[str, set[str]]:
  modules = _modules()
  return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

  def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on.add(v)
    for w in sorted(graph[v]):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def test_cycle_finder_finds_a_planted_circle():
  graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
  assert _cycles(graph) == [["a", "b", "c"]]
  assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles():
  circles = _cycles(_graph())
  assert not circles, "import circles: " + "; ".join(" <-> ".join(c) for c in circles)


def test_nothing_outside_stages_imports_stages():
  offenders = {m: sorted(t for t in targets if t.startswith("mae_jax.stages"))
               for m, targets in _graph().items() if not m.startswith("mae_jax.stages")}
  offenders = {m: t for m, t in offenders.items() if t}
  assert not offenders, offenders


def test_jax_only_layers_import_nothing_from_data_or_eval():
  offenders = {m: sorted(t for t in targets if t.split(".")[1] in ("data", "eval", "stages"))
               for m, targets in _graph().items() if m.split(".")[1:2] and m.split(".")[1] in JAX_ONLY}
  offenders = {m: t for m, t in offenders.items() if t}
  assert not offenders, offenders


def test_jax_only_layers_import_none_of_the_heavy_libraries_statically():
  for name, path in _modules().items():
    if name.split(".")[1:2] and name.split(".")[1] in JAX_ONLY:
      for node in ast.walk(ast.parse(path.read_text())):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
        bad = [n for n in names if n.split(".")[0] in REFUSED]
        assert not bad, f"{name} imports {bad}"


def _imported_names(tree: ast.Module) -> list[str]:
  """Every module name an `import` or `from ... import` in `tree` names (functions included)."""
  return [n for node in ast.walk(tree)
          for n in ([a.name for a in node.names] if isinstance(node, ast.Import)
                    else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])]


def test_train_and_data_take_settings_not_config_dicts():
  """The config crosses into train/ and data/ as frozen settings made in stages/: neither
  layer imports ml_collections."""
  for name, path in _modules().items():
    if name.split(".")[1:2] and name.split(".")[1] in ("train", "data"):
      bad = [n for n in _imported_names(ast.parse(path.read_text()))
             if n.split(".")[0] == "ml_collections"]
      assert not bad, f"{name} imports {bad}"


@pytest.mark.slow
def test_jax_only_layers_run_a_step_where_heavy_libraries_cannot_be_imported():
  """Every module of models/, train/, runtime/ imports, and one tiny pretraining step
  and one classifier step run, with TensorFlow, tfds, clu, matplotlib and
  scikit-learn refused by an import hook."""
  script = textwrap.dedent(f"""
      import importlib, importlib.abc, pkgutil, sys
      sys.path.insert(0, {str(ROOT)!r})
      REFUSED = {REFUSED!r}

      class Refuse(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
          if name.split(".")[0] in REFUSED:
            raise ImportError("refused by the test: " + name)
          return None

      sys.meta_path.insert(0, Refuse())
      import mae_jax
      for layer in {JAX_ONLY!r}:
        package = importlib.import_module("mae_jax." + layer)
        for info in pkgutil.iter_modules(package.__path__):
          importlib.import_module(f"mae_jax.{{layer}}.{{info.name}}")

      import jax, jax.numpy as jnp, numpy as np
      from configs import finetune as finetune_config, pretrain as pretrain_config
      from mae_jax.models import build
      from mae_jax.runtime import parallel
      from mae_jax import objectives
      from mae_jax.train import optim, steps

      mesh = parallel.make_mesh()
      config = pretrain_config.get_config("tiny")
      mae = build.build_mae(config.model)
      params = build.init_mae(mae, jax.random.key(0))
      tx, _ = optim.adamw(params, optim.AdamWSettings.from_config(config.optim), total_steps=4,
                          steps_per_epoch=2)
      state = parallel.replicate(steps.TrainState.create(apply_fn=mae.apply, params=params,
                                                         tx=tx), mesh)
      step = steps.make_pretrain_step(mae, objectives.from_config(config.loss), mesh)
      images = np.random.default_rng(0).random((4, 64, 64, 1), np.float32)
      state, metrics = step(state, parallel.global_batch({{"x": images}}, mesh)["x"],
                            jax.random.key(1))
      assert bool(metrics["finite"]) and int(state.step) == 1

      config = finetune_config.get_config("tiny")
      model = build.build_classifier(config.model, 3, parallel.AXIS)
      params, stats = build.init_classifier(model, jax.random.key(0))
      tx, _ = optim.classifier_optimizer(
          params, optim.ClassifierOptimSettings.from_config(config.optim), total_steps=4,
          steps_per_epoch=2, global_batch=4, depth=config.model.depth)
      state = parallel.replicate(steps.ClassifierState.create(
          apply_fn=model.apply, params=params, tx=tx, batch_stats=stats), mesh)
      step = steps.make_classifier_step(model, mesh, frozen_encoder=False)
      batch = parallel.global_batch({{"x": images, "y": np.array([0, 1, 2, 0], np.int32)}}, mesh)
      state, metrics = step(state, batch["x"], batch["y"], jax.random.key(2))
      assert bool(metrics["finite"]) and int(state.step) == 1
      refused = [m for m in sys.modules if m.split(".")[0] in REFUSED]
      assert not refused, refused
      print("ok")
  """)
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=600, cwd=ROOT)
  assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


def _trees() -> dict[str, ast.Module]:
  trees = {name: ast.parse(path.read_text()) for name, path in _modules().items()}
  trees["main"] = ast.parse((ROOT / "main.py").read_text())
  return trees


def _stage_tables(tree: ast.Module, functions: set[str]) -> list[int]:
  """Lines of dict literals mapping stage names to functions of the package."""
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Dict) and node.keys and all(
        isinstance(k, ast.Constant) and k.value in STAGE_NAMES for k in node.keys):
      if any((v.attr if isinstance(v, ast.Attribute) else getattr(v, "id", None)) in functions
             for v in node.values):
        found.append(node.lineno)
  return found


def test_stage_table_finder_finds_a_planted_table():
  planted = ast.parse('STAGES = {"data": data.run, "probe": classify.run}')
  assert _stage_tables(planted, {"run"}) == [1]
  assert _stage_tables(ast.parse('FILES = {"data": data.SUMMARY_FILE}'), {"run"}) == []


def test_stages_are_dispatched_through_one_registry():
  """No module but the registry holds a table of stage names -> functions."""
  trees = _trees()
  functions = {f.name for tree in trees.values() for f in ast.walk(tree)
               if isinstance(f, ast.FunctionDef)}
  for name, tree in trees.items():
    lines = _stage_tables(tree, functions)
    assert not lines, f"{name} line(s) {lines} map stage names to functions"


def test_every_config_names_a_registered_stage():
  from mae_jax.stages import launch  # pylint: disable=g-import-not-at-top,unused-import
  from mae_jax.stages import registry  # pylint: disable=g-import-not-at-top
  from mae_jax.stages import validate  # pylint: disable=g-import-not-at-top
  for f in sorted((ROOT / "configs").glob("*.py")):
    if f.stem in ("__init__", "common"):
      continue
    config = validate.load_config_file(str(f), "tiny")
    assert config.stage in registry.names(), f


def test_config_problems_are_raised_in_one_place():
  """Only stages/validate.py raises ConfigError (every other module reports through it)."""
  for name, tree in _trees().items():
    for node in ast.walk(tree):
      if isinstance(node, ast.Raise) and node.exc is not None:
        call = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
        called = call.attr if isinstance(call, ast.Attribute) else getattr(call, "id", "")
        if called == "ConfigError":
          assert name == "mae_jax.stages.validate", f"{name} line {node.lineno} raises ConfigError"


def test_stage_and_loop_functions_are_short():
  """Functions (methods and nested ones too) in stages/ and train/loop.py are under 40
  lines: a longer one is split into named phases."""
  for name, tree in _trees().items():
    if name.startswith("mae_jax.stages") or name == "mae_jax.train.loop":
      long = [f"{f.name} ({f.end_lineno - f.lineno + 1} lines)" for f in ast.walk(tree)
              if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
              and f.end_lineno - f.lineno + 1 >= 40]
      assert not long, f"{name}: {', '.join(long)}"


def _hand_written_walks(tree: ast.Module) -> list[str]:
  """Functions that call themselves while looping over `.items()`: a tree flattener."""
  found = []
  for fn in ast.walk(tree):
    if not isinstance(fn, ast.FunctionDef):
      continue
    for loop in ast.walk(fn):
      if isinstance(loop, ast.For) and isinstance(loop.iter, ast.Call) and \
          getattr(loop.iter.func, "attr", "") == "items":
        calls = [c for c in ast.walk(loop) if isinstance(c, ast.Call)
                 and getattr(c.func, "id", None) == fn.name]
        if calls:
          found.append(fn.name)
          break
  return found


def test_walk_finder_finds_a_planted_flattener():
  planted = ast.parse(textwrap.dedent("""
      def flat(tree, prefix=""):
        out = {}
        for k, v in tree.items():
          out.update(flat(v, k) if isinstance(v, dict) else {k: v})
        return out
  """))
  assert _hand_written_walks(planted) == ["flat"]


@pytest.mark.parametrize("layer", ["models", "train", "runtime", "data", "eval", "stages"])
def test_trees_are_flattened_by_flax_traverse_util_only(layer):
  for name, tree in _trees().items():
    if name.startswith(f"mae_jax.{layer}"):
      assert not _hand_written_walks(tree), f"{name}: {_hand_written_walks(tree)}"


def test_workdir_file_names_are_spelled_in_one_place():
  """The files stages read back from each other's workdirs are named in runtime/workdir.py."""
  from mae_jax.runtime import workdir  # pylint: disable=g-import-not-at-top
  names = {v for k, v in vars(workdir).items() if k.isupper() and isinstance(v, str)}
  assert {"config.json", "best_checkpoint", "eval_metrics.json", "history.json"} <= names
  for name, tree in _trees().items():
    if name == "mae_jax.runtime.workdir":
      continue
    spelled = [n.lineno for n in ast.walk(tree)
               if isinstance(n, ast.Constant) and n.value in names]
    assert not spelled, f"{name} line(s) {spelled} spell a workdir file name"


def test_documented_module_commands_are_real_modules():
  """Every `python -m mae_jax....` in the README and docs names a module (no shim) that runs
  its own `main` when executed."""
  pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
  named = {m.rstrip(".") for page in pages
           for m in re.findall(r"python -m (mae_jax[\w.]*)", page.read_text())}
  assert {"mae_jax.models.load", "mae_jax.eval.plots", "mae_jax.data.simulate"} <= named
  modules = _modules()
  for name in named:
    assert name in modules, f"{name} is documented but is no module"
    assert not _is_package(name, modules) and 'if __name__ == "__main__":' in \
        modules[name].read_text(), f"{name} does not run as a command"
  assert "mae_jax.convert" not in modules and "mae_jax.plots" not in modules
