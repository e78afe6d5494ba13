"""Preparing a folder: both readers (the safe file reader, TensorFlow-free, and the tfds
builder) give the same three hash splits in the same order, stable when files are
added, cached until the folder changes, with one policy for bad files."""

from __future__ import annotations

import numpy as np
import pytest

from mae_jax.data import arrays
from mae_jax.data import layout
from mae_jax.data import npy_io
from mae_jax.data import splits
from mae_jax.runtime import errors
from tests.conftest import image_id
from tests.conftest import write_folder

READERS = ("files", "tfds")
RULE = splits.SplitRule(validation_fraction=0.2, test_fraction=0.2)


def _prepare(reader: str, root, cache, **kwargs) -> arrays.Dataset:
  if reader == "files":
    return arrays.prepare(root, cache, progress=False, **kwargs)
  from mae_jax.data import builder  # pylint: disable=g-import-not-at-top (TensorFlow)
  return builder.read_dataset(builder.prepare(root, cache, progress=False, **kwargs))


@pytest.mark.parametrize("reader", READERS)
def test_three_disjoint_splits_by_hash_in_canonical_order(reader, small_folder, tmp_path):
  root, classes = small_folder
  dataset = _prepare(reader, root, tmp_path / "cache", rule=RULE)
  assert dataset.image_shape == (16, 16)
  keys = {name: set(dataset[name].keys.tolist()) for name in splits.SPLITS}
  assert sum(len(k) for k in keys.values()) == len(classes) == 120
  assert not (keys["train"] & keys["validation"]) and not (keys["train"] & keys["test"])
  assert not (keys["validation"] & keys["test"])
  for name in splits.SPLITS:
    split = dataset[name]
    assert all(RULE.split_of(k) == name for k in split.keys.tolist())
    assert split.images.dtype == np.float32 and split.images.shape[1:] == (16, 16)
    # Canonical order: by class, then file name.
    order = [(int(l), k.split("/")[1]) for l, k in zip(split.labels, split.keys.tolist())]
    assert order == sorted(order)
    for image, label, key in zip(split.images, split.labels, split.keys.tolist()):
      assert layout.CLASS_NAMES[label] == key.split("/")[0]
      assert classes[image_id((image - image.min()) / (image.max() - image.min()))] == \
          key.split("/")[0]
  assert 10 <= len(dataset["test"]) <= 40 and 10 <= len(dataset["validation"]) <= 40


def test_both_readers_give_identical_arrays(small_folder, tmp_path):
  root, _ = small_folder
  files = _prepare("files", root, tmp_path / "a", rule=RULE)
  tfds_ = _prepare("tfds", root, tmp_path / "b", rule=RULE)
  for name in splits.SPLITS:
    np.testing.assert_array_equal(files[name].images, tfds_[name].images)
    np.testing.assert_array_equal(files[name].labels, tfds_[name].labels)
    assert files[name].keys.tolist() == tfds_[name].keys.tolist()


@pytest.mark.parametrize("reader", READERS)
def test_splits_are_stable_when_files_are_added(reader, small_folder, tmp_path):
  root, _ = small_folder
  before = _prepare(reader, root, tmp_path / "cache", rule=RULE)
  write_folder(root, per_class=30, start=1000)
  after = _prepare(reader, root, tmp_path / "cache", rule=RULE)
  assert sum(len(after[n]) for n in splits.SPLITS) == 120 + 90
  for name in splits.SPLITS:
    assert set(before[name].keys.tolist()) <= set(after[name].keys.tolist()), \
        "an existing file moved between splits"


def test_raising_the_test_share_moves_files_from_train_only():
  keys = [f"cdm/cdm_sim_{i}.npy" for i in range(3000)]
  small, large = splits.SplitRule(0.1, 0.1), splits.SplitRule(0.1, 0.2)
  for k in keys:
    a, b = small.split_of(k), large.split_of(k)
    assert a == b or (a, b) == ("train", "test")


@pytest.mark.parametrize("reader", READERS)
def test_prepared_data_is_reused_until_the_folder_changes(reader, small_folder, tmp_path,
                                                          monkeypatch):
  root, _ = small_folder
  first = _prepare(reader, root, tmp_path / "cache")

  def no_scan(*args, **kwargs):
    raise AssertionError("rescanned an unchanged folder")

  monkeypatch.setattr(splits, "scan_source", no_scan)
  again = _prepare(reader, root, tmp_path / "cache")
  assert again.cache_dir == first.cache_dir
  np.testing.assert_array_equal(again["train"].images, first["train"].images)
  monkeypatch.undo()
  npy_io.write_lens_file(root / "cdm" / "cdm_sim_new.npy", np.random.rand(16, 16))
  changed = _prepare(reader, root, tmp_path / "cache")
  assert changed.cache_dir != first.cache_dir
  assert sum(len(changed[n]) for n in splits.SPLITS) == 121


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


@pytest.mark.parametrize("reader", READERS)
def test_bad_files_error_lists_every_file(reader, small_folder, tmp_path):
  root, _ = small_folder
  bad = _add_bad_files(root)
  with pytest.raises(errors.BadDataError) as info:
    _prepare(reader, root, tmp_path / "cache")
  message = str(info.value)
  assert f"{len(bad)} bad file(s)" in message
  for path, defect in bad.items():
    line = next(l for l in message.splitlines() if path in l)
    assert defect in line, line
  assert "on_bad_file=skip" in message


@pytest.mark.parametrize("reader", READERS)
def test_bad_files_skipped_and_reported(reader, small_folder, tmp_path):
  root, classes = small_folder
  bad = _add_bad_files(root)
  dataset = _prepare(reader, root, tmp_path / "cache", on_bad_file="skip")
  assert sorted(p for p, _ in dataset.bad_files) == sorted(bad)
  assert sum(len(dataset[n]) for n in splits.SPLITS) == len(classes)
  report = (dataset.cache_dir / splits.BAD_FILES_REPORT).read_text().splitlines()
  assert report[0] == "path\tdefect" and len(report) == 1 + len(bad)
  again = _prepare(reader, root, tmp_path / "cache", on_bad_file="skip")
  assert sorted(p for p, _ in again.bad_files) == sorted(bad)


def test_tfds_features_hold_axion_masses_and_file_names(small_folder, tmp_path):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from mae_jax.data import builder  # pylint: disable=g-import-not-at-top
  root, classes = small_folder
  prepared = builder.prepare(root, tmp_path / "cache", progress=False)
  info = prepared.builder.info
  assert info.features["image"].shape == (16, 16, 1)
  assert info.features["label"].names == list(layout.CLASS_NAMES)
  assert set(info.splits) == set(splits.SPLITS)
  for ex in tfds.as_numpy(prepared.builder.as_dataset(split="validation")):
    name = ex["file_name"].decode()
    cls = name.split("/")[0]
    assert layout.CLASS_NAMES[ex["label"]] == cls
    assert (ex["axion_mass"] > 0) == (cls == "axion")
    if cls != "axion":
      assert ex["axion_mass"] == layout.AXION_MASS_NONE
    assert classes[int(name.split("_")[-1].removesuffix(".npy"))] == cls


def test_missing_class_folder_explains_layout(tmp_path):
  (tmp_path / "src" / "no_sub").mkdir(parents=True)
  with pytest.raises(errors.LayoutError) as info:
    arrays.prepare(tmp_path / "src", tmp_path / "cache", progress=False)
  message = str(info.value)
  assert "lacks the class folder(s) cdm, axion" in message
  assert "python -m mae_jax.data.simulate" in message


def test_bad_settings_rejected(small_folder, tmp_path):
  root, _ = small_folder
  with pytest.raises(ValueError, match="on_bad_file"):
    arrays.prepare(root, tmp_path / "c", on_bad_file="ignore")
  with pytest.raises(ValueError, match="validation_fraction"):
    splits.SplitRule(validation_fraction=1.5)
  with pytest.raises(ValueError, match="leave some files for training"):
    splits.SplitRule(validation_fraction=0.5, test_fraction=0.5)


def test_hash_split_fractions_are_close_to_requested():
  keys = [f"cdm/cdm_sim_{i}.npy" for i in range(20000)]
  which = [RULE.split_of(k) for k in keys]
  assert abs(np.mean([w == "validation" for w in which]) - 0.2) < 0.01
  assert abs(np.mean([w == "test" for w in which]) - 0.2) < 0.01
