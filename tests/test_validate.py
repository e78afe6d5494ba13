"""Config validation: every mistake is one clear line, found before any work starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax.numpy as jnp
import pytest
from absl import flags
from ml_collections import config_flags

from configs import common
from configs import finetune as finetune_config
from configs import pipeline as pipeline_config
from configs import pretrain as pretrain_config
from configs import probe as probe_config
from configs import study as study_config
from mae_jax.runtime import checkpoint
from mae_jax.stages import launch
from mae_jax.stages import validate

ROOT = Path(__file__).resolve().parents[1]


def _problems(config, workdir) -> list[str]:
  return validate.problems(config, workdir)


def test_stock_configs_have_no_problem(tmp_path):
  assert _problems(pretrain_config.get_config("tiny"), tmp_path / "run") == []
  config = finetune_config.get_config("tiny")
  config.init_from = ""   # from scratch
  assert _problems(config, tmp_path / "run") == []


def test_demo_long_is_demo_pretrained_nine_times_longer():
  """`demo_long` changes one thing of `demo`: the pretraining's 180 epochs (20 + 160), in
  every config that carries a pretraining; it reads demo's folders and no other key moves."""
  def flat(config, skip=()):
    out = {}
    for key, value in config.items():
      if key in skip:
        continue
      if hasattr(value, "items"):
        out.update({f"{key}.{k}": v for k, v in flat(value).items()})
      else:
        out[key] = value
    return out

  assert common.size("demo_long") == "demo"
  assert common.data_dir("substructure", "demo_long") == "data/substructure_sim_demo"
  paths = ("preset", "init_from", "phase_epochs")
  for module in (pretrain_config, probe_config, finetune_config):
    demo, long = module.get_config("demo"), module.get_config("demo_long")
    assert long.preset == "demo_long"
    assert flat(long, paths) == flat(demo, paths)
  assert pretrain_config.get_config("demo").phase_epochs == (7, 13)
  assert pretrain_config.get_config("demo_long").phase_epochs == (20, 160)
  for module in (pipeline_config, study_config):
    long = module.get_config("demo_long")
    assert long.pretrain.phase_epochs == (20, 160)
    assert (flat(long, ("preset", "pretrain")) ==
            flat(module.get_config("demo"), ("preset", "pretrain")))
  assert study_config.get_config("demo_long").data_dirs.substructure == \
      "data/substructure_sim_demo"


def test_misspelled_keys_get_the_closest_valid_key(tmp_path):
  config = pretrain_config.get_config("tiny")
  config.batchsize = 8
  config.data.validaton_fraction = 0.2
  config.optim.wieght_decay = 0.1
  found = _problems(config, tmp_path)
  assert "unknown config key batchsize; did you mean batch_size?" in found
  assert "unknown config key data.validaton_fraction; did you mean data.validation_fraction?" \
      in found
  assert "unknown config key optim.wieght_decay; did you mean optim.weight_decay?" in found


def test_missing_key_names_its_default(tmp_path):
  config = pretrain_config.get_config("tiny")
  del config.optim.b2
  assert _problems(config, tmp_path) == ["missing config key optim.b2 (default: 0.95)"]


@pytest.mark.parametrize("ratio", [1.0, -0.1, 1.5])
def test_mask_ratio_outside_unit_interval(tmp_path, ratio):
  config = pretrain_config.get_config("tiny")
  config.model.mask_ratio = ratio
  assert _problems(config, tmp_path) == [f"model.mask_ratio={ratio} must lie in [0, 1)"]


def test_image_size_not_divisible_by_patch(tmp_path):
  config = pretrain_config.get_config("tiny")
  config.model.patch = 6
  assert _problems(config, tmp_path) == ["model.image_size=64 is not divisible by model.patch=6"]


def test_batch_not_divisible_by_device_count(tmp_path):
  config = pretrain_config.get_config("tiny")
  config.batch_size = 0
  assert _problems(config, tmp_path) == [  # the eval batch follows the batch by default
      "batch_size=0 must be a positive multiple of the device count (1), e.g. 1",
      "eval_batch_size=0 must be a positive multiple of the device count (1), e.g. 1"]


def test_phases_must_match_their_augment_flags(tmp_path):
  config = pretrain_config.get_config("tiny")
  config.phase_epochs = (2, 2, 3)
  assert _problems(config, tmp_path) == [
      "phase_epochs=(2, 2, 3) and phase_augment=(False, True) must be equally long (one entry "
      "per phase), with whole epochs >= 0"]


def test_missing_source_checkpoint_says_how_to_make_it(tmp_path):
  config = probe_config.get_config("tiny")
  config.init_from = str(tmp_path / "nowhere")
  (found,) = _problems(config, tmp_path / "run")
  assert found.startswith(f"init_from: no checkpoint in {tmp_path / 'nowhere' / 'checkpoints'}")
  assert f"python main.py --config=configs/pretrain.py:tiny --workdir={tmp_path / 'nowhere'}" \
      in found


def _fake_stage(workdir: Path, model: dict) -> None:
  with checkpoint.manager(workdir) as mngr:
    checkpoint.save(mngr, 4, {"params": {"w": jnp.ones(2)}})
    checkpoint.seal(mngr)
  (workdir / "config.json").write_text(json.dumps({"model": model}))


def test_source_checkpoint_of_another_architecture(tmp_path):
  config = finetune_config.get_config("tiny")
  theirs = {**config.model.to_dict(), "heads": 4}
  _fake_stage(tmp_path / "pre", theirs)
  config.init_from = str(tmp_path / "pre")
  assert _problems(config, tmp_path / "run") == [
      f"init_from: the source stage {tmp_path / 'pre'} used model.heads=4, this one "
      "model.heads=2; the encoder config must match"]


def test_a_stage_checks_the_encoder_of_the_source_it_reads(tmp_path):
  """Same shapes, other head count: only the source's config.json tells. A stage checks it
  right before it reads `init_from` (a chain makes its sources after it was checked)."""
  config = finetune_config.get_config("tiny")
  _fake_stage(tmp_path / "pre", {**config.model.to_dict(), "heads": 1})
  config.init_from = str(tmp_path / "pre")
  with pytest.raises(validate.ConfigError,
                     match=r"init_from: the source stage \S+pre used model.heads=1, this one "
                           r"model.heads=2; the encoder config must match"):
    validate.check_source_encoder(config)
  _fake_stage(tmp_path / "same", config.model.to_dict())
  config.init_from = str(tmp_path / "same")
  validate.check_source_encoder(config)


def test_resuming_workdir_does_not_need_its_source(tmp_path):
  config = finetune_config.get_config("tiny")
  config.init_from = str(tmp_path / "gone")
  _fake_stage(tmp_path / "run", config.model.to_dict())
  assert _problems(config, tmp_path / "run") == []


def test_a_pretraining_does_not_resume_under_another_loss(tmp_path):
  """An older demo workdir (BCE on the removed patches) rerun with today's demo default
  (the high-pass loss) is refused with the overrides that continue it as it began; the
  same loss, or no checkpoint yet, passes."""
  config = pretrain_config.get_config("demo")
  old = {**config.loss.to_dict(), "type": "bce", "norm_pix": False, "masked_only": True,
         "target": "pixels"}
  _fake_stage(tmp_path / "run", config.model.to_dict())
  record = json.loads((tmp_path / "run" / "config.json").read_text())
  (tmp_path / "run" / "config.json").write_text(json.dumps({**record, "loss": old}))
  found = _problems(config, tmp_path / "run")
  assert len(found) == 1 and found[0].startswith(f"{tmp_path / 'run'} was pretrained with "
                                                 "loss.masked_only=True, loss.norm_pix=False")
  assert ("Continue it as it began with --config.loss.masked_only=True "
          "--config.loss.norm_pix=False --config.loss.target=pixels --config.loss.type=bce") \
      in found[0]
  config.loss.update(old)
  assert _problems(config, tmp_path / "run") == []
  fresh = pretrain_config.get_config("demo")
  (tmp_path / "new").mkdir()
  (tmp_path / "new" / "config.json").write_text(json.dumps({"loss": old}))
  assert _problems(fresh, tmp_path / "new") == []   # no checkpoint: nothing to resume


def test_missing_public_weights_file(tmp_path):
  config = pretrain_config.get_config("tiny")
  config.init_weights = str(tmp_path / "mae_pretrain.pth")
  assert _problems(config, tmp_path / "run") == [
      f"init_weights={tmp_path / 'mae_pretrain.pth'}: no such file or folder (a "
      "facebookresearch/mae .pth, a Hugging Face ViTMAE folder or .safetensors)"]


def test_unwritable_workdir(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a folder")
  config = pretrain_config.get_config("tiny")
  (found,) = _problems(config, blocker / "run")
  assert found.startswith(f"workdir {blocker / 'run'} cannot be written")


def test_unknown_simulation_variant(tmp_path):
  config = pretrain_config.get_config("tiny")
  config.data.sim.variant = "harder"
  assert _problems(config, tmp_path) == ["data.sim.variant='harder' must be one of model_ii, hard, substructure"]


def test_data_folder_without_class_folders(tmp_path):
  (tmp_path / "data" / "no_sub").mkdir(parents=True)
  config = pretrain_config.get_config("tiny")
  config.data.source = "deeplense"
  config.data.dir = str(tmp_path / "data")
  (found,) = _problems(config, tmp_path / "run")
  assert found.startswith(f"data folder {tmp_path / 'data'} lacks the class folder(s) cdm, axion")
  assert "python -m mae_jax.data.simulate --out" in found


@pytest.mark.slow
def test_all_problems_at_once_before_any_work(tmp_path):
  """Through main.py on 4 devices: every problem listed, no traceback, no data simulated."""
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  data = tmp_path / "sim"
  result = subprocess.run(
      [sys.executable, str(ROOT / "main.py"), "--config=configs/pretrain.py:tiny",
       f"--workdir={tmp_path / 'run'}", f"--config.data.dir={data}", "--config.batch_size=6",
       "--config.model.mask_ratio=1.0", "--config.model.patch=6"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode != 0 and "Traceback" not in result.stderr
  assert "error: 4 config problem(s), nothing was run:" in result.stderr
  for line in ("batch_size=6 must be a positive multiple of the device count (4), e.g. 4",
               "eval_batch_size=6 must be a positive multiple of the device count (4), e.g. 4",
               "model.mask_ratio=1.0 must lie in [0, 1)",
               "model.image_size=64 is not divisible by model.patch=6"):
    assert f"  - {line}" in result.stderr
  assert not data.exists()


def _main(*args: str) -> subprocess.CompletedProcess:
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
  return subprocess.run([sys.executable, str(ROOT / "main.py"), *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


def _last_line(result: subprocess.CompletedProcess) -> str:
  assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
  return result.stderr.strip().splitlines()[-1]


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["--config=configs/pretrain.py:demo", "--config.optim.lr_warmup=3"],
     "error: unknown config key optim.lr_warmup; did you mean optim.warmup_epochs?"),
    (["--config=configs/pretrain.py:demmo"],
     "error: configs/pretrain.py: unknown preset 'demmo'; did you mean demo? Presets: demo, "
     "demo_long, seed, seed_gpu, tiny"),
    (["--config=configs/pretrian.py"], "error: config file configs/pretrian.py not found"),
    (["--config=configs/probe.py:tiny", "--config.stage=prob"],
     "error: unknown stage 'prob'; did you mean probe? Known: "),
])
def test_a_newcomers_first_mistakes_get_one_line(tmp_path, args, message):
  """Through main.py: a misspelled override, preset, file or stage ends in one line."""
  line = _last_line(_main(*args, f"--workdir={tmp_path / 'run'}"))
  assert line.startswith(message), line
  assert not (tmp_path / "run").exists()


def _parse(argv: list[str]) -> flags.FlagValues:
  """launch.parse_flags (what main.py's app.run calls) on main.py's --config and --workdir,
  defined on flags of their own."""
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values,
                                  lock_config=True, sys_argv=argv)
  flags.DEFINE_string("workdir", None, "", flag_values=flag_values)
  launch.parse_flags(argv, flag_values)
  return flag_values


def test_a_successful_parse_loads_the_config_file_once(tmp_path):
  loads = tmp_path / "loads.txt"
  file = tmp_path / "counted.py"
  file.write_text(textwrap.dedent(f"""
      from configs import pretrain

      def get_config(arg=None):
        with open({str(loads)!r}, "a") as f:
          f.write("loaded\\n")
        return pretrain.get_config(arg)
  """))
  parsed = _parse(["main.py", f"--config={file}:tiny", "--config.optim.lr=0.5",
                   f"--workdir={tmp_path / 'run'}"])
  assert parsed.config.preset == "tiny" and parsed.config.optim.lr == 0.5
  assert loads.read_text().splitlines() == ["loaded"]


@pytest.mark.parametrize("args, message", [
    (["--config=configs/pretrain.py:demo", "--config.optim.lr_warmup=3"],
     "error: unknown config key optim.lr_warmup; did you mean optim.warmup_epochs?"),
    (["--config=configs/pretrain.py:demmo"],
     "error: configs/pretrain.py: unknown preset 'demmo'; did you mean demo? Presets: demo, "
     "demo_long, seed, seed_gpu, tiny"),
    (["--config=configs/pretrian.py"], "error: config file configs/pretrian.py not found"),
    (["--config=configs/pretrian.py", "--config.seed=1"],
     "error: config file configs/pretrian.py not found"),
])
def test_flag_mistakes_end_in_one_line_in_process(tmp_path, args, message):
  """The same lines as through main.py (test_a_newcomers_first_mistakes_get_one_line)."""
  with pytest.raises(SystemExit) as exit_:
    _parse(["main.py", *args, f"--workdir={tmp_path / 'run'}"])
  assert str(exit_.value.code).startswith(message), exit_.value.code


@pytest.mark.parametrize("stage, key, value, message", [
    ("finetune", "data.test_fraction", 0.95, "leave some files for training"),
    ("finetune", "data.reader", "tf", "data.reader='tf' must be one of files, tfds"),
    ("finetune", "data.feed", "gpu", "data.feed='gpu' must be one of auto, device, host"),
    ("finetune", "data.device_memory_share", 1.5, "data.device_memory_share=1.5 must lie in"),
    ("finetune", "steps_per_call", 0, "steps_per_call=0 must be a whole number >= 1"),
    ("pretrain", "profile_steps", (5, 2), "profile_steps=(5, 2) must be () or (first, last)"),
    ("finetune", "eval_every_epochs", 0, "eval_every_epochs=0 must be a whole number >= 1"),
    ("finetune", "labels_per_class", -3, "labels_per_class=-3 must be a whole number >= 0"),
    ("pretrain", "pool_size", -1, "pool_size=-1 must be a whole number >= 0"),
    ("pretrain", "micro_batch.cpu", -2, "micro_batch.cpu=-2 must be a whole number >= 0"),
    ("probe", "optim.frozen", (), "select_features=True needs the encoder frozen"),
])
def test_settings_of_splits_feeds_chunks_and_budgets(tmp_path, stage, key, value, message):
  config = {"pretrain": pretrain_config, "finetune": finetune_config,
            "probe": probe_config}[stage].get_config("tiny")
  if stage != "pretrain":
    config.init_from = ""   # from scratch: no source checkpoint needed
  node, *path = config, *key.split(".")
  for part in path[:-1]:
    node = node[part]
  node[path[-1]] = value
  found = _problems(config, tmp_path / "run")
  assert len(found) == 1 and message in found[0], found


def test_a_probe_may_choose_its_features(tmp_path):
  config = probe_config.get_config("tiny")
  config.init_from = ""
  config.select_features = True
  assert _problems(config, tmp_path / "run") == []
