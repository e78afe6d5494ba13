"""The typed results of a classifier stage, written as `eval_metrics.json`.

One record (`EvalRecord`, with a schema version) is what the probe and fine-tune stages
write, and what `predict`, the pipeline's report, the study and the research scripts
read: nobody guesses the file's shape. Its JSON keeps the test split's numbers at the top
level (`macro_auc`, `auc`, `intervals`, ...), as every version of the file has, so
`jq .macro_auc` and older readers keep working.

Schema versions: 0 is the file before it had a version (the same layout, without
`schema_version`, `stage` and `select_by`); 1 adds them. `read` takes both.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from mae_jax.runtime import fileio
from mae_jax.runtime import workdir as workdir_lib

SCHEMA_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Scores:
  """Named metrics of one model on one split (`evaluators.evaluate` makes them).

  `values`: metric name -> a number, a per-class dict or a matrix; `intervals`: the
  bootstrap interval of each metric that has one (plus `resamples` and `level`), or None.
  """
  values: dict[str, Any]
  num_examples: int
  intervals: dict[str, Any] | None = None

  def __getitem__(self, name: str) -> Any:
    return self.values[name]

  def get(self, name: str, default: Any = None) -> Any:
    return self.values.get(name, default)

  def interval(self, name: str) -> list[float] | None:
    return (self.intervals or {}).get(name)

  def to_json(self) -> dict[str, Any]:
    out = {**self.values, "num_examples": self.num_examples}
    if self.intervals is not None:
      out["intervals"] = self.intervals
    return out

  @classmethod
  def from_json(cls, data: dict[str, Any], context: tuple[str, ...] = ()) -> "Scores":
    """From `to_json`'s dict, leaving out the keys `context` names (its container's)."""
    values = {k: v for k, v in data.items()
              if k not in ("num_examples", "intervals", *context)}
    return cls(values=values, num_examples=int(data.get("num_examples", 0)),
               intervals=data.get("intervals"))


@dataclasses.dataclass(frozen=True)
class Baseline:
  """A non-deep baseline fitted on the same labelled images, scored on the same split."""
  scores: Scores
  description: str
  features: int
  train_examples: int
  validation_macro_auc: float | None

  _KEYS = ("description", "features", "num_train", "validation_macro_auc")

  def to_json(self) -> dict[str, Any]:
    return {**self.scores.to_json(), "description": self.description, "features": self.features,
            "num_train": self.train_examples, "validation_macro_auc": self.validation_macro_auc}

  @classmethod
  def from_json(cls, data: dict[str, Any]) -> "Baseline":
    return cls(scores=Scores.from_json(data, cls._KEYS), description=data.get("description", ""),
               features=int(data.get("features", 0)), train_examples=int(data.get("num_train", 0)),
               validation_macro_auc=data.get("validation_macro_auc"))


@dataclasses.dataclass(frozen=True)
class Epoch:
  """Scores of the model at one epoch (and step)."""
  scores: Scores
  epoch: int | None
  step: int | None

  def to_json(self) -> dict[str, Any]:
    return {**self.scores.to_json(), "epoch": self.epoch, "step": self.step}

  @classmethod
  def from_json(cls, data: dict[str, Any]) -> "Epoch":
    return cls(Scores.from_json(data, ("epoch", "step")), data.get("epoch"), data.get("step"))


@dataclasses.dataclass(frozen=True)
class EvalRecord:
  """A probe's or fine-tune's evaluation: the test split scored once, for the epoch the
  validation metric `select_by` chose (`chosen`) and for the last one (`final`)."""
  stage: str
  split: str
  chosen: Epoch
  final: Epoch | None              # None only in files that did not record it
  select_by: str                   # the validation metric that chose the epoch
  validation: dict[str, Any]       # the chosen epoch's validation numbers
  baseline: Baseline | None
  labels_per_class: int
  train_examples: int
  validation_examples: int
  test_examples: int
  features: str | None = None      # a probe's frozen feature, chosen on validation
  feed: str = ""
  schema_version: int = SCHEMA_VERSION

  _KEYS = ("schema_version", "stage", "split", "epoch", "step", "chosen_by", "select_by",
           "validation", "final_epoch", "baseline", "margin_over_baseline", "labels_per_class",
           "train_examples", "validation_examples", "test_examples", "features", "feed")

  @property
  def test(self) -> Scores:
    """The test scores of the chosen epoch."""
    return self.chosen.scores

  def margin_over_baseline(self) -> dict[str, float | None] | None:
    """The model's lead over the baseline in each number both have (None if undefined)."""
    if self.baseline is None:
      return None
    out = {}
    for key in ("macro_auc", "micro_auc", "accuracy"):
      a, b = self.test.get(key), self.baseline.scores.get(key)
      out[key] = None if a is None or b is None else float(a - b)
    return out

  def to_json(self) -> dict[str, Any]:
    return {
        "schema_version": self.schema_version, "stage": self.stage, "split": self.split,
        **self.chosen.to_json(), "chosen_by": f"validation {self.select_by}",
        "select_by": self.select_by, "validation": self.validation,
        "final_epoch": self.final.to_json() if self.final else None,
        "baseline": self.baseline.to_json() if self.baseline else None,
        "margin_over_baseline": self.margin_over_baseline(),
        "labels_per_class": self.labels_per_class, "train_examples": self.train_examples,
        "validation_examples": self.validation_examples, "test_examples": self.test_examples,
        "features": self.features, "feed": self.feed}

  @classmethod
  def from_json(cls, data: dict[str, Any], stage: str = "") -> "EvalRecord":
    """From `to_json`'s dict, or a schema-0 file (its stage given by the caller)."""
    version = int(data.get("schema_version", 0))
    if version > SCHEMA_VERSION:
      raise ValueError(f"eval_metrics.json has schema version {version}; this mae_jax reads "
                       f"up to {SCHEMA_VERSION}: update mae_jax")
    chosen = Epoch(Scores.from_json(data, cls._KEYS), data.get("epoch"), data.get("step"))
    return cls(
        stage=data.get("stage", stage), split=data.get("split", "test"), chosen=chosen,
        final=Epoch.from_json(data["final_epoch"]) if data.get("final_epoch") else None,
        select_by=data.get("select_by", "macro_auc"), validation=data.get("validation") or {},
        baseline=Baseline.from_json(data["baseline"]) if data.get("baseline") else None,
        labels_per_class=int(data.get("labels_per_class", 0)),
        train_examples=int(data.get("train_examples", data.get("num_train", 0))),
        validation_examples=int(data.get("validation_examples", 0)),
        test_examples=int(data.get("test_examples", chosen.scores.num_examples)),
        features=data.get("features"), feed=data.get("feed", ""), schema_version=SCHEMA_VERSION)

  def write(self, workdir: str | Path) -> Path:
    path = Path(workdir) / workdir_lib.EVAL_FILE
    fileio.write_json_atomic(path, self.to_json())
    return path


def exists(workdir: str | Path) -> bool:
  return (Path(workdir) / workdir_lib.EVAL_FILE).exists()


def read(workdir: str | Path, stage: str = "") -> EvalRecord:
  """The `EvalRecord` a stage wrote in `workdir` (any schema version).

  Raises:
    FileNotFoundError: the workdir has no eval_metrics.json (the stage has not finished).
    ValueError: the file was written by a newer mae_jax.
  """
  return EvalRecord.from_json(fileio.read_json(Path(workdir) / workdir_lib.EVAL_FILE), stage)
