"""The command line: a tiny recipe end to end, resuming, and one-line errors for bad input."""

import glob
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

RECIPE = "configs/fashion_mnist_kd.py"


def run_cli(*args: str, executable: list[str] | None = None) -> subprocess.CompletedProcess:
  command = (executable or [sys.executable, "-m", "distill_jax.main"]) + list(args)
  return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
                        check=False)


@pytest.fixture(scope="module")
def tiny_run(tfds_data_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("tiny_run")
  args = (f"--config={RECIPE}:tiny", f"--workdir={workdir}",
          f"--config.data.data_dir={tfds_data_dir}")
  first = run_cli(*args)
  return workdir, args, first


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


BAD_CONFIGS = [
    ("--config.distill.temperatur=2", "unknown config key 'temperatur'"),
    ("--config.student.train.steps=abc", "--config.student.train.steps=abc"),
    ("--config.distill.temperature=0", "temperature must be a finite number > 0, got 0.0"),
    ("--config.distill.temperature=-1", "temperature must be a finite number > 0, got -1.0"),
    ("--config.distill.alpha=1.5", "alpha must be in [0, 1], got 1.5"),
    ("--config.distill.beta=-0.1", "beta must be in [0, 1], got -0.1"),
    ("--config.distill.divergence=kl2", "got 'kl2'"),
    ("--config.mesh.data=3", "multiply to 3, but the run has 8 device(s)"),
    ("--config.student.train.batch_size=30", "batch_size=30 is not divisible by 8"),
    ("--config.teacher.train.learning_rate=-0.1", "learning_rate must be a finite number > 0"),
    ("--config.student.model.name=transformer", "config.student.model.name must be one of"),
    ("--config.data.source=web", "config.data.source must be one of"),
    ("--config.teacher.checkpoint_dir=/nonexistent/teacher", "is not a directory"),
    ("--config.student.train.steps=0", "config.student.train.steps must be an integer >= 1"),
]


@pytest.mark.parametrize("flag,expected", BAD_CONFIGS, ids=[flag for flag, _ in BAD_CONFIGS])
def test_bad_config_one_line_error(flag, expected, tmp_path):
  workdir = tmp_path / "run"
  result = run_cli(f"--config={RECIPE}:tiny", f"--workdir={workdir}", flag)

  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr
  assert lines[0].startswith("distill-jax: error: ")
  assert expected in lines[0]
  assert "Traceback" not in result.stderr
  assert not (workdir / "checkpoints").exists()


@pytest.mark.parametrize("args,expected", [
    ((f"--config={RECIPE}:bogus",), "unknown variant 'bogus'"),
    (("--config=configs/missing.py", "--workdir=/tmp/unused"), "configs/missing.py"),
    ((f"--config={RECIPE}:tiny",), "--workdir is required"),
    (("--workdir=/tmp/unused",), "--config is required"),
], ids=["variant", "missing_file", "no_workdir", "no_config"])
def test_bad_command_line_one_line_error(args, expected):
  result = run_cli(*args)

  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr
  assert expected in lines[0]


def test_console_script_reports_errors():
  script = shutil.which("distill-jax", path=os.path.dirname(sys.executable))
  if script is None:
    pytest.skip("the distill-jax console script is not installed; pip install -e .")
  result = run_cli(f"--config={RECIPE}:tiny", "--workdir=/tmp/unused",
                   "--config.distill.alpha=2", executable=[script])
  assert result.returncode == 2
  assert result.stderr.strip() == "distill-jax: error: config.distill: alpha must be in [0, 1], got 2.0"


def test_rerun_with_other_config_rejected(tiny_run):
  workdir, args, first = tiny_run
  assert first.returncode == 0, first.stderr[-3000:]
  saved_config = (workdir / "config.json").read_text()
  saved_report = (workdir / "report.json").read_text()

  result = run_cli(*args, "--config.distill.alpha=0.5")

  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr
  assert "contains a run with a different config (distill.alpha: 0.9 -> 0.5)" in lines[0]
  assert (workdir / "config.json").read_text() == saved_config
  assert (workdir / "report.json").read_text() == saved_report


@pytest.mark.parametrize("kind", ["file", "under_file"])
def test_unusable_workdir_one_line_error(kind, tmp_path):
  blocker = tmp_path / "blocker"
  blocker.write_text("keep me")
  workdir = blocker if kind == "file" else blocker / "run"

  result = run_cli(f"--config={RECIPE}:tiny", f"--workdir={workdir}")

  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr
  assert "cannot be created because a file is in the way" in lines[0]
  assert blocker.read_text() == "keep me"
