"""Watching the representation during pretraining: a cheap few-shot probe of the frozen
encoder's features, every `probe_every_epochs` epochs.

The reconstruction loss says little about the features (the high-pass target's loss is
lower for reasons unrelated to the classes, docs/training.md), so the pretraining also
scores them: `probe_shots` labelled training images of each class and
`probe_validation` validation images of each class go through the frozen encoder; every
candidate feature (each block's tokens, CLS or mean-pooled: the probe stage's candidates)
is scored by the same standardised logistic regression as the radial-profile baseline,
fitted on the few shots and evaluated on the validation images (macro AUC). The score is
the best candidate's. Labels are read only here, to watch; the MAE never trains on them,
and the test split is never read.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from mae_jax.data import arrays
from mae_jax.data import layout
from mae_jax.eval import features
from mae_jax.runtime import errors

# The history record's keys.
SCORE = "probe_auc"
FEATURE = "probe_feature"


@dataclasses.dataclass(frozen=True)
class Settings:
  """The pretraining config's probe keys."""
  every_epochs: int     # score every N epochs (and after the last); 0: off
  shots: int            # labelled training images per class
  validation: int       # validation images per class

  @classmethod
  def from_config(cls, config: Any) -> "Settings":
    return cls(every_epochs=int(config.probe_every_epochs), shots=int(config.probe_shots),
               validation=int(config.probe_validation))

  @property
  def enabled(self) -> bool:
    return self.every_epochs > 0

  def due(self, epoch: int, total_epochs: int) -> bool:
    """Whether the probe scores after 0-based `epoch` (every N epochs and after the last)."""
    return self.enabled and ((epoch + 1) % self.every_epochs == 0 or epoch + 1 == total_epochs)


def problems(config: Any) -> list[str]:
  """Problems of the probe keys of a pretraining config."""
  found = []
  if "probe_every_epochs" in config:
    for key, least in (("probe_every_epochs", 0), ("probe_shots", 2), ("probe_validation", 2)):
      value = config.get(key)
      if not isinstance(value, int) or isinstance(value, bool) or value < least:
        found.append(f"{key}={value!r} must be a whole number >= {least}"
                     + (" (0: no online probe)" if least == 0 else ""))
  return found


def _balanced(split: arrays.Split, per_class: int, seed: int, what: str) -> arrays.Split:
  """`per_class` images of each class of `split` (all of a class that has fewer)."""
  rng = np.random.default_rng([seed, 0x0b5e])
  chosen = []
  for label, name in enumerate(layout.CLASS_NAMES):
    members = np.flatnonzero(split.labels == label)
    if len(members) < 2:
      raise errors.InsufficientDataError(
          f"the {split.name} split holds {len(members)} {name} image(s), fewer than the 2 "
          f"{what} images of every class the online probe needs")
    chosen.append(rng.choice(members, min(per_class, len(members)), replace=False))
  return split.take(np.sort(np.concatenate(chosen)))


def labelled_sets(train: arrays.Split, validation: arrays.Split, settings: Settings,
                  seed: int) -> tuple[arrays.Split, arrays.Split]:
  """(the few shots from `train`, the scored images from `validation`), seeded."""
  return (_balanced(train, settings.shots, seed, "labelled training"),
          _balanced(validation, settings.validation, seed, "validation"))


def score(bank: dict[str, np.ndarray], labels: np.ndarray, num_shots: int) -> dict[str, Any]:
  """{SCORE: the best candidate's validation macro AUC, FEATURE: its name} of a feature
  bank whose first `num_shots` rows are the labelled shots and the rest the validation
  images, in the order of `labels`."""
  shots = {name: f[:num_shots] for name, f in bank.items()}
  scored = {name: f[num_shots:] for name, f in bank.items()}
  scores = features.score_candidates(shots, labels[:num_shots], scored, labels[num_shots:])
  best = features.choose(scores)
  return {SCORE: scores[best], FEATURE: best}
