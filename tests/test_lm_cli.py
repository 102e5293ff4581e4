"""The language-model recipe from the command line: a tiny run, its rerun and bad input."""

import json
import os

import pytest

from conftest import run_cli

RECIPE = "configs/gemma3_270m_distill.py"


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("lm_tfds")
  workdir = tmp_path_factory.mktemp("lm_run")
  args = (f"--config={RECIPE}:tiny", f"--workdir={workdir}",
          f"--config.data.data_dir={data_dir}")
  first = run_cli(*args)
  return workdir, args, first, data_dir


def test_tiny_lm_recipe_writes_report(lm_run):
  workdir, _, result, _ = lm_run
  assert result.returncode == 0, result.stderr[-3000:]
  assert "validation perplexity: teacher" in result.stdout

  with open(workdir / "report.json") as f:
    report = json.load(f)
  assert set(report["models"]) == {"teacher", "distilled_student", "baseline_student"}
  for entry in report["models"].values():
    assert entry["perplexity"] > 1.0
    assert 0.0 <= entry["ece"] <= 1.0
    assert entry["parameters"] > 0
    assert entry["tokens_per_second_batch1"] > 0
    assert entry["greedy_ms_per_token"] > 0
    assert entry["peak_memory_batch1_mib"] > 0
  for student in ("distilled_student", "baseline_student"):
    assert report["models"][student]["kl_teacher_student"] >= 0.0
    assert 0.0 <= report["models"][student]["top1_agreement_with_teacher"] <= 1.0
  assert report["models"]["teacher"]["parameters"] == 268_098_176
  assert report["distillation"]["teacher_outputs"] == "cached"
  assert len(report["continuations"]) == 3
  assert "baseline_minus_distilled_kl" in report["comparison"]


def test_tiny_lm_recipe_writes_cache_and_files(lm_run):
  workdir, _, result, _ = lm_run
  assert result.returncode == 0, result.stderr[-3000:]
  with open(workdir / "teacher_cache" / "manifest.json") as f:
    manifest = json.load(f)
  assert manifest["top_k"] == 8
  assert manifest["bytes_per_token"] == 64
  assert (workdir / "learning_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert os.listdir(workdir / "checkpoints" / "distill")
  assert os.listdir(workdir / "checkpoints" / "baseline")
  assert (workdir / "report.md").read_text().startswith("# Distillation report")


def test_lm_rerun_reuses_cache_and_checkpoints(lm_run):
  workdir, args, first, _ = lm_run
  assert first.returncode == 0, first.stderr[-3000:]
  second = run_cli(*args)
  assert second.returncode == 0, second.stderr[-3000:]
  assert "reusing the teacher cache" in second.stderr
  assert "distill: already finished" in second.stderr
  assert "baseline: already finished" in second.stderr


def test_cache_of_other_temperature_rejected(lm_run, tmp_path):
  workdir, _, first, data_dir = lm_run
  assert first.returncode == 0, first.stderr[-3000:]
  result = run_cli(f"--config={RECIPE}:tiny", f"--workdir={tmp_path / 'other'}",
                   f"--config.data.data_dir={data_dir}",
                   f"--config.teacher_cache.dir={workdir / 'teacher_cache'}",
                   "--config.distill.temperature=2.0")
  assert result.returncode == 2, result.stderr[-3000:]
  lines = result.stderr.strip().splitlines()
  assert lines[-1].startswith("distill-jax: error: the teacher cache in ")
  assert "written with temperature=1.0 but this run has temperature=2.0" in lines[-1]
  assert "Traceback" not in result.stderr


def test_cache_only_run_stops_before_training(tmp_path):
  workdir = tmp_path / "cache_only"
  result = run_cli(f"--config={RECIPE}:tiny", f"--workdir={workdir}",
                   f"--config.data.data_dir={tmp_path / 'tfds'}",
                   "--config.teacher_cache.only=true")
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"teacher cache ready in {workdir / 'teacher_cache'}" in result.stdout
  assert (workdir / "teacher_cache" / "manifest.json").exists()
  assert not (workdir / "checkpoints").exists()
  assert not (workdir / "report.json").exists()
