"""The `pipeline` stage (data -> pretrain -> probe -> fine-tune -> report) and its report."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from configs import pipeline as pipeline_config
from mae_jax.eval import plots
from mae_jax.eval import results
from mae_jax.runtime import fileio
from mae_jax.runtime import workdir as workdir_lib
from mae_jax.stages import pipeline
from mae_jax.stages import report
from mae_jax.stages import runs as runs_lib
from mae_jax.stages import validate

ROOT = Path(__file__).resolve().parents[1]


def _main(*args: str) -> subprocess.CompletedProcess:
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
  return subprocess.run([sys.executable, str(ROOT / "main.py"), *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)


# --- Stage configs and completion --------------------------------------------------------


def test_stage_configs_share_data_and_chain_the_workdirs(tmp_path):
  config = pipeline_config.get_config("tiny")
  config.data.dir = "somewhere"
  config.probe.epochs = 3
  stages = pipeline.stage_configs(config, tmp_path / "run")
  assert list(stages) == ["data", "pretrain", "probe", "finetune"]
  assert all(s.data.dir == "somewhere" and s.preset == "tiny" for s in stages.values())
  assert stages["probe"].epochs == 3 and stages["probe"].eval_batch_size == 8
  assert stages["probe"].init_from == str(tmp_path / "run" / "pretrain")
  assert stages["finetune"].init_from == str(tmp_path / "run" / "pretrain")
  # Every stage config has exactly its stock config's keys (so it is a valid stage config).
  for name, stage in stages.items():
    stock = validate.reference_config(name, "tiny")
    assert set(validate.flat_keys(stage)) == set(validate.flat_keys(stock)), name

  config.finetune_from = "probe"
  config.stages = ("probe", "finetune")
  stages = pipeline.stage_configs(config, "w")
  assert list(stages) == ["probe", "finetune"]
  assert stages["finetune"].init_from == str(Path("w") / "probe")
  assert stages["finetune"].init_from_stage == "probe"
  config.stages = ("pretrain", "report")
  with pytest.raises(ValueError, match="choose among"):
    pipeline.stage_configs(config, "w")


def test_incomplete_reason(tmp_path):
  config = pipeline_config.get_config("tiny")
  stages = pipeline.stage_configs(config, tmp_path)
  probe, d = stages["probe"], tmp_path / "probe"
  d.mkdir()
  as_run = json.loads(json.dumps(probe.to_dict()))
  record = {"complete": True, "config": as_run, "step": None}
  assert runs_lib.incomplete_reason("probe", d, probe, None) == "not run yet"
  assert "did not finish" in runs_lib.incomplete_reason("probe", d, probe,
                                                        {**record, "complete": False})
  assert "eval_metrics.json is missing" in runs_lib.incomplete_reason("probe", d, probe, record)
  (d / "eval_metrics.json").write_text("{}")
  assert runs_lib.incomplete_reason("probe", d, probe, record) is None
  # The pipeline's own workdir, given another way, does not count as a change ...
  moved = {**record, "config": {**as_run, "init_from": "/elsewhere/pretrain"}}
  assert runs_lib.incomplete_reason("probe", d, probe, moved) is None
  # ... a real setting does, and so does a checkpoint other than the one it finished at.
  changed = {**record, "config": {**as_run, "epochs": as_run["epochs"] + 1}}
  assert "config changed" in runs_lib.incomplete_reason("probe", d, probe, changed)
  assert "latest checkpoint" in runs_lib.incomplete_reason("probe", d, probe,
                                                           {**record, "step": 12})


# --- The report from known files --------------------------------------------------------


def _metrics(micro, macro, aucs, accuracy, **extra):
  return {"auc": dict(zip(("no_sub", "cdm", "axion"), aucs)), "micro_auc": micro,
          "macro_auc": macro, "accuracy": accuracy, "confusion_matrix": [[1, 0, 0]] * 3,
          "num_examples": 321, "step": 40, "epoch": 4, "split": "test",
          "intervals": {"macro_auc": [macro - 0.02, macro + 0.015]}, **extra}


def _record(name, seconds, step=None, source=None, complete=True):
  hw = {"backend": "cpu", "devices": "1 x cpu", "cpu": "Test CPU", "cpu_cores": 2,
        "memory_gib": 8.0, "load_average_1m": 1.5, "host": "h", "python": "3.11", "jax": "0"}
  return {"stage": name, "complete": complete, "config": {}, "step": step, "source": source,
          "runs": [{"seconds": s, "finished": True, "hardware": hw, "load_average_1m_end": 2.0,
                    "compute_dtype": "float32"} for s in seconds]}


def test_report_shows_the_stages_numbers_figures_and_baseline(tmp_path):
  run = tmp_path / "run"
  for name in ("pretrain", "probe", "finetune"):
    (run / name).mkdir(parents=True)
  baseline = _metrics(0.9, 0.88, (0.95, 0.8, 0.89), 0.7, description="radial profile + LR")
  probe = _metrics(0.6123456, 0.55, (0.61, 0.52, 0.52), 0.41)
  fine = _metrics(0.93456, 0.91234, (0.97, 0.85, 0.92), 0.78, baseline=baseline,
                  final_epoch=_metrics(0.92, 0.9, (0.96, 0.84, 0.9), 0.75, epoch=7))
  for name, m in (("probe", probe), ("finetune", fine)):
    fileio.write_json_atomic(run / name / "eval_metrics.json", m)
    plots.confusion(m["confusion_matrix"], ("no_sub", "cdm", "axion"),
                    run / name / "plots" / "confusion.png")
  for fig in ("pretrain/plots/loss_curve.png", "finetune/plots/extra_fig.png"):
    plots.loss_curves([{"epoch": 1, "train_loss": 1.0}], run / fig)
  fileio.write_json_atomic(run / "pretrain" / "pretrain_summary.json",
                           {"epochs": 60, "steps": 840, "final_train_loss": 0.08,
                            "final_val_loss": 0.077})
  fileio.write_json_atomic(run / "pretrain" / workdir_lib.STAGE_RECORD,
                           _record("pretrain", [100.0, 162.5], step=900))
  fileio.write_json_atomic(run / "probe" / workdir_lib.STAGE_RECORD,
                           _record("probe", [61.0], step=40,
                                   source={"stage": "pretrain", "step": 840}))
  fileio.write_json_atomic(run / "finetune" / workdir_lib.STAGE_RECORD,
                           _record("finetune", [30.0], step=40, complete=False,
                                   source={"stage": "pretrain", "step": 900}))
  config = pipeline_config.get_config("demo")
  config.probe.epochs = 7
  paths = report.write(run, config, pipeline.stage_configs(config, run))

  md = paths["markdown"].read_text()
  assert "| **linear probe** (epoch 4, chosen on validation macro AUC) | 321 | 0.6123 | 0.5500 [0.5300, " \
         "0.5650] | 0.6100 | 0.5200 | 0.5200 | 0.4100 |" in md
  assert "| **fine-tune** (epoch 4, chosen on validation macro AUC) | 321 | 0.9346 | 0.9123 [0.8923, " \
         "0.9273] | 0.9700 | 0.8500 | 0.9200 | 0.7800 |" in md
  assert "| fine-tune, last epoch (7) | 321 | 0.9200 | 0.9000 [0.8800, 0.9150] |" in md
  assert "| fine-tune, seed study (published, real data) |  | 0.97 |  | 1.00 | 0.94 | 0.96 | " \
         "0.87 |" in md
  assert "| baseline (same labelled images, same test split) | 321 | 0.9000 | 0.8800 [" in md
  assert "fine-tune: test micro AUC 0.9346 against the seed's 0.97 (-0.0354); margin over the " \
         "baseline: macro AUC +0.0323, micro AUC +0.0346." in md
  assert "The baseline: radial profile + LR." in md
  assert "| MAE pretraining | complete | 4 min 22 s | 2 | 1 x cpu | float32 | 1.5 → 2.0 |" in md
  assert "| **total** |  | 5 min 54 s |" in md
  assert "probe was started from pretrain step 840, but pretrain now ends at step 900" in md
  assert "finetune is not complete" in md
  assert "probe.epochs = 7" in md and "pretrain.phase_epochs = (7, 13)" in md
  figures = re.findall(r"!\[[^]]*\]\(([^)]+)\)", md)
  assert figures == ["figures.png", "pretrain/plots/loss_curve.png", "probe/plots/confusion.png",
                     "finetune/plots/confusion.png", "finetune/plots/extra_fig.png"]
  assert all((run / f).exists() for f in figures)

  page = paths["html"].read_text()
  images = re.findall(r'<img [^>]*src="([^"]*)"', page)
  assert len(images) == len(figures)
  assert all(src.startswith("data:image/png;base64,") for src in images)
  assert not re.search(r'(src|href)="(?!data:)', page)  # nothing to fetch: opens offline
  data = json.loads(paths["json"].read_text())
  assert results.EvalRecord.from_json(data["records"]["finetune"]) == results.read(
      run / "finetune", "finetune")
  assert data["records"]["finetune"]["macro_auc"] == fine["macro_auc"]
  assert data["stages"]["pretrain"]["seconds"] == 262.5


# --- End to end --------------------------------------------------------------------------


def _hf_checkpoint(path: Path) -> Path | None:
  """A random 3-channel 32x32 Hugging Face ViTMAE with the tiny preset's widths, on disk
  (None without transformers): the tiny MAE is 1-channel 64x64, another grid."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  torch.manual_seed(0)
  transformers.ViTMAEForPreTraining(transformers.ViTMAEConfig(
      image_size=32, patch_size=16, num_channels=3, hidden_size=32, num_hidden_layers=2,
      num_attention_heads=2, intermediate_size=128, decoder_hidden_size=16,
      decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
      decoder_intermediate_size=64, layer_norm_eps=1e-6, qkv_bias=True)).save_pretrained(path)
  return path


def _image_tags(folder: Path) -> set[str]:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tags = set()
  for events in folder.glob("events.out.tfevents.*"):
    for event in tf.compat.v1.train.summary_iterator(str(events)):
      tags |= {v.tag for v in event.summary.value   # clu's tensors, or TensorBoard's image values
               if v.metadata.plugin_data.plugin_name == "images" or v.HasField("image")}
  return tags


def _files(run: Path) -> dict[str, tuple[int, int]]:
  return {str(p.relative_to(run)): (p.stat().st_mtime_ns, p.stat().st_size)
          for p in run.rglob("*") if p.is_file() and p.parent != run}


@pytest.mark.slow
def test_pipeline_end_to_end_then_only_the_report(tmp_path):
  run = tmp_path / "run"
  args = ["--config=configs/pipeline.py:tiny", f"--workdir={run}",
          f"--config.data.dir={tmp_path / 'sim'}", f"--config.data.cache_dir={tmp_path / 'cache'}",
          "--config.data.sim.workers=1", "--config.probe.epochs=1", "--config.finetune.epochs=1"]
  hf = _hf_checkpoint(tmp_path / "hf")
  if hf is not None:
    args.append(f"--config.pretrain.init_weights={hf}")
  first = _main(*args)
  assert first.returncode == 0, first.stderr[-3000:]
  for stage in runs_lib.STAGES:
    assert f"stage {stage}: not run yet; running it in {run / stage}" in first.stderr
    record = runs_lib.read_record(run / stage)
    assert record["complete"] and len(record["runs"]) == 1 and record["runs"][0]["seconds"] > 0
  if hf is not None:
    assert f"initialised from weights {hf}" in first.stderr
    assert "4 patches, this model's 16" in first.stderr
  assert f"initialised from {run / 'pretrain'}" in first.stderr  # probe and fine-tune

  # The report's numbers are the stages' own.
  md = (run / "report.md").read_text()
  data = json.loads((run / "report.json").read_text())
  for stage, title in (("probe", "linear probe"), ("finetune", "fine-tune")):
    m = json.loads((run / stage / "eval_metrics.json").read_text())
    assert data["records"][stage] == m
    row = next(line for line in md.splitlines() if line.startswith(f"| **{title}** (epoch"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    lo, hi = m["intervals"]["macro_auc"]
    extra = [f"{m[k]:.4f} [{m['intervals'][k][0]:.4f}, {m['intervals'][k][1]:.4f}]"
             for k in ("balanced_accuracy", "ece")]   # the evaluators beyond the fixed columns
    assert cells[1:] == [str(m["num_examples"]), f"{m['micro_auc']:.4f}",
                         f"{m['macro_auc']:.4f} [{lo:.4f}, {hi:.4f}]",
                         *(f"{m['auc'][c]:.4f}" for c in ("no_sub", "cdm", "axion")),
                         f"{m['accuracy']:.4f}", *extra]
    assert f"({stage}/plots/roc.png)" in md and f"({stage}/plots/confusion.png)" in md
    assert f"({stage}/plots/reliability.png)" in md   # the ECE evaluator's figure
  for fig in ("figures.png", "data/plots/samples.png", "pretrain/plots/loss_curve.png",
              "pretrain/plots/reconstructions.png"):
    assert f"]({fig})" in md
  for title in ("data", "MAE pretraining", "linear probe", "fine-tune"):
    assert re.search(rf"^\| {title} \| complete \| [^|]+ s \| 1 \| 1 x ", md, re.M), title
  page = (run / "report.html").read_text()
  assert page.count('src="data:image/png;base64,') == md.count("![")
  # Figures also went to TensorBoard as images.
  assert "reconstructions" in _image_tags(run / "pretrain")
  assert {"roc", "confusion"} <= _image_tags(run / "finetune")

  # A second invocation finds every stage complete and only rewrites the report.
  before, report_time = _files(run), (run / "report.md").stat().st_mtime_ns
  second = _main(*args)
  assert second.returncode == 0, second.stderr[-3000:]
  for stage in runs_lib.STAGES:
    assert f"stage {stage}: complete in {run / stage}, skipped" in second.stderr
  assert "running it" not in second.stderr and "resuming" not in second.stderr
  assert _files(run) == before
  assert (run / "report.md").stat().st_mtime_ns > report_time
  assert json.loads((run / "report.json").read_text())["records"] == data["records"]
  assert np.isclose(json.loads((run / "report.json").read_text())["stages"]["pretrain"]["seconds"],
                    data["stages"]["pretrain"]["seconds"])


def test_figure_grid_wraps_long_captions_instead_of_clipping_them(tmp_path, monkeypatch):
  """The pipeline's figures.png: a caption wider than its tile ("Linear probe: ROC curves on
  the test split (epoch chosen on validation)") is wrapped onto lines that fit."""
  png = tmp_path / "one.png"
  plots.plt.imsave(png, np.zeros((8, 8)))
  seen = {}
  save = plots.save

  def keep(fig, path):
    seen["titles"] = [ax.get_title() for ax in fig.axes]
    return save(fig, path)

  monkeypatch.setattr(plots, "save", keep)
  caption = "Linear probe: ROC curves on the test split (epoch chosen on validation)"
  plots.figure_grid([(caption, png), ("Short", png)], tmp_path / "grid.png")
  assert (tmp_path / "grid.png").exists()
  wrapped, short = seen["titles"][:2]
  assert wrapped.replace("\n", " ") == caption and max(len(l) for l in wrapped.split("\n")) <= 45
  assert short == "Short"
