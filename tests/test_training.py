"""The train step and the stage loop on real Fashion-MNIST batches, 8 simulated devices."""

import functools
import json
import os
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs"))

import fashion_mnist_kd  # pylint: disable=g-import-not-at-top,wrong-import-position
from distill_jax import data as data_lib  # pylint: disable=wrong-import-position
from distill_jax import parallel  # pylint: disable=wrong-import-position
from distill_jax.losses import DistillationLoss  # pylint: disable=wrong-import-position
from distill_jax.models import build_model  # pylint: disable=wrong-import-position
from distill_jax.training import loop, state as state_lib, steps  # pylint: disable=wrong-import-position


@pytest.fixture(scope="module")
def sources(fashion_mnist_splits):
  """The train split and the first 2000 test examples, in memory for speed."""
  train = data_lib.load_into_memory(fashion_mnist_splits.train)
  test = data_lib.load_into_memory(fashion_mnist_splits.test)
  test = data_lib.InMemorySource(test.images[:2000], test.labels[:2000], "test[:2000]")
  return train, test


def tiny_config():
  config = fashion_mnist_kd.get_config("tiny")
  config.checkpoint.async_save = True
  return config


def make_teacher(config, mesh) -> loop.Teacher:
  model = build_model(config.teacher.model, (28, 28, 1), 10, seed=0)
  graphdef, params = nnx.split(model, nnx.Param)
  return loop.Teacher(graphdef, jax.device_put(params, parallel.replicated_sharding(mesh)))


def make_trainer(name, config, workdir, sources, mesh, teacher=None) -> loop.StageTrainer:
  train, test = sources

  def make_train_iterator(batch_size, seed):
    return iter(data_lib.make_train_loader(train, batch_size, seed))

  eval_batches = functools.partial(data_lib.iterate_eval_batches, test, 1000)
  loss = DistillationLoss(divergence="forward_kl", temperature=2.0, alpha=0.5) if teacher else None
  return loop.StageTrainer(
      name, model=build_model(config.student.model, (28, 28, 1), 10, seed=1),
      train_config=config.student.train, config=config, workdir=str(workdir), mesh=mesh,
      make_train_iterator=make_train_iterator, eval_batches=eval_batches, teacher=teacher,
      distillation_loss=loss)


def leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def test_simulated_devices_present():
  assert jax.device_count() == 8


def test_sharded_step_equals_unsharded(sources):
  config = tiny_config()
  sharded_mesh = parallel.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  single_mesh = parallel.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  assert sharded_mesh.shape["data"] == 8

  batch = next(iter(data_lib.make_train_loader(sources[0], 32, seed=0)))
  results = []
  for mesh in (sharded_mesh, single_mesh):
    teacher = make_teacher(config, mesh)
    student = build_model(config.student.model, (28, 28, 1), 10, seed=1)
    graphdef, params = nnx.split(student, nnx.Param)
    optimizer = state_lib.make_optimizer(config.student.train)
    state = state_lib.create_train_state(params, optimizer)
    step_fn = jax.jit(functools.partial(
        steps.train_step, student_graphdef=graphdef, teacher_graphdef=teacher.graphdef,
        optimizer=optimizer, schedule=state_lib.make_learning_rate_schedule(config.student.train),
        distillation_loss=DistillationLoss(temperature=2.0, alpha=0.5), augment=True))
    global_batch = parallel.global_batch_from_local(batch, mesh)
    assert len(global_batch["image"].sharding.device_set) == mesh.size
    new_state, metrics = step_fn(state, teacher.params, global_batch, jax.random.key(0))
    results.append((leaves(new_state.params), float(metrics.compute()["loss"])))

  (sharded_params, sharded_loss), (single_params, single_loss) = results
  assert sharded_loss == pytest.approx(single_loss, rel=1e-5)
  for sharded, single in zip(sharded_params, single_params):
    np.testing.assert_allclose(sharded, single, rtol=1e-5, atol=1e-6)


def test_teacher_unchanged_after_distillation(sources, tmp_path):
  config = tiny_config()
  mesh = parallel.make_mesh(config.mesh)
  teacher = make_teacher(config, mesh)
  before = leaves(teacher.params)

  trainer = make_trainer("distill", config, tmp_path, sources, mesh, teacher)
  student_before = leaves(trainer.state.params)
  try:
    trainer.train(trainer.restore())
  finally:
    trainer.close()

  after = leaves(teacher.params)
  assert len(before) == len(after)
  for old, new in zip(before, after):
    np.testing.assert_array_equal(old, new)
  changed = [not np.array_equal(a, b) for a, b in zip(student_before, leaves(trainer.state.params))]
  assert all(changed)


def test_teacher_receives_no_gradient(sources):
  config = tiny_config()
  mesh = parallel.make_mesh(config.mesh)
  teacher = make_teacher(config, mesh)
  student = build_model(config.student.model, (28, 28, 1), 10, seed=1)
  graphdef, params = nnx.split(student, nnx.Param)
  batch = next(iter(data_lib.make_train_loader(sources[0], 32, seed=0)))
  loss = DistillationLoss(temperature=2.0, alpha=0.5)

  def total_loss(teacher_params):
    teacher_logits = jax.lax.stop_gradient(
        steps.apply_model(teacher.graphdef, teacher_params, batch["image"]))
    student_logits = steps.apply_model(graphdef, params, batch["image"])
    return loss(student_logits, teacher_logits, batch["label"]).total.mean()

  teacher_grads = jax.grad(total_loss)(teacher.params)
  for grad in leaves(teacher_grads):
    assert not np.any(grad)


def test_no_recompilation_after_first_step(sources, tmp_path, monkeypatch):
  config = tiny_config()
  mesh = parallel.make_mesh(config.mesh)
  monkeypatch.setattr(steps, "train_step", chex.assert_max_traces(steps.train_step, n=1))
  trainer = make_trainer("distill", config, tmp_path, sources, mesh,
                         make_teacher(config, mesh))
  try:
    # Six steps, with logging, evaluation and checkpoints in between; a second
    # trace raises AssertionError.
    trainer.train(trainer.restore())
  finally:
    trainer.close()
  assert int(trainer.state.step) == config.student.train.steps


def test_resume_equals_uninterrupted_run(sources, tmp_path):
  config = tiny_config()
  mesh = parallel.make_mesh(config.mesh)
  teacher = make_teacher(config, mesh)
  total = config.student.train.steps

  uninterrupted = make_trainer("distill", config, tmp_path / "full", sources, mesh,
                               teacher)
  try:
    uninterrupted.train(uninterrupted.restore())
  finally:
    uninterrupted.close()

  first = make_trainer("distill", config, tmp_path / "resumed", sources, mesh, teacher)
  try:
    first.train(first.restore(), end_step=total // 2)
  finally:
    first.close()
  second = make_trainer("distill", config, tmp_path / "resumed", sources, mesh, teacher)
  try:
    start = second.restore()
    assert start == total // 2
    second.train(start)
  finally:
    second.close()

  assert int(second.state.step) == total
  for expected, actual in zip(leaves(uninterrupted.state.params), leaves(second.state.params)):
    np.testing.assert_array_equal(expected, actual)
  for expected, actual in zip(leaves(uninterrupted.state.opt_state), leaves(second.state.opt_state)):
    np.testing.assert_array_equal(expected, actual)


def test_nonfinite_loss_stops_and_names_step(sources, tmp_path):
  config = tiny_config()
  config.student.train.learning_rate = 1e30
  config.student.train.grad_clip_norm = 0.0
  mesh = parallel.make_mesh(config.mesh)
  trainer = make_trainer("baseline", config, tmp_path, sources, mesh)
  try:
    with pytest.raises(loop.NonFiniteLossError, match=r"NaN or Inf at step \d+"):
      trainer.train(trainer.restore())
  finally:
    trainer.close()

  params = leaves(trainer.state.params)
  assert all(np.all(np.isfinite(p)) for p in params)
  saved = os.listdir(tmp_path / "checkpoints" / "baseline")
  assert all(name.isdigit() is False or int(name) < config.log_every_steps for name in saved)


def test_eval_history_written(sources, tmp_path):
  config = tiny_config()
  mesh = parallel.make_mesh(config.mesh)
  result = loop.run_stage(
      "baseline", model=build_model(config.student.model, (28, 28, 1), 10, seed=1),
      train_config=config.student.train, config=config, workdir=str(tmp_path), mesh=mesh,
      make_train_iterator=lambda b, s: iter(data_lib.make_train_loader(sources[0], b, s)),
      eval_batches=functools.partial(data_lib.iterate_eval_batches, sources[1], 1000))
  with open(tmp_path / "baseline_eval_history.jsonl") as f:
    records = [json.loads(line) for line in f]
  assert [r["step"] for r in records] == [3, 6]
  assert records == result.eval_history
  assert 0.0 < records[0]["train_seconds"] < records[1]["train_seconds"]
  assert result.train_seconds >= records[1]["train_seconds"]
  assert 0.0 <= records[-1]["eval/accuracy"] <= 1.0
