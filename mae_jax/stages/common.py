"""What the training stages share: their data and their metric writer."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import jax
import ml_collections
from clu import metric_writers

from mae_jax.data import input_pipeline
from mae_jax.data import source
from mae_jax.train import loop


def input_pipelines(config: ml_collections.ConfigDict, classes: Sequence[str]) -> tuple:
  """(prepared data, train pipeline, validation pipeline) of this process.

  Raises:
    ValueError: the data's images are not the model's size, or a split holds no image
      of `classes` for some process.
  """
  prepared = source.load(config.data, progress=loop.is_main_process())
  if tuple(prepared.image_shape) != (config.model.image_size,) * 2:
    raise ValueError(f"the data's images are {prepared.image_shape}, but "
                     f"model.image_size={config.model.image_size}")
  read = dict(classes=classes, process_index=jax.process_index(),
              process_count=jax.process_count(), cache=config.data.cache_in_memory)
  pipes = [input_pipeline.InputPipeline(prepared.builder, split, **read)
           for split in ("train", "validation")]
  for ip in pipes:
    if loop.agree_min(ip.num_examples) == 0:
      raise ValueError(f"the {ip.split} split holds no image of {list(classes)} for some process "
                       f"({config.data.dir}); add images or raise data.validation_fraction")
  return (prepared, *pipes)


def metric_writer(workdir: Path) -> loop.MetricWriter:
  """clu's default writer (TensorBoard events and logs; process 0 only writes files)."""
  return metric_writers.create_default_writer(str(workdir), just_logging=not loop.is_main_process(),
                                              asynchronous=True)
