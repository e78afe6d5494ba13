"""The stage's metric writers: metrics.jsonl always, and a warning only where TensorBoard
events were wanted ('auto') but nothing can write them."""

from __future__ import annotations

import json
import logging

import pytest

from mae_jax.stages import writers


@pytest.fixture(name="fresh_warning")
def _fresh_warning(monkeypatch):
  monkeypatch.setattr(writers, "_WARNED", [])


def _warnings(caplog) -> list[str]:
  return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_auto_without_any_event_writer_warns_once(tmp_path, monkeypatch, caplog, fresh_warning):
  monkeypatch.setattr(writers, "_clu", lambda: None)
  monkeypatch.setattr(writers, "EventFileWriter", None)
  with caplog.at_level(logging.WARNING):
    writers.create(tmp_path / "a", True).write_scalars(3, {"loss": 0.5})
    writers.create(tmp_path / "b", True)
  said = _warnings(caplog)
  assert len(said) == 1 and "no TensorBoard events" in said[0], said
  record = json.loads((tmp_path / "a" / "metrics.jsonl").read_text())
  assert record["step"] == 3 and record["scalars"] == {"loss": 0.5}


def test_none_asked_for_writes_metrics_without_a_warning(tmp_path, caplog, fresh_warning):
  with caplog.at_level(logging.WARNING):
    writers.create(tmp_path, True, tensorboard="none").write_scalars(1, {"loss": 1.0})
  assert not _warnings(caplog)
  assert (tmp_path / "metrics.jsonl").exists()
  assert not list(tmp_path.glob("events.out.tfevents*"))


def test_auto_writes_events_without_importing_tensorflow_and_keeps_scalars_off_the_console(
    tmp_path, caplog):
  """'auto' writes TensorBoard event files through the tensorboard package's own file API:
  TensorFlow is not imported (a second of start-up and its log noise); the per-step
  scalars go to metrics.jsonl and the events, and to the log only at verbosity 1."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  script = ("import sys; from mae_jax.stages import writers; "
            f"w = writers.create({str(tmp_path)!r}, True); w.write_scalars(1, {{'loss': 0.5}}); "
            "w.flush(); w.close(); print('tensorflow' in sys.modules)")
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       check=True, timeout=120)
  assert out.stdout.strip() == "False", out.stderr[-2000:]
  assert list(tmp_path.glob("events.out.tfevents*"))
  with caplog.at_level(logging.INFO):
    writers.create(tmp_path / "quiet", True, tensorboard="none").write_scalars(2, {"lr": 1.0})
  assert not [r for r in caplog.records if "lr=" in r.getMessage()]
