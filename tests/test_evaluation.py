"""Tests for distill_jax.evaluation: metrics, profiling and reports."""

import json
import math
import os

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_jax import evaluation

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

_NUM_CLASSES = 10


def _random_batch(seed: int, batch_size: int = 40):
  """Return student and teacher logits, labels and a mask with padding."""
  rng = np.random.default_rng(seed)
  student = rng.normal(scale=3.0, size=(batch_size, _NUM_CLASSES))
  teacher = rng.normal(scale=3.0, size=(batch_size, _NUM_CLASSES))
  labels = rng.integers(0, _NUM_CLASSES, size=batch_size)
  mask = rng.random(batch_size) < 0.7
  mask[0] = True
  mask[-1] = False
  return student, teacher, labels, mask


def _reference_sums(student, teacher, labels, mask):
  """Compute the metric sums in float64 NumPy over the unmasked rows."""
  student = student[mask].astype(np.float64)
  teacher = teacher[mask].astype(np.float64)
  labels = labels[mask]

  def log_softmax(logits):
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))

  teacher_log_probs = log_softmax(teacher)
  student_log_probs = log_softmax(student)
  kl = np.sum(
      np.exp(teacher_log_probs) * (teacher_log_probs - student_log_probs)
  )
  return {
      "count": int(mask.sum()),
      "student_correct": int(np.sum(student.argmax(-1) == labels)),
      "teacher_correct": int(np.sum(teacher.argmax(-1) == labels)),
      "agreement": int(np.sum(student.argmax(-1) == teacher.argmax(-1))),
      "kl_teacher_student": float(kl),
  }


def _assert_sums_match(actual, expected):
  assert set(actual) == set(expected)
  for key in ("count", "student_correct", "teacher_correct", "agreement"):
    assert int(actual[key]) == expected[key], key
  np.testing.assert_allclose(
      float(actual["kl_teacher_student"]),
      expected["kl_teacher_student"],
      rtol=1e-5,
  )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_classification_sums_match_numpy(seed):
  student, teacher, labels, mask = _random_batch(seed)
  expected = _reference_sums(student, teacher, labels, mask)

  eager = evaluation.classification_sums(
      jnp.asarray(student), jnp.asarray(teacher), jnp.asarray(labels),
      jnp.asarray(mask),
  )
  jitted = jax.jit(evaluation.classification_sums)(
      jnp.asarray(student), jnp.asarray(teacher), jnp.asarray(labels),
      jnp.asarray(mask),
  )

  _assert_sums_match(eager, expected)
  _assert_sums_match(jitted, expected)
  assert eager["count"].dtype == jnp.int32
  assert eager["kl_teacher_student"].dtype == jnp.float32


def test_classification_sums_ignore_nan_padding():
  student, teacher, labels, mask = _random_batch(3)
  clean = evaluation.classification_sums(student, teacher, labels, mask)

  student_garbage = student.copy()
  teacher_garbage = teacher.copy()
  student_garbage[~mask] = np.nan
  teacher_garbage[~mask, 0] = np.inf
  teacher_garbage[~mask, 1] = -np.inf
  garbage = jax.jit(evaluation.classification_sums)(
      student_garbage, teacher_garbage, labels, mask
  )

  for key in clean:
    assert np.isfinite(float(garbage[key])), key
    assert float(garbage[key]) == float(clean[key]), key


def test_classification_sums_half_batches_add_up():
  student, teacher, labels, mask = _random_batch(4, batch_size=64)
  full = evaluation.classification_sums(student, teacher, labels, mask)

  totals = None
  for half in (slice(0, 32), slice(32, 64)):
    sums = evaluation.classification_sums(
        student[half], teacher[half], labels[half], mask[half]
    )
    totals = evaluation.add_sums(totals, sums)

  assert set(totals) == set(full)
  for key in ("count", "student_correct", "teacher_correct", "agreement"):
    assert int(totals[key]) == int(full[key]), key
  np.testing.assert_allclose(
      float(totals["kl_teacher_student"]),
      float(full["kl_teacher_student"]),
      rtol=1e-6,
  )


def test_classification_sums_without_teacher():
  student, _, labels, mask = _random_batch(5)
  expected = _reference_sums(student, student, labels, mask)

  sums = evaluation.classification_sums(student, None, labels, mask)

  assert set(sums) == {"count", "student_correct"}
  assert int(sums["count"]) == expected["count"]
  assert int(sums["student_correct"]) == expected["student_correct"]


def test_classification_sums_none_mask_counts_all():
  student, teacher, labels, _ = _random_batch(6)
  all_real = np.ones(labels.shape, dtype=bool)
  expected = _reference_sums(student, teacher, labels, all_real)

  sums = evaluation.classification_sums(student, teacher, labels)

  _assert_sums_match(sums, expected)


def test_kl_zero_teacher_probability_contributes_zero():
  # The teacher puts probability 0 on class 2, so the KL is the one over
  # classes 0 and 1 only, with no NaN from 0 * log 0.
  teacher = jnp.array([[1.0, 2.0, -jnp.inf]])
  student = jnp.array([[0.5, 0.0, 3.0]])
  labels = jnp.array([1])

  sums = evaluation.classification_sums(student, teacher, labels)

  teacher_probs = np.exp([1.0, 2.0]) / np.exp([1.0, 2.0]).sum()
  student_log_probs = np.array([0.5, 0.0, 3.0]) - np.log(
      np.exp([0.5, 0.0, 3.0]).sum()
  )
  expected = np.sum(
      teacher_probs * (np.log(teacher_probs) - student_log_probs[:2])
  )
  np.testing.assert_allclose(
      float(sums["kl_teacher_student"]), expected, rtol=1e-5
  )


def test_classification_sums_identical_logits_zero_kl():
  student, _, labels, mask = _random_batch(7)

  sums = evaluation.classification_sums(student, student, labels, mask)

  assert int(sums["agreement"]) == int(sums["count"])
  assert abs(float(sums["kl_teacher_student"])) < 1e-5


def test_classification_sums_shape_mismatch_raises():
  logits = jnp.zeros((4, 3))
  with pytest.raises(ValueError, match="labels"):
    evaluation.classification_sums(logits, None, jnp.zeros((5,), jnp.int32))
  with pytest.raises(ValueError, match="teacher_logits"):
    evaluation.classification_sums(
        logits, jnp.zeros((4, 2)), jnp.zeros((4,), jnp.int32)
    )
  with pytest.raises(ValueError, match="mask"):
    evaluation.classification_sums(
        logits, None, jnp.zeros((4,), jnp.int32), jnp.ones((3,), bool)
    )


def test_finalize_sums_values():
  sums = {
      "count": jnp.array(8, jnp.int32),
      "student_correct": jnp.array(6, jnp.int32),
      "teacher_correct": np.int64(7),
      "agreement": 5,
      "kl_teacher_student": jnp.array(2.0, jnp.float32),
  }

  metrics = evaluation.finalize_sums(sums)

  assert metrics == {
      "num_examples": 8,
      "student_accuracy": 0.75,
      "teacher_accuracy": 0.875,
      "top1_agreement": 0.625,
      "kl_teacher_student": 0.25,
  }
  for key in ("student_accuracy", "teacher_accuracy", "top1_agreement"):
    assert type(metrics[key]) is float, key


def test_finalize_sums_student_only_and_empty():
  metrics = evaluation.finalize_sums({"count": 4, "student_correct": 1})
  assert metrics == {"num_examples": 4, "student_accuracy": 0.25}

  with pytest.raises(ValueError, match="no examples"):
    evaluation.finalize_sums({"count": 0, "student_correct": 0})
  with pytest.raises(ValueError, match="count"):
    evaluation.finalize_sums({"student_correct": 0})


def test_add_sums_key_mismatch_raises():
  with pytest.raises(ValueError, match="keys"):
    evaluation.add_sums({"count": 1}, {"count": 1, "agreement": 1})


def test_count_parameters_nnx_modules():
  linear = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
  _, linear_params = nnx.split(linear, nnx.Param)
  assert evaluation.count_parameters(linear_params) == 3 * 4 + 4

  conv = nnx.Conv(2, 5, kernel_size=(3, 3), rngs=nnx.Rngs(0))
  _, conv_params = nnx.split(conv, nnx.Param)
  assert evaluation.count_parameters(conv_params) == 3 * 3 * 2 * 5 + 5

  # Batch statistics are not parameters: only scale and bias count.
  model = nnx.Sequential(
      nnx.Linear(3, 4, rngs=nnx.Rngs(0)),
      nnx.BatchNorm(4, rngs=nnx.Rngs(0)),
  )
  _, params, rest = nnx.split(model, nnx.Param, ...)
  assert evaluation.count_parameters(params) == 16 + 8
  assert evaluation.count_parameters(rest) == 8


def test_count_parameters_plain_pytree():
  tree = {"w": np.zeros((2, 3)), "b": [jnp.zeros(4), 1.0], "none": None}
  assert evaluation.count_parameters(tree) == 6 + 4 + 1


def _linear_apply_fn(in_features: int = 16, out_features: int = 8):
  """Return an NNX Linear model as `apply_fn` and its parameter state."""
  model = nnx.Linear(in_features, out_features, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)

  def apply_fn(params, inputs):
    return nnx.merge(graphdef, params)(inputs)

  return apply_fn, params


def test_measure_latency_traces_once():
  apply_fn, params = _linear_apply_fn()
  trace_count = 0

  def counting_apply_fn(params, inputs):
    nonlocal trace_count
    trace_count += 1
    return apply_fn(params, inputs)

  result = evaluation.measure_latency(
      counting_apply_fn, params, np.ones((4, 16), np.float32),
      warmup=2, repeats=5,
  )

  assert trace_count == 1
  assert result["median_ms"] > 0
  assert result["p90_ms"] >= result["median_ms"]
  assert result["repeats"] == 5
  assert result["batch_size"] == 4


def test_measure_latency_rejects_invalid_counts():
  apply_fn, params = _linear_apply_fn()
  inputs = np.ones((1, 16), np.float32)
  with pytest.raises(ValueError, match="warmup"):
    evaluation.measure_latency(apply_fn, params, inputs, warmup=0)
  with pytest.raises(ValueError, match="repeats"):
    evaluation.measure_latency(apply_fn, params, inputs, repeats=0)


def test_forward_peak_memory_grows_with_batch():
  apply_fn, params = _linear_apply_fn(in_features=64, out_features=32)
  params_bytes = (64 * 32 + 32) * 4

  memory_batch1 = evaluation.forward_peak_memory_bytes(
      apply_fn, params, jnp.ones((1, 64))
  )
  memory_batch512 = evaluation.forward_peak_memory_bytes(
      apply_fn, params, jnp.ones((512, 64))
  )

  assert memory_batch1 > 0
  assert memory_batch512 > memory_batch1
  # Parameters, inputs and outputs are all live during the call.
  assert memory_batch1 >= params_bytes + (64 + 32) * 4
  assert memory_batch512 >= params_bytes + 512 * (64 + 32) * 4


def test_forward_peak_memory_unavailable(monkeypatch):
  monkeypatch.setattr(
      jax.stages.Compiled, "memory_analysis", lambda self: None
  )
  apply_fn, params = _linear_apply_fn()

  memory = evaluation.forward_peak_memory_bytes(
      apply_fn, params, jnp.ones((1, 16))
  )

  assert memory == -1


def test_profile_model_keys_and_units():
  apply_fn, params = _linear_apply_fn()

  profile = evaluation.profile_model(
      apply_fn, params, jnp.ones((1, 16)), jnp.ones((32, 16)),
      warmup=1, repeats=3,
  )

  assert profile["parameters"] == 16 * 8 + 8
  assert profile["batch_size_N"] == 32
  assert profile["latency_batch1_ms"] > 0
  assert profile["latency_batchN_ms"] > 0
  assert profile["peak_memory_batchN_bytes"] > profile[
      "peak_memory_batch1_bytes"
  ]
  assert profile["peak_memory_batch1_mib"] == pytest.approx(
      profile["peak_memory_batch1_bytes"] / 2**20
  )


def _example_report():
  return {
      "recipe": "mnist_mlp",
      "dataset": "mnist",
      "seed": np.int64(3),
      "models": {
          "teacher": {
              "test_accuracy": np.float32(0.9912),
              "parameters": np.int64(200_000),
              "latency_batch1_ms": 2.0,
              "peak_memory_batchN_mib": 8.0,
          },
          "distilled_student": {
              "test_accuracy": 0.9812,
              "top1_agreement_with_teacher": 0.975,
              "kl_teacher_student": jnp.float32(0.125),
              "parameters": 20_000,
              "latency_batch1_ms": 0.5,
              "peak_memory_batchN_mib": 2.0,
              "optimizer_name": "adamw",
          },
          "baseline_student": {
              "test_accuracy": 0.9712,
              "parameters": 20_000,
              "latency_curve": np.arange(3),
              "nan_metric": float("nan"),
          },
      },
      "distillation": {"temperature": 4.0, "alpha": np.float64(0.5)},
      "timings": {"teacher_train_s": 12.5, "student_train_s": 3.25},
  }


def test_write_report_json_round_trip(tmp_path):
  report = _example_report()

  json_path, markdown_path = evaluation.write_report(tmp_path, report)

  assert json_path == os.path.join(tmp_path, "report.json")
  assert markdown_path == os.path.join(tmp_path, "report.md")
  with open(json_path) as f:
    loaded = json.load(f)
  teacher = loaded["models"]["teacher"]
  baseline = loaded["models"]["baseline_student"]
  assert loaded["seed"] == 3
  assert teacher["test_accuracy"] == pytest.approx(0.9912)
  assert teacher["parameters"] == 200_000
  assert loaded["models"]["distilled_student"]["kl_teacher_student"] == 0.125
  assert baseline["latency_curve"] == [0, 1, 2]
  assert baseline["nan_metric"] is None
  assert loaded["distillation"] == {"temperature": 4.0, "alpha": 0.5}
  assert loaded["timings"] == report["timings"]


def test_write_report_markdown_table(tmp_path):
  _, markdown_path = evaluation.write_report(tmp_path, _example_report())
  with open(markdown_path) as f:
    markdown = f.read()
  lines = markdown.splitlines()

  assert lines[0] == "# Distillation report: mnist_mlp on mnist"
  header = next(line for line in lines if line.startswith("| Model |"))
  assert "Test accuracy" in header
  assert "Parameters" in header
  # Unknown model keys become extra columns.
  assert "optimizer_name" in header
  assert "latency_curve" in header

  rows = {
      line.split("|")[1].strip(): line
      for line in lines
      if line.startswith("| ")
      and not line.startswith(("| Model", "| ---"))
  }
  assert set(rows) == {"teacher", "distilled_student", "baseline_student"}
  assert "99.12%" in rows["teacher"]
  assert "98.12%" in rows["distilled_student"]
  assert "200,000" in rows["teacher"]
  assert "–" in rows["teacher"]
  assert "adamw" in rows["distilled_student"]

  # Row order: teacher, distilled student, baseline student.
  row_lines = [line for line in lines if line in rows.values()]
  assert row_lines == [
      rows["teacher"], rows["distilled_student"], rows["baseline_student"]
  ]
  assert "## Distillation hyperparameters" in markdown
  assert "- **temperature**: 4" in markdown
  assert "## Timings" in markdown
  assert "- **teacher_train_s**: 12.5" in markdown


def test_write_report_comparison_section(tmp_path):
  report = _example_report()
  report["comparison"] = evaluation.compare_models(report["models"])

  _, markdown_path = evaluation.write_report(tmp_path, report)
  with open(markdown_path) as f:
    markdown = f.read()

  assert "## Comparison" in markdown
  assert "- **distilled_minus_baseline_accuracy_pp**: +1.00 pp" in markdown
  assert "- **parameter_ratio_teacher_to_student**: 10.00×" in markdown
  assert "- **speedup_batch1_teacher_to_student**: 4.00×" in markdown


def test_compare_models_values():
  comparison = evaluation.compare_models(_example_report()["models"])

  assert comparison["distilled_minus_baseline_accuracy_pp"] == pytest.approx(
      1.0
  )
  assert comparison["teacher_minus_distilled_accuracy_pp"] == pytest.approx(
      1.0, abs=1e-4
  )
  assert comparison["parameter_ratio_teacher_to_student"] == 10.0
  assert comparison["speedup_batch1_teacher_to_student"] == 4.0
  assert comparison["peak_memory_ratio_batchN_teacher_to_student"] == 4.0
  # No model has a batch-N latency, so there is no batch-N speed-up.
  assert "speedup_batchN_teacher_to_student" not in comparison


def test_write_report_replaces_atomically(tmp_path):
  evaluation.write_report(tmp_path, {"recipe": "old", "models": {}})

  evaluation.write_report(tmp_path, _example_report())

  assert sorted(os.listdir(tmp_path)) == ["report.json", "report.md"]
  with open(tmp_path / "report.json") as f:
    assert json.load(f)["recipe"] == "mnist_mlp"


def test_write_report_failed_replace_keeps_old(tmp_path, monkeypatch):
  evaluation.write_report(tmp_path, {"recipe": "old"})
  with open(tmp_path / "report.json") as f:
    old_json = f.read()

  def failing_replace(source, destination):
    raise OSError(f"simulated failure renaming {source} to {destination}")

  monkeypatch.setattr(os, "replace", failing_replace)
  with pytest.raises(OSError, match="simulated failure"):
    evaluation.write_report(tmp_path, _example_report())

  assert sorted(os.listdir(tmp_path)) == ["report.json", "report.md"]
  with open(tmp_path / "report.json") as f:
    assert f.read() == old_json


def test_write_report_rejects_unknown_type(tmp_path):
  with pytest.raises(TypeError, match=r"report\['models'\]"):
    evaluation.write_report(tmp_path, {"models": object()})
  assert not os.listdir(tmp_path)


def test_plot_learning_curves_png(tmp_path):
  path = tmp_path / "plots" / "loss.png"
  curves = {
      "distilled_student": [(0, 2.3), (100, 0.9), (200, 0.4)],
      "baseline_student": [(0, 2.3), (100, 1.1), (200, math.nan)],
  }

  written = evaluation.plot_learning_curves(
      curves, path, title="Training loss", ylabel="loss"
  )

  assert written == str(path)
  with open(path, "rb") as f:
    data = f.read()
  assert len(data) > 1000
  assert data.startswith(_PNG_MAGIC)
  assert os.listdir(path.parent) == ["loss.png"]


def test_plot_learning_curve_panels_png(tmp_path):
  path = tmp_path / "curves.png"
  panels = {
      "loss": {"student": [(0, 1.0), (10, 0.5)]},
      "accuracy": {"student": [(0, 0.1), (10, 0.8)], "teacher": []},
  }

  evaluation.plot_learning_curve_panels(panels, path, title="Curves")

  with open(path, "rb") as f:
    assert f.read(8) == _PNG_MAGIC
  assert os.listdir(tmp_path) == ["curves.png"]


def test_plot_learning_curves_invalid_input(tmp_path):
  path = tmp_path / "bad.png"
  with pytest.raises(ValueError, match="no curves"):
    evaluation.plot_learning_curves({}, path, title="t", ylabel="y")
  with pytest.raises(ValueError, match="'student'"):
    evaluation.plot_learning_curves(
        {"student": [(0, 1.0, 2.0)]}, path, title="t", ylabel="y"
    )
  assert not os.listdir(tmp_path)
