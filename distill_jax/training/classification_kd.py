"""The classification KD recipe: teacher, distilled student and baseline, then the report.

Three stages run in one command, each resumable from its own checkpoints:
  1. teacher: train the teacher on hard labels, or restore it from
     `config.teacher.checkpoint_dir`;
  2. distill: train the student against the frozen teacher;
  3. baseline: train the same student, from the same initial parameters,
     on hard labels for the same number of steps.
"""

from collections.abc import Mapping
import functools
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging
from flax import nnx

from distill_jax import data as data_lib
from distill_jax import evaluation
from distill_jax import parallel
from distill_jax.checkpoints import restore_params
from distill_jax.errors import ConfigError
from distill_jax.losses import DistillationLoss
from distill_jax.models import build_model
from distill_jax.training import state as state_lib
from distill_jax.training import loop
from distill_jax.training import workdir as workdir_lib


# Profile fields shown per model; p90 latencies and byte counts stay out of the table.
_PROFILE_KEYS = ("parameters", "latency_batch1_ms", "latency_batchN_ms", "batch_size_N",
                 "peak_memory_batch1_mib", "peak_memory_batchN_mib")


def _build(model_config: Mapping[str, Any], splits: Any, seed: int) -> nnx.Module:
  return build_model(model_config, tuple(splits.image_shape), splits.num_classes, seed)


def _prepare_sources(splits: Any, data_config: Mapping[str, Any]) -> tuple[Any, Any]:
  """Return the train and test sources, in memory if configured, the test split capped."""
  train_source, test_source = splits.train, splits.test
  if data_config["in_memory"]:
    train_source = data_lib.load_into_memory(train_source)
    test_source = data_lib.load_into_memory(test_source)

  max_eval_examples = int(data_config["max_eval_examples"])
  if 0 < max_eval_examples < len(test_source):
    if not isinstance(test_source, data_lib.InMemorySource):
      test_source = data_lib.load_into_memory(test_source)
    test_source = data_lib.InMemorySource(
        test_source.images[:max_eval_examples], test_source.labels[:max_eval_examples],
        f"{test_source.name}[:{max_eval_examples}]")
  return train_source, test_source


def _restore_teacher(config: Mapping[str, Any], splits: Any,
                     mesh: jax.sharding.Mesh) -> loop.StageResult:
  """Load a finished teacher stage from `config.teacher.checkpoint_dir`."""
  directory = config["teacher"]["checkpoint_dir"]
  model = _build(config["teacher"]["model"], splits, config["seed"])
  graphdef, params = nnx.split(model, nnx.Param)
  optimizer = state_lib.make_optimizer(config["teacher"]["train"])
  target = state_lib.create_train_state(params, optimizer)
  target = jax.device_put(target, parallel.replicated_sharding(mesh))
  try:
    state, step = restore_params(directory, target)
  except FileNotFoundError:
    raise ConfigError(f"config.teacher.checkpoint_dir={directory!r} contains no checkpoint; point "
                      "it at WORKDIR/checkpoints/teacher of a finished run") from None
  except ValueError as error:
    raise ConfigError(
        f"the checkpoint in config.teacher.checkpoint_dir={directory!r} does not match "
        f"config.teacher.model: {' '.join(str(error).split())[:300]}; use the teacher model "
        "config of the run that saved it") from None
  return loop.StageResult(name="teacher", graphdef=graphdef, params=state.params, steps=step,
                          eval_history=[], train_seconds=0.0)


def _profile(result: loop.StageResult, splits: Any, config: Mapping[str, Any]) -> dict[str, Any]:
  """Parameters, latency and peak memory of one model's forward pass."""
  apply_fn = functools.partial(_apply, result.graphdef)
  image_shape = tuple(splits.image_shape)
  batch1 = jnp.zeros((1, *image_shape), jnp.float32)
  batch_n = jnp.zeros((int(config["report"]["large_batch_size"]), *image_shape), jnp.float32)
  params = jax.device_get(result.params)
  profile = evaluation.profile_model(apply_fn, params, batch1, batch_n,
                                     repeats=int(config["report"]["latency_repeats"]))
  return {key: profile[key] for key in _PROFILE_KEYS}


def _apply(graphdef: nnx.GraphDef, params: nnx.State, images: jax.Array) -> jax.Array:
  return nnx.merge(graphdef, params)(images)


def _model_entry(result: loop.StageResult, test_metrics: Mapping[str, float],
                 profile: Mapping[str, Any], with_teacher: bool) -> dict[str, Any]:
  entry = {"test_accuracy": test_metrics["student_accuracy"], "train_steps": result.steps}
  if with_teacher:
    entry["top1_agreement_with_teacher"] = test_metrics["top1_agreement"]
    entry["kl_teacher_student"] = test_metrics["kl_teacher_student"]
  entry.update(profile)
  return entry


def run(config: Any, workdir: str, overwrite: bool = False) -> dict[str, Any]:
  """Run all stages of the recipe in `workdir` and write the report; returns it.

  With `overwrite`, a run of a different config found in `workdir` is deleted first.
  """
  started = time.perf_counter()
  workdir = workdir_lib.prepare_workdir(
      workdir, config.to_json_best_effort(indent=2, sort_keys=True),
      write=jax.process_index() == 0, overwrite=overwrite)

  mesh = parallel.make_mesh(config["mesh"])
  data_config = config["data"]
  splits = data_lib.load_image_splits(
      source=data_config["source"],
      data_dir=os.path.expanduser(data_config["data_dir"]),
      fashion_mnist_dir=data_config["fashion_mnist_dir"])
  train_source, test_source = _prepare_sources(splits, data_config)
  logging.info("data: %s from source %s, %d train and %d test examples", splits.name,
               splits.source, len(train_source), len(test_source))

  def make_train_iterator(batch_size: int, seed: int):
    loader = data_lib.make_train_loader(train_source, batch_size, seed,
                                        worker_count=int(data_config["worker_count"]))
    return iter(loader)

  eval_batches = functools.partial(data_lib.iterate_eval_batches, test_source,
                                   int(data_config["eval_batch_size"]))
  stage_args = dict(config=config, workdir=workdir, mesh=mesh,
                    make_train_iterator=make_train_iterator, eval_batches=eval_batches)
  timings = {}

  if config["teacher"]["checkpoint_dir"]:
    teacher_result = _restore_teacher(config, splits, mesh)
  else:
    teacher_result = loop.run_stage(
        "teacher", model=_build(config["teacher"]["model"], splits, config["seed"]),
        train_config=config["teacher"]["train"], **stage_args)
  teacher = loop.Teacher(graphdef=teacher_result.graphdef, params=teacher_result.params)
  timings["teacher_train_seconds"] = teacher_result.train_seconds

  distill_config = config["distill"]
  distillation_loss = DistillationLoss(
      divergence=distill_config["divergence"], temperature=float(distill_config["temperature"]),
      alpha=float(distill_config["alpha"]), beta=float(distill_config["beta"]))
  student_seed = int(config["seed"]) + 1

  distilled = loop.run_stage(
      "distill", model=_build(config["student"]["model"], splits, student_seed),
      train_config=config["student"]["train"], teacher=teacher,
      distillation_loss=distillation_loss, **stage_args)
  timings["distill_train_seconds"] = distilled.train_seconds

  baseline = None
  if config["run_baseline"]:
    baseline = loop.run_stage(
        "baseline", model=_build(config["student"]["model"], splits, student_seed),
        train_config=config["student"]["train"], eval_teacher=teacher, **stage_args)
    timings["baseline_train_seconds"] = baseline.train_seconds

  stage_start = time.perf_counter()
  report = _build_report(config, splits, mesh, teacher_result, distilled, baseline, eval_batches)
  timings["report_seconds"] = time.perf_counter() - stage_start
  timings["this_invocation_seconds"] = time.perf_counter() - started
  report["timings"] = timings

  if jax.process_index() == 0:
    evaluation.write_report(workdir, report)
    _plot(workdir, distilled, baseline)
  logging.info("report written to %s", os.path.join(workdir, "report.md"))
  return report


def _build_report(config, splits, mesh, teacher_result, distilled, baseline,
                  eval_batches) -> dict[str, Any]:
  teacher = loop.Teacher(graphdef=teacher_result.graphdef, params=teacher_result.params)
  teacher_metrics = loop.evaluate(teacher.graphdef, teacher.params, None, eval_batches, mesh)
  models = {"teacher": {"test_accuracy": teacher_metrics["student_accuracy"],
                        "train_steps": teacher_result.steps,
                        **_profile(teacher_result, splits, config)}}

  students = [("distilled_student", distilled)]
  if baseline is not None:
    students.append(("baseline_student", baseline))
  for key, result in students:
    test_metrics = loop.evaluate(result.graphdef, result.params, teacher, eval_batches, mesh)
    models[key] = _model_entry(result, test_metrics, _profile(result, splits, config),
                               with_teacher=True)

  distill_config = config["distill"]
  return {
      "recipe": config["recipe"],
      "dataset": f"{splits.name} ({splits.source})",
      "models": models,
      "distillation": {
          "divergence": distill_config["divergence"],
          "temperature": distill_config["temperature"],
          "alpha": distill_config["alpha"],
          "beta": distill_config["beta"],
          "student_steps": int(config["student"]["train"]["steps"]),
          "student_batch_size": int(config["student"]["train"]["batch_size"]),
      },
      "comparison": evaluation.compare_models(models),
      "measurement": {
          "latency": (f"median of {int(config['report']['latency_repeats'])} jitted forward "
                      "calls after warm-up"),
          "peak_memory": "XLA's compiled memory analysis of one forward pass: arguments, "
                         "outputs and temporaries",
      },
      "environment": {
          "backend": jax.default_backend(),
          "devices": jax.device_count(),
          "processes": jax.process_count(),
          "mesh": {k: int(v) for k, v in mesh.shape.items()},
      },
  }


def _plot(workdir: str, distilled: loop.StageResult, baseline: loop.StageResult | None) -> None:
  results = [("distilled", distilled)] + ([("baseline", baseline)] if baseline else [])
  panels = {
      "test accuracy": _curves(results, "eval/accuracy"),
      "KL(teacher || student), nats": _curves(results, "eval/kl_teacher_student"),
  }
  evaluation.plot_learning_curve_panels(panels, os.path.join(workdir, "learning_curves.png"),
                                        title="Student learning curves")


def _curves(results, key: str) -> dict[str, list[tuple[int, float]]]:
  return {label: [(record["step"], record[key]) for record in result.eval_history if key in record]
          for label, result in results}
