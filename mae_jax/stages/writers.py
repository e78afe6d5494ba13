"""Where a stage's metrics go.

Every stage writes `metrics.jsonl` (one JSON object per write: scalars with their
step, hparams, and the names of the images written) and TensorBoard event files, through
the `tensorboard` package (its event-file writer needs no TensorFlow), or with
`tensorboard='clu'` through clu's writers (TensorFlow, imported only then). The console
shows none of the per-step scalars (the stage's progress bar has the loss and the last
validation score); absl's `-v 1` logs them too. Without a TensorBoard writer, a warning
says that only `metrics.jsonl` is written; metrics are never dropped silently. Only
process 0 writes files.
"""

from __future__ import annotations

import io
import json
import sys
import time
import types
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from absl import logging
from matplotlib import image as mpl_image

from mae_jax.runtime import workdir as workdir_lib

# tensorboard's event writer uses TensorFlow's file API where TensorFlow imports (a second
# of import and its log noise in every process), its own stub where the marker module
# tensorboard.compat.notf exists: the stub writes the same event files.
sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))
try:  # Event files without TensorFlow (what torch.utils.tensorboard uses too).
  from tensorboard.compat.proto import event_pb2
  from tensorboard.compat.proto import summary_pb2
  from tensorboard.summary.writer.event_file_writer import EventFileWriter
except ImportError:  # pragma: no cover
  EventFileWriter = None



def _jsonable(value: Any) -> Any:
  if isinstance(value, (np.generic, np.ndarray)):
    return value.tolist()
  if isinstance(value, (int, float, str, bool)) or value is None:
    return value
  return str(value)


class JsonLinesWriter:
  """Appends every write to `<workdir>/metrics.jsonl`, flushed at each write."""

  def __init__(self, workdir: Path):
    self.path = Path(workdir) / workdir_lib.METRICS_FILE
    self.path.parent.mkdir(parents=True, exist_ok=True)

  def _append(self, record: dict) -> None:
    with open(self.path, "a", encoding="utf-8") as f:
      f.write(json.dumps(record) + "\n")

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    self._append({"step": int(step), "time": round(time.time(), 3),
                  "scalars": {k: _jsonable(v) for k, v in scalars.items()}})

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    self._append({"step": int(step), "images": sorted(images)})

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    self._append({"hparams": {k: _jsonable(v) for k, v in hparams.items()}})

  def flush(self) -> None:
    pass

  def close(self) -> None:
    pass


class EventsWriter:
  """TensorBoard scalars and images through the `tensorboard` package, without TensorFlow."""

  def __init__(self, workdir: Path):
    self._writer = EventFileWriter(str(workdir))

  def _add(self, step: int, values: list) -> None:
    self._writer.add_event(event_pb2.Event(summary=summary_pb2.Summary(value=values),
                                           step=int(step), wall_time=time.time()))

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    self._add(step, [summary_pb2.Summary.Value(tag=k, simple_value=float(v))
                     for k, v in scalars.items()])

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    values = []
    for tag, array in images.items():
      array = np.asarray(array)
      array = array[0] if array.ndim == 4 else array
      buffer = io.BytesIO()
      mpl_image.imsave(buffer, array.squeeze(), format="png")
      image = summary_pb2.Summary.Image(height=array.shape[0], width=array.shape[1],
                                        colorspace=4, encoded_image_string=buffer.getvalue())
      values.append(summary_pb2.Summary.Value(tag=tag, image=image))
    self._add(step, values)

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    del hparams  # kept in metrics.jsonl and config.json

  def flush(self) -> None:
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


class LoggingWriter:
  """Logs scalars at absl verbosity 1 (`-v 1`), as clu's logging writer does at INFO."""

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    logging.vlog(1, "[%d] %s", step, ", ".join(f"{k}={float(v):.6g}" for k, v in scalars.items()))

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    del step, images

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    del hparams

  def flush(self) -> None:
    pass

  def close(self) -> None:
    pass


class MultiWriter:
  """Sends every write to each of `writers`."""

  def __init__(self, writers: list):
    self.writers = writers

  def write_scalars(self, step, scalars):
    for w in self.writers:
      w.write_scalars(step, scalars)

  def write_images(self, step, images):
    for w in self.writers:
      w.write_images(step, images)

  def write_hparams(self, hparams):
    for w in self.writers:
      w.write_hparams(hparams)

  def flush(self):
    for w in self.writers:
      w.flush()

  def close(self):
    for w in self.writers:
      w.close()


_WARNED = []


def _clu() -> Any:
  """clu's metric writers, imported only where asked for: they import TensorFlow."""
  try:
    from clu import metric_writers  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return metric_writers


def create(workdir: str | Path, main_process: bool, tensorboard: str = "auto") -> MultiWriter:
  """The stage's writer: metrics.jsonl, logging at verbosity 1, and TensorBoard events.

  `tensorboard`: 'events' (the tensorboard package), 'clu' (clu's writer: TensorFlow),
  'auto' (the tensorboard package, else clu where it imports) or 'none'.
  """
  workdir = Path(workdir)
  if not main_process:
    return MultiWriter([])
  writers: list = [JsonLinesWriter(workdir), LoggingWriter()]
  kind = tensorboard
  if kind == "auto":
    kind = "events" if EventFileWriter else ("clu" if _clu() is not None else "none")
  if kind == "clu":
    clu_writers = _clu()
    if clu_writers is None:
      raise ImportError("clu's writers need TensorFlow; use tensorboard='events'")
    writers.append(clu_writers.AsyncWriter(clu_writers.SummaryWriter(str(workdir))))
  elif kind == "events":
    writers.append(EventsWriter(workdir))
  elif tensorboard == "auto" and not _WARNED:   # 'none' asked for is no news
    _WARNED.append(True)
    logging.warning("neither TensorFlow nor the tensorboard package is installed: no "
                    "TensorBoard events are written; every metric is in %s",
                    workdir / workdir_lib.METRICS_FILE)
  return MultiWriter(writers)
