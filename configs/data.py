"""Prepare and inspect a dataset: simulate it if needed, build the tfds cache, write a
summary and a figure of sample images.

  python main.py --config=configs/data.py:demo --workdir=runs/data_demo
  python main.py --config=configs/data.py --config.data.source=deeplense \
      --config.data.dir=/path/to/model_ii --workdir=runs/data_real
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  preset, _ = common.parse(arg)
  config = ml_collections.ConfigDict()
  config.stage = "data"
  config.preset = preset
  config.data = common.data_config(preset)
  config.samples_per_class = 6       # images per class in plots/samples.png
  config.batch_size = 256            # batch of the throughput check
  return common.apply_preset(config, preset, {})
