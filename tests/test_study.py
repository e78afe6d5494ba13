"""Issue-15 guarantees: the label budget, a test split that chooses nothing, and a study
whose table is the stages' own numbers."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from configs import finetune as finetune_config
from configs import study as study_config
from mae_jax.data import arrays
from mae_jax.eval import plots
from mae_jax.runtime import errors
from mae_jax.runtime import workdir as workdir_lib
from mae_jax.stages import classify
from mae_jax.stages import common
from mae_jax.stages import study
from mae_jax.stages import study_tables
from mae_jax.stages import validate
from tests.conftest import write_folder

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "research"))

import study_figure  # pylint: disable=g-import-not-at-top,wrong-import-position


def _split(per_class: dict[int, int]) -> arrays.Split:
  labels = np.concatenate([np.full(n, c, np.int32) for c, n in per_class.items()])
  keys = np.array([f"k{i}" for i in range(len(labels))])
  return arrays.Split("train", np.arange(len(labels), dtype=np.float32)[:, None, None] *
                      np.ones((1, 2, 2), np.float32), labels, keys)


def test_label_budget_takes_exactly_n_per_class_drawn_by_seed():
  split = _split({0: 50, 1: 40, 2: 45})
  a = common.labelled_subset(split, 10, seed=0)
  assert np.bincount(a.labels).tolist() == [10, 10, 10]
  assert set(a.keys.tolist()) <= set(split.keys.tolist()) and len(set(a.keys.tolist())) == 30
  assert list(a.keys) == [k for k in split.keys if k in set(a.keys.tolist())]  # order kept
  again = common.labelled_subset(split, 10, seed=0)
  assert again.keys.tolist() == a.keys.tolist()
  assert common.labelled_subset(split, 10, seed=1).keys.tolist() != a.keys.tolist()
  assert common.labelled_subset(split, 0, seed=0) is split
  with pytest.raises(errors.InsufficientDataError, match="only 40 cdm"):
    common.labelled_subset(split, 41, seed=0)


def _finetune_config(root: Path, cache: Path):
  config = finetune_config.get_config("tiny")
  config.data.source = "deeplense"
  config.data.dir = str(root)
  config.data.cache_dir = str(cache)
  config.data.validation_fraction = 0.25
  config.data.test_fraction = 0.25
  config.model.image_size = 16
  config.model.patch = 8
  config.init_from = ""
  config.epochs = 3
  return config


def test_budget_schedule_sizes_batch_epochs_and_warmup_from_the_budget():
  sub = finetune_config.get_config("seed")   # batch 64, warmup 5 epochs
  small = study._budget_schedule(sub, 10, 90_000, 2, 5000, 10)
  assert small["batch_size"] == 14 and small["epochs"] == 2500   # 30 images: 2 steps per epoch
  assert small["eval_every_epochs"] == small["checkpoint_every_epochs"] == 250
  assert small["optim.warmup_epochs"] == 5.0
  whole = study._budget_schedule(sub, 0, 90_000, 2, 5000, 10)
  assert whole["batch_size"] == 64 and whole["epochs"] == 4   # 1,406 steps per epoch
  assert whole["optim.warmup_epochs"] == 0.4   # a tenth of the run, not all of it


def test_demo_substructure_study_runs_the_ladder_with_both_ceilings_at_measured_schedules():
  """The demo study on `substructure`: 100, 300 and every label per class, the ViT and
  the CNN from scratch as ceilings, each budget at the schedule its arm was measured with
  (docs/substructure.md): 40 epochs on every label, 120 at 300 per class."""
  config = study_config.get_config("demo")
  assert tuple(config.variant_labels_per_class.substructure) == (100, 300, 0)
  arms = tuple(config.variant_arms.substructure)
  assert {"supervised", "supervised_cnn", "mae_finetune", "scratch_finetune",
          "mae_probe", "radial"} <= set(arms)
  sub = config.finetune
  train = 5351   # the demo folder's train split
  epochs = {n: study._budget_schedule(sub, n, train, 1, study.budget_steps(config, "finetune", n),
                                      config.evaluations)["epochs"] for n in (100, 300, 0)}
  assert epochs == {100: 50, 300: 120, 0: 40}
  whole = study._budget_schedule(sub, 0, train, 1, config.supervised_steps, config.evaluations)
  assert whole["epochs"] == 40 and tuple(config.arm_table.supervised.lrs) == (1e-3,)
  probe = study._budget_schedule(config.probe, 0, train, 1, study.budget_steps(config, "probe", 0),
                                 config.evaluations)
  assert probe["epochs"] == 20
  # On every label the scratch ViT is the `supervised` run (the same schedule): not trained
  # twice; where the schedules differ (the seed preset), both run.
  assert "scratch_finetune" in study.budget_arms(config, arms, 300)
  assert "scratch_finetune" not in study.budget_arms(config, arms, 0)
  assert "scratch_finetune" in study.budget_arms(config, ("scratch_finetune", "radial"), 0)
  seed = study_config.get_config("seed")
  assert "scratch_finetune" in study.budget_arms(seed, tuple(seed.arms), 0)
  # The radial baseline on every label comes once per seed: from the `all` budget's runs,
  # or, where that budget runs nothing that carries it, from the supervised arms'.
  assert not study.radial_beside_supervised(config, arms, (100, 300, 0))
  assert study.radial_beside_supervised(config, arms, (100, 300))
  assert study.radial_beside_supervised(config, ("scratch_finetune", "radial", "supervised"),
                                        (100, 0))
  # model_ii keeps its one budget at the short schedule.
  assert study.budget_steps(config, "finetune", 100) == config.finetune_steps == 200


def test_budget_steps_that_are_not_label_step_pairs_are_refused():
  config = study_config.get_config("demo")
  config.finetune_budget_steps = ((300, 1680), (0, 0))
  config.probe_budget_steps = ((-1, 500),)
  with pytest.raises(errors.ConfigError) as e:
    validate.check_study(config, study.arm_problems(config))
  assert "finetune_budget_steps: (0, 0) is not a (labels per class, steps) pair" in str(e.value)
  assert "probe_budget_steps: (-1, 500) is not" in str(e.value)
  # A budget no ladder runs is no error: the ladder may be overridden on its own.
  config = study_config.get_config("demo")
  config.variant_labels_per_class.substructure = (10, 100)
  validate.check_study(config, study.arm_problems(config))


def test_goals_give_each_gap_to_its_target(tmp_path):
  cell = lambda v, arm, n, auc: {"variant": v, "arm": arm, "labels_per_class": n,  # pylint: disable=unnecessary-lambda-assignment
                                 "mean_test_macro_auc": auc, "min": auc, "max": auc,
                                 "mean_interval": None, "seeds": 1}
  summary = [cell("substructure", "mae_finetune", 100, 0.60),
             cell("substructure", "scratch_finetune", 100, 0.52),
             cell("substructure", "mae_probe", 100, 0.66), cell("substructure", "radial", 100, 0.50),
             cell("substructure", "mae_finetune", 10, 0.9),   # not the goal budget
             cell("substructure", "scratch_finetune", 10, 0.5),
             cell("substructure", "supervised", 0, 0.93), cell("substructure", "radial", 0, 0.70),
             cell("model_ii", "mae_finetune", 100, 0.70), cell("model_ii", "scratch_finetune", 100, 0.68),
             cell("model_ii", "mae_probe", 100, 0.90), cell("model_ii", "radial", 100, 0.95)]
  got = study_tables.goals(summary, 100, 0.05, over_radial={"substructure": 0.15},
                    probe_near_radial={"model_ii": 0.03},
                    ceiling_at_least={"substructure": 0.9}, radial_at_most={"substructure": 0.65})
  assert [(g["goal"], g["variant"], g["arm"], g["labels_per_class"]) for g in got] == [
      ("mae_over_scratch", "substructure", "mae_finetune", 100),
      ("mae_over_radial", "substructure", "mae_finetune", 100),
      ("ceiling_at_least", "substructure", "supervised", 0),
      ("radial_at_most", "substructure", "radial", 0),
      ("mae_over_scratch", "model_ii", "mae_finetune", 100),
      ("probe_near_radial", "model_ii", "mae_probe", 100)]
  assert [round(g["gap"], 6) for g in got] == [0.03, -0.05, 0.03, -0.05, -0.03, -0.02]
  assert got[1]["target"] == pytest.approx(0.65)
  blocks = study_tables.tables(study_tables.summarise([]) + summary, {"substructure": {"snr": {
      "cdm": {"median": 34.0, "p10": 9.0, "p90": 80.0}}}, "model_ii": {"snr": None}}, got)
  tables = [b for b in blocks if b[0] == "table"]
  assert [len(t[2]) for t in tables] == [len(summary), 2, len(got)]
  assert tables[1][2][0] == ["substructure", "34 [9, 80]", "", "0.930", "", "0.700"]
  assert all(len(row) == len(t[1]) for t in tables for row in t[2])
  png = plots.label_efficiency(summary, tmp_path / "le.png", goals=got)
  drawn = json.loads(png.with_suffix(".json").read_text())
  assert [g["gap"] for g in drawn["data"]["goals"]] == [g["gap"] for g in got]
  # The stock config's goal keys give the same goals.
  assert study_tables.config_goals(summary, study_config.get_config("demo")) == got


def test_a_figure_of_one_studys_mae_arms_beside_a_reference_study(tmp_path):
  """research/study_figure.py: the MAE arms of the study (a `demo_long` run of those
  alone), every other arm of the reference, the reference's MAE arms renamed; goals
  recomputed on the study's MAE arms."""
  cell = lambda arm, n, auc, v="substructure": {  # pylint: disable=unnecessary-lambda-assignment
      "variant": v, "arm": arm, "labels_per_class": n, "mean_test_macro_auc": auc,
      "min": auc, "max": auc, "mean_interval": None, "seeds": 3}
  mine = [cell("mae_finetune", 100, 0.61), cell("mae_probe", 100, 0.58),
          cell("mae_finetune", 100, 0.9, "model_ii")]
  reference = [cell("mae_finetune", 100, 0.53), cell("scratch_finetune", 100, 0.51),
               cell("radial", 100, 0.55), cell("supervised_cnn", 0, 0.86)]
  (tmp_path / "study.json").write_text(json.dumps({"summary": mine}))
  png = plots.label_efficiency(reference, tmp_path / "ref.png")
  merged = study_figure.merge(study_figure.read_summary(tmp_path / "study.json"),
                              study_figure.read_summary(png.with_suffix(".json")),
                              "substructure", "20 epochs")
  assert [(s["arm"], s["mean_test_macro_auc"]) for s in merged] == [
      ("mae_finetune", 0.61), ("mae_probe", 0.58), ("scratch_finetune", 0.51),
      ("radial", 0.55), ("supervised_cnn", 0.86), ("mae_finetune (20 epochs)", 0.53)]
  goal = study_tables.config_goals(merged, study_config.get_config("demo"))[0]
  assert (goal["goal"], goal["value"], round(goal["gap"], 6)) == ("mae_over_scratch", 0.61, 0.05)
  with pytest.raises(SystemExit, match="no MAE arm on 'hard'"):
    study_figure.merge(mine, reference, "hard", "x")


@pytest.mark.slow
def test_the_test_split_chooses_nothing(tmp_path, monkeypatch):
  """Two runs whose test splits differ completely (noise images, shuffled labels): every
  training and validation number and the chosen epoch are identical; only the reported
  test numbers differ. So nothing before the final evaluation reads the test split."""
  root = tmp_path / "src"
  write_folder(root, per_class=24)
  config = _finetune_config(root, tmp_path / "cache")
  load = common.load_dataset

  def scrambled(data, image_size):
    dataset = load(data, image_size)
    test = dataset["test"]
    rng = np.random.default_rng(9)
    noisy = dataclasses.replace(test, images=rng.random(test.images.shape, np.float32),
                                labels=rng.permutation(test.labels))
    return dataclasses.replace(dataset, splits={**dataset.splits, "test": noisy})

  classify.run(config, str(tmp_path / "a"))
  monkeypatch.setattr(common, "load_dataset", scrambled)
  classify.run(config, str(tmp_path / "b"))
  runs = [tmp_path / "a", tmp_path / "b"]
  strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # pylint: disable=unnecessary-lambda-assignment
  histories = [strip(json.loads((r / "history.json").read_text())) for r in runs]
  assert histories[0] == histories[1]
  metrics = [json.loads((r / workdir_lib.EVAL_FILE).read_text()) for r in runs]
  assert metrics[0]["epoch"] == metrics[1]["epoch"]
  assert metrics[0]["validation"] == metrics[1]["validation"]
  assert metrics[0]["confusion_matrix"] != metrics[1]["confusion_matrix"]


@pytest.mark.slow
def test_study_table_is_the_stages_own_numbers(tmp_path):
  """A tiny study (one variant, budgets 2 per class and all, one seed, every arm): each
  row of study.json is the test macro AUC in its run's eval_metrics.json."""
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
  args = [sys.executable, str(ROOT / "main.py"), "--config=configs/study.py:tiny",
          f"--workdir={tmp_path / 'study'}", f"--config.data.cache_dir={tmp_path / 'cache'}",
          f"--config.data_dirs.model_ii={tmp_path / 'sim'}", "--config.variants=('model_ii',)",
          "--config.data.sim.workers=1"]
  result = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads((tmp_path / "study" / study_tables.RESULTS_FILE).read_text())
  table = study.arm_table(study_config.get_config("tiny"))
  ceilings = {a for a, arm in table.items() if arm.ceiling}
  assert {(r["arm"], r["labels_per_class"]) for r in out["rows"]} == ({
      (a, n) for a in (*table, "radial") if a not in ceilings for n in (2, 0)} | {
      (a, 0) for a in ceilings}) - {("scratch_finetune", 0)}   # that is `supervised`
  assert set(out["ceilings"]["model_ii"]["snr"]) == {"cdm", "axion"}   # simulated: measured
  assert out["ceilings"]["model_ii"]["snr"]["cdm"]["median"] > 0
  for row in out["rows"]:
    metrics = json.loads((Path(row["run"]) / workdir_lib.EVAL_FILE).read_text())
    source = metrics["baseline"] if row["arm"] == "radial" else metrics
    assert row["test_macro_auc"] == source["macro_auc"]
    assert row["test_macro_auc_interval"] == source["intervals"]["macro_auc"]
    if row["arm"] != "radial":
      assert metrics["labels_per_class"] == row["labels_per_class"]
      assert metrics["train_examples"] == (3 * row["labels_per_class"]
                                          if row["labels_per_class"] else metrics["train_examples"])
  partial = [r for r in out["rows"] if r["arm"] == "mae_partial"]   # the partial fine-tune's rows
  assert {r["labels_per_class"] for r in partial} == {2, 0}
  for r in partial:
    ran = json.loads((Path(r["run"]) / workdir_lib.CONFIG_FILE).read_text())
    assert ran["trainable_blocks"] == 1 and ran["init_from"].endswith("pretrain")
  for s in out["summary"]:
    members = [r["test_macro_auc"] for r in out["rows"]
               if (r["arm"], r["labels_per_class"]) == (s["arm"], s["labels_per_class"])]
    assert s["mean_test_macro_auc"] == pytest.approx(np.mean(members))
  for name in (study_tables.TABLE_FILE, study_tables.FIGURE_FILE, "report.md", "report.html", "figures.json"):
    assert (tmp_path / "study" / name).stat().st_size > 0
  for name in (study_tables.TABLE_FILE, "report.md"):   # the ceiling arms are in the tables
    text = (tmp_path / "study" / name).read_text()
    assert "| model_ii | supervised CNN (all labels) | all | 1 |" in text
    assert "| model_ii | supervised ViT (all labels) | all | 1 |" in text
    assert "| model_ii | MAE partial fine-tune | 2 | 1 |" in text
    assert "axion substructure SNR" in text
  # Run again: everything is complete and skipped; the table is the same.
  again = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert again.returncode == 0 and "running it" not in again.stderr
  assert json.loads((tmp_path / "study" / study_tables.RESULTS_FILE).read_text())["rows"] == out["rows"]


def test_unknown_arms_and_variants_are_refused_before_anything_runs(tmp_path):
  config = study_config.get_config("tiny")
  config.arms = ("mae_finetune", "cnn")
  config.variants = ("model_ii", "easy")
  with pytest.raises(errors.ConfigError) as e:
    study.run(config, str(tmp_path / "study"))
  assert "unknown arm 'cnn'" in str(e.value) and "unknown variant 'easy'" in str(e.value)
  assert not (tmp_path / "study").exists()


def _study_args(tmp_path: Path, workdir: Path) -> list[str]:
  return [sys.executable, str(ROOT / "main.py"), "--config=configs/study.py:tiny",
          f"--workdir={workdir}", f"--config.data.cache_dir={tmp_path / 'cache'}",
          f"--config.data_dirs.model_ii={tmp_path / 'sim'}", "--config.variants=('model_ii',)",
          "--config.data.sim.workers=1", "--config.poll_seconds=1.0"]


def _comparable(rows: list[dict]) -> list[dict]:
  return [{k: v for k, v in r.items() if k != "run"} for r in rows]


@pytest.mark.slow
def test_two_workers_one_killed_give_the_one_process_study(tmp_path):
  """Two processes run the same study on one workdir; one is killed while it runs a stage.
  The other takes its run over (resuming it) and the rest, and writes the same study.json
  rows as one process alone."""
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
  alone = subprocess.run(_study_args(tmp_path, tmp_path / "one"), cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
  assert alone.returncode == 0, alone.stderr[-3000:]
  want = json.loads((tmp_path / "one" / study_tables.RESULTS_FILE).read_text())["rows"]

  shared = tmp_path / "two"
  logs = [open(tmp_path / f"worker{i}.log", "w+", encoding="utf-8") for i in range(2)]
  workers = [subprocess.Popen(_study_args(tmp_path, shared), cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=log) for log in logs]
  deadline = time.time() + 300

  def both_met() -> bool:   # worker 0 runs a stage, and worker 1 has met one of its claims
    return ("running it" in (tmp_path / "worker0.log").read_text()
            and "is being run by another worker" in (tmp_path / "worker1.log").read_text())

  while not both_met():
    assert time.time() < deadline and workers[0].poll() is None, \
        "worker 0 never ran a stage while worker 1 met its claim"
    time.sleep(0.2)
  workers[0].kill()   # SIGKILL mid-run: its claims end with it
  assert workers[1].wait(timeout=900) == 0, (tmp_path / "worker1.log").read_text()[-3000:]
  workers[0].wait()
  second = (tmp_path / "worker1.log").read_text()
  assert "is being run by another worker" in second
  assert "wait for other workers" in second
  got = json.loads((shared / study_tables.RESULTS_FILE).read_text())["rows"]
  assert _comparable(got) == _comparable(want)
  assert (shared / study_tables.TABLE_FILE).exists() and (shared / study_tables.FIGURE_FILE).exists()


def test_the_cnn_arm_takes_the_cnn_config_and_the_studys_fine_tune_overrides():
  """An arm with a config-argument option (the CNN's `arch=cnn`) runs the stock config of
  that option, with the keys it shares with the study's `finetune` taken from there."""
  config = study_config.get_config("tiny")
  config.finetune.model.dropout = 0.3
  table = study.arm_table(config)
  cnn = study._stage_keys(config, table["supervised_cnn"])  # pylint: disable=protected-access
  assert cnn.model.arch == "cnn" and "cnn_widths" in cnn.model and "patch" not in cnn.model
  assert cnn.model.dropout == 0.3 and "init_from" not in cnn
  stage = study._stage(cnn, "finetune", config, config.data)  # pylint: disable=protected-access
  assert validate.key_problems(stage, validate.reference_config("finetune", "tiny",
                                                                {"arch": "cnn"})) == []
  vit = study._stage(config.finetune, "finetune", config, config.data)  # pylint: disable=protected-access
  assert vit.init_from == "" and vit.init_from_stage == "pretrain"
  assert study.arm_problems(config) == []
  config.arm_table.mae_probe.start = "scratch"
  assert any("a scratch arm (and only it) has `lrs`" in p for p in study.arm_problems(config))
