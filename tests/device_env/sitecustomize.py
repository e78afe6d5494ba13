"""Makes this interpreter look like the bare GPU machine (docs/accelerator.md): put this
folder on PYTHONPATH and every Python started there, subprocesses included, imports it.

  MAE_JAX_HIDE=tensorflow,tensorflow_datasets,clu,torch   cannot be imported at all
  MAE_JAX_ONLY_FROM=/tmp/site                             the wheel target
  MAE_JAX_HIDE_OUTSIDE=ml_collections,lenstronomy,astropy,erfa
                                          found only under MAE_JAX_ONLY_FROM

A hidden package looks exactly as an absent one: `import` raises ModuleNotFoundError
and `importlib.util.find_spec` returns None. Used by tests/test_device_wheels.py.
"""

import importlib.machinery
import os


def _names(var):
  return {n for n in os.environ.get(var, "").split(",") if n}


def _install():
  hide, outside = _names("MAE_JAX_HIDE"), _names("MAE_JAX_HIDE_OUTSIDE")
  only = os.environ.get("MAE_JAX_ONLY_FROM", "")
  if not hide and not outside:
    return
  find = importlib.machinery.PathFinder.find_spec

  def find_spec(name, path=None, target=None):
    top = name.split(".")[0]
    if top in hide:
      return None
    if top in outside and path is None:   # a top-level package: only from the target
      return find(name, [only], target) if only else None
    return find(name, path, target)

  importlib.machinery.PathFinder.find_spec = staticmethod(find_spec)


_install()
