"""The typed results record: what a classifier stage writes as eval_metrics.json and
every reader reads back, across schema versions."""

from __future__ import annotations

import json

import pytest

from mae_jax.eval import results
from mae_jax.runtime import workdir as workdir_lib


def _scores(macro: float, n: int = 30) -> results.Scores:
  return results.Scores({"macro_auc": macro, "micro_auc": macro - 0.01, "accuracy": 0.5,
                         "auc": {"no_sub": macro, "cdm": macro, "axion": macro}}, n,
                        {"macro_auc": [macro - 0.05, macro + 0.04], "resamples": 10,
                         "level": 0.95})


def _record(**overrides) -> results.EvalRecord:
  fields = dict(
      stage="finetune", split="test", chosen=results.Epoch(_scores(0.9), 3, 30),
      final=results.Epoch(_scores(0.85), 4, 40), select_by="macro_auc",
      validation={"macro_auc": 0.88, "auc_cdm": 0.8},
      baseline=results.Baseline(_scores(0.6), "radial", 22, 120, 0.61),
      labels_per_class=40, train_examples=120, validation_examples=30, test_examples=30,
      features=None, feed="device")
  fields.update(overrides)
  return results.EvalRecord(**fields)


def test_a_record_round_trips_through_its_file(tmp_path):
  record = _record()
  record.write(tmp_path)
  data = json.loads((tmp_path / workdir_lib.EVAL_FILE).read_text())
  # The test numbers sit at the top level, as in every version of the file.
  assert data["macro_auc"] == 0.9 and data["intervals"]["macro_auc"] == pytest.approx([0.85, 0.94])
  assert data["schema_version"] == results.SCHEMA_VERSION and data["select_by"] == "macro_auc"
  assert data["baseline"]["num_train"] == 120 and data["final_epoch"]["epoch"] == 4
  assert data["margin_over_baseline"] == pytest.approx(
      {"macro_auc": 0.3, "micro_auc": 0.3, "accuracy": 0.0})
  assert results.read(tmp_path) == record


def test_a_file_written_before_the_schema_version_reads_the_same(tmp_path):
  data = _record().to_json()
  for key in ("schema_version", "stage", "select_by"):
    del data[key]
  data["chosen_by"] = "validation macro AUC"
  (tmp_path / workdir_lib.EVAL_FILE).write_text(json.dumps(data))
  assert results.read(tmp_path, "finetune") == _record()


def test_a_newer_schema_is_refused_with_what_to_do(tmp_path):
  data = {**_record().to_json(), "schema_version": results.SCHEMA_VERSION + 1}
  (tmp_path / workdir_lib.EVAL_FILE).write_text(json.dumps(data))
  with pytest.raises(ValueError, match="update mae_jax"):
    results.read(tmp_path)


def test_no_baseline_no_margin():
  record = _record(baseline=None)
  assert record.margin_over_baseline() is None
  assert record.to_json()["baseline"] is None
  assert results.EvalRecord.from_json(record.to_json()) == record
