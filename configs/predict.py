"""Classify new images with the best fine-tuned checkpoint.

  python main.py --config=configs/predict.py --workdir=runs/predict \
      --config.input=/path/to/npy_folder [--config.model_dir=runs/pipeline_demo]

`input` is a folder of `.npy` files, flat or in the DeepLense layout (`no_sub/`,
`cdm/`, `axion/`: then the true labels are known and metrics are written too),
or one `.npy` file. `model_dir` is a fine-tune workdir, or a pipeline workdir
(its `finetune/` is used). The workdir receives `predictions.csv`, the files that
could not be read (`bad_files.tsv`), and with known labels `metrics.json` and
`plots/roc.png`. `configs/predict.py:PRESET` defaults `model_dir` to
`runs/pipeline_PRESET`.
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  preset, _ = common.parse(arg)
  config = ml_collections.ConfigDict()
  config.stage = "predict"
  config.preset = preset
  config.input = ""                              # a folder of .npy files, or one file
  config.model_dir = f"runs/pipeline_{preset}"   # a fine-tune or pipeline workdir
  config.batch_size = 256                        # images per forward pass
  return config
