"""tfds builder: features, stable hash splits, caching, bad-file handling."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow_datasets as tfds

from mae_jax.data import builder
from mae_jax.data import splits
from mae_jax.runtime import errors
from mae_jax.data import layout
from mae_jax.data import npy_io
from tests.conftest import write_folder


def _names_by_split(prepared) -> dict[str, set[str]]:
  out = {}
  for split in ("train", "validation"):
    ds = prepared.builder.as_dataset(split=split)
    out[split] = {ex["file_name"].decode() for ex in tfds.as_numpy(ds)}
  return out


def test_features_labels_and_splits(small_folder, tmp_path):
  root, classes = small_folder
  prepared = builder.prepare(root, tmp_path / "cache", progress=False)
  info = prepared.builder.info
  assert prepared.image_shape == (16, 16)
  assert info.features["image"].shape == (16, 16, 1)
  assert info.features["label"].names == list(layout.CLASS_NAMES)
  n_train, n_val = info.splits["train"].num_examples, info.splits["validation"].num_examples
  assert n_train + n_val == len(classes) == 120
  assert 2 <= n_val <= 30  # ~10% by hash
  for ex in tfds.as_numpy(prepared.builder.as_dataset(split="validation")):
    name = ex["file_name"].decode()
    cls = name.split("/")[0]
    assert layout.CLASS_NAMES[ex["label"]] == cls
    assert (ex["axion_mass"] > 0) == (cls == "axion")
    if cls != "axion":
      assert ex["axion_mass"] == layout.AXION_MASS_NONE
    uid = int(name.split("_")[-1].removesuffix(".npy"))
    assert classes[uid] == cls
    assert ex["image"].dtype == np.float32 and ex["image"].shape == (16, 16, 1)
  names = _names_by_split(prepared)
  for split, files in names.items():
    assert all(splits.split_of(f, 0.1) == split for f in files)


def test_split_is_stable_when_files_are_added(small_folder, tmp_path):
  root, _ = small_folder
  before = _names_by_split(builder.prepare(root, tmp_path / "cache", progress=False))
  write_folder(root, per_class=30, start=1000)
  after_prepared = builder.prepare(root, tmp_path / "cache", progress=False)
  after = _names_by_split(after_prepared)
  assert sum(len(v) for v in after.values()) == 120 + 90
  for split in before:
    assert before[split] <= after[split], "an existing file moved between splits"


def test_prepared_dataset_is_reused_until_the_folder_changes(small_folder, tmp_path, monkeypatch):
  root, _ = small_folder
  first = builder.prepare(root, tmp_path / "cache", progress=False)

  def no_scan(*args, **kwargs):
    raise AssertionError("rescanned an unchanged folder")

  monkeypatch.setattr(splits, "scan_source", no_scan)
  again = builder.prepare(root, tmp_path / "cache", progress=False)
  assert again.cache_dir == first.cache_dir
  assert again.builder.info.splits["train"].num_examples == \
      first.builder.info.splits["train"].num_examples
  monkeypatch.undo()
  npy_io.write_lens_file(root / "cdm" / "cdm_sim_new.npy", np.random.rand(16, 16))
  changed = builder.prepare(root, tmp_path / "cache", progress=False)
  assert changed.cache_dir != first.cache_dir
  total = sum(s.num_examples for s in changed.builder.info.splits.values())
  assert total == 121


def _add_bad_files(root):
  bad = {}
  p = root / "no_sub" / "trunc.npy"
  np.save(p, np.zeros((16, 16)))
  p.write_bytes(p.read_bytes()[:300])
  bad[str(p)] = "truncated"
  p = root / "cdm" / "big.npy"
  np.save(p, np.zeros((150, 150)))
  bad[str(p)] = "image size 150x150 differs from the dataset's 16x16"
  p = root / "cdm" / "nan.npy"
  np.save(p, np.full((16, 16), np.nan))
  bad[str(p)] = "non-finite"
  p = root / "axion" / "evil.npy"
  arr = np.empty(2, dtype=object)
  arr[0], arr[1] = np.zeros((16, 16)), 1e-23
  raw = p.with_suffix(".tmp")
  np.save(raw, arr, allow_pickle=True)
  p.write_bytes(raw.with_suffix(".tmp.npy").read_bytes().replace(b"numpy", b"posix")
                .replace(b"_reconstruct", b"system\x00\x00\x00\x00\x00\x00"))
  raw.with_suffix(".tmp.npy").unlink()
  bad[str(p)] = "unsafe or invalid pickle"
  return bad


def test_bad_files_error_lists_every_file(small_folder, tmp_path):
  root, _ = small_folder
  bad = _add_bad_files(root)
  with pytest.raises(errors.BadDataError) as info:
    builder.prepare(root, tmp_path / "cache", progress=False)
  message = str(info.value)
  assert f"{len(bad)} bad file(s)" in message
  for path, defect in bad.items():
    line = next(l for l in message.splitlines() if path in l)
    assert defect in line, line
  assert "on_bad_file=skip" in message


def test_bad_files_skipped_and_reported(small_folder, tmp_path):
  root, classes = small_folder
  bad = _add_bad_files(root)
  prepared = builder.prepare(root, tmp_path / "cache", on_bad_file="skip", progress=False)
  assert sorted(p for p, _ in prepared.bad_files) == sorted(bad)
  assert sum(s.num_examples for s in prepared.builder.info.splits.values()) == len(classes)
  report = (prepared.cache_dir / builder.BAD_FILES_REPORT).read_text().splitlines()
  assert report[0] == "path\tdefect" and len(report) == 1 + len(bad)
  again = builder.prepare(root, tmp_path / "cache", on_bad_file="skip", progress=False)
  assert sorted(p for p, _ in again.bad_files) == sorted(bad)


def test_missing_class_folder_explains_layout(tmp_path):
  (tmp_path / "src" / "no_sub").mkdir(parents=True)
  with pytest.raises(layout.LayoutError) as info:
    builder.prepare(tmp_path / "src", tmp_path / "cache", progress=False)
  message = str(info.value)
  assert "lacks the class folder(s) cdm, axion" in message
  assert "python -m mae_jax.data.simulate" in message


def test_bad_settings_rejected(small_folder, tmp_path):
  root, _ = small_folder
  with pytest.raises(ValueError, match="on_bad_file"):
    builder.prepare(root, tmp_path / "c", on_bad_file="ignore")
  with pytest.raises(ValueError, match="validation_fraction"):
    builder.prepare(root, tmp_path / "c", validation_fraction=1.5)


def test_hash_split_fraction_is_close_to_requested():
  keys = [f"cdm/cdm_sim_{i}.npy" for i in range(20000)]
  share = np.mean([splits.split_of(k, 0.1) == "validation" for k in keys])
  assert abs(share - 0.1) < 0.01
