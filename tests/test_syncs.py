"""The host's waits on the device (syncs) are counted per epoch and bounded: a short
accelerator epoch must not end in a queue of blocking fetches."""

from __future__ import annotations

import json

import jax
import numpy as np

from configs import pretrain as pretrain_config
from mae_jax.runtime import syncs
from mae_jax.stages import pretrain as pretrain_stage
from mae_jax.train import loop
from mae_jax.train import optim
from tests.conftest import write_folder


def test_fetch_counts_by_kind():
  before = syncs.snapshot()
  assert syncs.fetch({"a": jax.numpy.ones(2)}, "metrics")["a"].tolist() == [1.0, 1.0]
  syncs.note("checkpoint save")
  assert syncs.since(before) == {"metrics": 1, "checkpoint save": 1}


def test_logged_learning_rate_is_computed_on_the_host():
  schedule = optim.warmup_cosine(1e-3, total_steps=100, warmup_steps=10)
  for step in (0, 5, 10, 50, 99):
    np.testing.assert_allclose(loop.host_lr(schedule, step), float(schedule(step)), rtol=1e-6)


def test_pretraining_epochs_record_their_syncs_and_stay_within_the_bound(tmp_path):
  """One chunk per epoch; validation, checkpoints every 2 epochs, figures at the end.
  Each epoch waits once for its metrics; validation adds one, a checkpoint two (the finite
  check and orbax's copy, counted in the next epoch's record), the figures two."""
  write_folder(tmp_path / "src", per_class=16, size=64)
  config = pretrain_config.get_config("tiny")
  config.data.dir, config.data.source = str(tmp_path / "src"), "deeplense"
  config.data.cache_dir = str(tmp_path / "cache")
  config.phase_epochs, config.log_every_steps, config.steps_per_call = (2, 2), 100, 10
  config.eval_every_epochs = config.checkpoint_every_epochs = 2
  config.plot_every_epochs = 4
  config.probe_every_epochs = 0   # its pass is one more sync (tests/test_online_probe.py)
  config.tensorboard = "none"
  pretrain_stage.run(config, str(tmp_path / "run"))
  history = json.loads((tmp_path / "run" / "history.json").read_text())
  assert [h["host_syncs"] for h in history] == [1, 2, 3, 4]
  assert ["val_loss" in h for h in history] == [False, True, False, True]
