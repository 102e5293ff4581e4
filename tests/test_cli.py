"""The command line: a tiny recipe end to end, resuming, and one-line errors for bad input."""

import glob
import json
import os
import shutil
import sys

import pytest

from conftest import run_cli

RECIPE = "configs/fashion_mnist_kd.py"


def test_tiny_recipe_writes_report(tiny_run):
  workdir, _, result = tiny_run
  assert result.returncode == 0, result.stderr[-3000:]
  assert "test accuracy: teacher" in result.stdout

  with open(workdir / "report.json") as f:
    report = json.load(f)
  assert set(report["models"]) == {"teacher", "distilled_student", "baseline_student"}
  for entry in report["models"].values():
    assert 0.0 <= entry["test_accuracy"] <= 1.0
    assert entry["parameters"] > 0
    assert entry["latency_batch1_ms"] > 0
    assert entry["latency_batchN_ms"] > 0
    assert entry["peak_memory_batchN_mib"] > 0
  for student in ("distilled_student", "baseline_student"):
    assert 0.0 <= report["models"][student]["top1_agreement_with_teacher"] <= 1.0
    assert report["models"][student]["kl_teacher_student"] >= 0.0
  assert "distilled_minus_baseline_accuracy_pp" in report["comparison"]
  assert report["environment"]["devices"] == 8


def test_tiny_recipe_writes_workdir_files(tiny_run):
  workdir, _, result = tiny_run
  assert result.returncode == 0, result.stderr[-3000:]
  assert (workdir / "report.md").read_text().startswith("# ")
  assert (workdir / "learning_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  with open(workdir / "config.json") as f:
    assert json.load(f)["recipe"] == "fashion_mnist_kd:tiny"
  for stage in ("teacher", "distill", "baseline"):
    assert os.listdir(workdir / "checkpoints" / stage), stage
    assert glob.glob(str(workdir / "tensorboard" / stage / "events.out.tfevents.*")), stage


def test_rerun_resumes_finished_stages(tiny_run):
  workdir, args, first = tiny_run
  assert first.returncode == 0, first.stderr[-3000:]
  before = json.loads((workdir / "report.json").read_text())

  second = run_cli(*args)

  assert second.returncode == 0, second.stderr[-3000:]
  for stage in ("teacher", "distill", "baseline"):
    assert f"{stage}: already finished" in second.stderr
  after = json.loads((workdir / "report.json").read_text())
  for model in before["models"]:
    assert after["models"][model]["test_accuracy"] == before["models"][model]["test_accuracy"]
  for stage in ("teacher", "distill", "baseline"):
    key = f"{stage}_train_seconds"
    assert after["timings"][key] == pytest.approx(before["timings"][key]), key
    assert after["timings"][key] > 0, key


def test_missing_config_flag_one_line_error():
  result = run_cli("--workdir=/tmp/unused")

  assert result.returncode == 2
  assert result.stderr.strip() == ("distill-jax: error: --config is required, e.g. "
                                   "--config=configs/fashion_mnist_kd.py")


def test_console_script_reports_errors():
  script = shutil.which("distill-jax", path=os.path.dirname(sys.executable))
  if script is None:
    pytest.skip("the distill-jax console script is not installed; pip install -e .")
  result = run_cli(f"--config={RECIPE}:tiny", "--workdir=/tmp/unused",
                   "--config.distill.alpha=2", executable=[script])
  assert result.returncode == 2
  assert result.stderr.strip() == "distill-jax: error: config.distill: alpha must be in [0, 1], got 2.0"


def test_overwrite_replaces_run_of_other_config(tiny_run, tmp_path):
  existing, args, first = tiny_run
  assert first.returncode == 0, first.stderr[-3000:]
  workdir = tmp_path / "run"
  shutil.copytree(existing, workdir)
  changed = ("--config.teacher.train.steps=2", "--config.student.train.steps=2",
             "--config.run_baseline=False")
  run_args = [arg for arg in args if not arg.startswith("--workdir")] + [f"--workdir={workdir}"]

  rejected = run_cli(*run_args, *changed)
  assert rejected.returncode == 2
  assert "add --overwrite to delete it" in rejected.stderr
  result = run_cli(*run_args, *changed, "--overwrite")

  assert result.returncode == 0, result.stderr[-3000:]
  assert "--overwrite: deleted the run of a different config" in result.stderr
  assert json.loads((workdir / "config.json").read_text())["teacher"]["train"]["steps"] == 2
  assert sorted(os.listdir(workdir / "checkpoints")) == ["distill", "teacher"]
  assert sorted(os.listdir(workdir / "checkpoints" / "teacher")) == ["2"]
  assert not (workdir / "baseline_eval_history.jsonl").exists()
