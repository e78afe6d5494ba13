"""Where a stage's metrics go.

Every stage writes `metrics.jsonl` (one JSON object per write: scalars with their
step, hparams, and the names of the images written) and logs its scalars. Beside
that, TensorBoard event files: through clu's writers when TensorFlow is installed,
otherwise through the `tensorboard` package alone (its event-file writer needs no
TensorFlow). Without either, a warning says that only `metrics.jsonl` is written;
metrics are never dropped silently. Only process 0 writes files.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from absl import logging
from matplotlib import image as mpl_image

from mae_jax.runtime import workdir as workdir_lib

try:  # TensorFlow-backed TensorBoard writer, where TensorFlow is installed.
  from clu import metric_writers as clu_writers
except ImportError:  # pragma: no cover - exercised by the TensorFlow-free test
  clu_writers = None
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
  """Logs scalars (absl), as clu's logging writer does."""

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    logging.info("[%d] %s", step, ", ".join(f"{k}={float(v):.6g}" for k, v in scalars.items()))

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


def create(workdir: str | Path, main_process: bool, tensorboard: str = "auto") -> MultiWriter:
  """The stage's writer: metrics.jsonl, logging, and TensorBoard events.

  `tensorboard`: 'clu' (TensorFlow's writer), 'events' (the tensorboard package),
  'auto' (clu if it imports, else the tensorboard package) or 'none'.
  """
  workdir = Path(workdir)
  if not main_process:
    return MultiWriter([])
  writers: list = [JsonLinesWriter(workdir)]
  kind = tensorboard
  if kind == "auto":
    kind = "clu" if clu_writers is not None else ("events" if EventFileWriter else "none")
  if kind == "clu":
    if clu_writers is None:
      raise ImportError("clu's writers need TensorFlow; use tensorboard='events'")
    writers.append(clu_writers.create_default_writer(str(workdir), asynchronous=True))
  else:
    writers.append(LoggingWriter())
    if kind == "events":
      writers.append(EventsWriter(workdir))
    elif tensorboard == "auto" and not _WARNED:   # 'none' asked for is no news
      _WARNED.append(True)
      logging.warning("neither TensorFlow nor the tensorboard package is installed: no "
                      "TensorBoard events are written; every metric is in %s",
                      workdir / workdir_lib.METRICS_FILE)
  return MultiWriter(writers)
