"""Damaged checkpoints, non-finite steps and stop requests, in-process on 8 simulated devices."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl import logging

from distill_jax.checkpoints import NonFiniteStateError
from distill_jax.training import loop, preemption
from distill_jax.training import state as state_lib
from distill_jax import parallel
from test_training import leaves, make_trainer, sources, tiny_config  # pylint: disable=unused-import  # noqa: F401


def train_stage(config, workdir, sources, mesh, teacher=None, end_step=None):
  trainer = make_trainer("distill", config, workdir, sources, mesh, teacher)
  try:
    trainer.train(trainer.restore(), end_step=end_step)
  finally:
    trainer.close()
  return trainer


def largest_file(directory):
  paths = [os.path.join(root, name) for root, _, names in os.walk(directory) for name in names]
  return max(paths, key=os.path.getsize)


def flip_byte(directory):
  path = largest_file(os.path.join(directory, "state"))
  data = bytearray(open(path, "rb").read())
  data[len(data) // 2] ^= 0x40
  open(path, "wb").write(bytes(data))


def truncate_file(directory):
  path = largest_file(os.path.join(directory, "state"))
  size = os.path.getsize(path)
  with open(path, "r+b") as f:
    f.truncate(size // 2)


def delete_metadata(directory):
  os.remove(os.path.join(directory, "state", "_METADATA"))


def garble_iterator_state(directory):
  path = os.path.join(directory, "data_iterator", "process_0-of-1.json")
  with open(path, "w") as f:
    f.write("{not json")


def change_checksums(directory):
  path = os.path.join(directory, "integrity", "metadata")
  with open(path) as f:
    record = json.load(f)
  name = sorted(record["checksums"])[0]
  record["checksums"][name] = (record["checksums"][name] + 1) % 2**32
  with open(path, "w") as f:
    json.dump(record, f)


DAMAGE = {
    "flipped_byte": flip_byte,
    "truncated_array_file": truncate_file,
    "missing_metadata": delete_metadata,
    "garbled_iterator_state": garble_iterator_state,
    "changed_checksum": change_checksums,
}


class LogCapture(logging.logging.Handler):

  def __init__(self):
    super().__init__()
    self.messages = []

  def emit(self, record):
    self.messages.append(record.getMessage())


@pytest.fixture
def captured_logs():
  handler = LogCapture()
  logging.get_absl_logger().addHandler(handler)
  yield handler.messages
  logging.get_absl_logger().removeHandler(handler)


@pytest.fixture(scope="module")
def uninterrupted(sources, tmp_path_factory):
  config = tiny_config()
  mesh = parallel.make_mesh(config.mesh)
  trainer = train_stage(config, tmp_path_factory.mktemp("uninterrupted"), sources, mesh)
  return leaves(trainer.state.params)


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_checkpoint_skipped(damage, sources, uninterrupted, tmp_path, captured_logs):
  config = tiny_config()
  mesh = parallel.make_mesh(config.mesh)
  total = config.student.train.steps
  train_stage(config, tmp_path, sources, mesh)
  directory = tmp_path / "checkpoints" / "distill"
  assert sorted(int(name) for name in os.listdir(directory)) == [3, 6]
  DAMAGE[damage](str(directory / "6"))

  trainer = make_trainer("distill", config, tmp_path, sources, mesh)
  try:
    start = trainer.restore()
    assert start == 3
    trainer.train(start)
  finally:
    trainer.close()

  skipped = [m for m in captured_logs if m.startswith("skipped the checkpoint of step 6")]
  assert len(skipped) == 1, captured_logs
  assert os.path.isdir(tmp_path / "checkpoints" / "distill_skipped" / "6")
  assert int(trainer.state.step) == total
  for expected, actual in zip(uninterrupted, leaves(trainer.state.params)):
    np.testing.assert_array_equal(expected, actual)


def test_every_checkpoint_damaged_starts_over(sources, uninterrupted, tmp_path, captured_logs):
  config = tiny_config()
  mesh = parallel.make_mesh(config.mesh)
  train_stage(config, tmp_path, sources, mesh)
  directory = tmp_path / "checkpoints" / "distill"
  for step in ("3", "6"):
    change_checksums(str(directory / step))

  trainer = make_trainer("distill", config, tmp_path, sources, mesh)
  try:
    start = trainer.restore()
    assert start == 0
    trainer.train(start)
  finally:
    trainer.close()

  assert any("no intact checkpoint is left" in m for m in captured_logs), captured_logs
  assert sorted(os.listdir(tmp_path / "checkpoints" / "distill_skipped")) == ["3", "6"]
  for expected, actual in zip(uninterrupted, leaves(trainer.state.params)):
    np.testing.assert_array_equal(expected, actual)


def test_unfinished_save_never_restored(sources, tmp_path):
  config = tiny_config()
  mesh = parallel.make_mesh(config.mesh)
  train_stage(config, tmp_path, sources, mesh, end_step=3)
  directory = tmp_path / "checkpoints" / "distill"
  # What a save cut short leaves behind: the step under a temporary name.
  unfinished = directory / "6.orbax-checkpoint-tmp"
  shutil.copytree(directory / "3", unfinished)

  trainer = make_trainer("distill", config, tmp_path, sources, mesh)
  try:
    assert trainer.restore() == 3
  finally:
    trainer.close()
  assert not unfinished.exists()


def test_nonfinite_state_never_saved(sources, tmp_path):
  config = tiny_config()
  mesh = parallel.make_mesh(config.mesh)
  trainer = make_trainer("distill", config, tmp_path, sources, mesh)
  try:
    trainer.train(trainer.restore(), end_step=3)
    trainer.checkpointer.wait_until_finished()
    poisoned = trainer.state.replace(
        params=jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan), trainer.state.params))
    with pytest.raises(NonFiniteStateError, match=r"state of step 4 contains NaN or Inf in .*"
                       r"so it was not saved; the checkpoint of step 3 is the newest"):
      trainer.checkpointer.save(4, poisoned, trainer.data_iterator)
  finally:
    trainer.close()
  assert sorted(os.listdir(tmp_path / "checkpoints" / "distill")) == ["3"]


def poison_steps(trainer, steps):
  """Make the images of the given 1-based steps NaN, so that their loss and gradient are NaN."""
  original_step_fn = trainer.step_fn

  def step_fn(state, teacher_params, batch, rng):
    if int(jax.device_get(state.step)) + 1 in steps:
      batch = {**batch, "image": batch["image"] * jnp.nan}
    return original_step_fn(state, teacher_params, batch, rng)

  trainer.step_fn = step_fn


def test_halt_policy_writes_diagnostic(sources, tmp_path):
  config = tiny_config()
  config.checkpoint.every_steps = 1
  mesh = parallel.make_mesh(config.mesh)
  trainer = make_trainer("distill", config, tmp_path, sources, mesh)
  poison_steps(trainer, {3})
  try:
    with pytest.raises(loop.NonFiniteLossError,
                       match=r"distill: the loss, gradient and updated parameters became NaN or Inf at step 3; the "
                       r"checkpoint of step 2 is kept, and .*nonfinite_distill.json lists"):
      trainer.train(trainer.restore())
  finally:
    trainer.close()

  with open(tmp_path / "nonfinite_distill.json") as f:
    diagnostic = json.load(f)
  assert diagnostic["step"] == 3
  assert diagnostic["nonfinite"] == ["loss", "gradient", "updated parameters"]
  assert diagnostic["last_checkpoint_step"] == 2
  assert diagnostic["interval"] == [3, 3]
  assert "train/loss" in diagnostic["nonfinite_metrics"]
  assert diagnostic["interval_metrics"]["train/loss"] == "nan"
  assert sorted(os.listdir(tmp_path / "checkpoints" / "distill")) == ["1", "2"]
  assert all(np.all(np.isfinite(p)) for p in leaves(trainer.state.params))


def test_skip_policy_counts_dropped_steps(sources, tmp_path, captured_logs):
  config = tiny_config()
  config.nonfinite_policy = "skip"
  mesh = parallel.make_mesh(config.mesh)
  trainer = make_trainer("distill", config, tmp_path, sources, mesh)
  poison_steps(trainer, {3, 5})
  try:
    trainer.train(trainer.restore())
  finally:
    trainer.close()

  assert int(trainer.state.step) == config.student.train.steps
  assert int(trainer.state.skipped_steps) == 2
  assert int(trainer.state.nonfinite_step) == 2
  assert any(m.startswith("distill: dropped 1 update(s) with NaN or Inf values up to step 3")
             for m in captured_logs), captured_logs
  assert any(m.startswith("distill: dropped 2 update(s) with NaN or Inf values up to step 6")
             for m in captured_logs), captured_logs
  assert sorted(int(n) for n in os.listdir(tmp_path / "checkpoints" / "distill")) == [3, 6]
  assert all(np.all(np.isfinite(p)) for p in leaves(trainer.state.params))
  assert not (tmp_path / "nonfinite_distill.json").exists()


def test_overflowing_update_not_applied():
  params = {"w": jnp.ones((3,), jnp.float32)}
  optimizer = optax.sgd(1e39)
  state = state_lib.create_train_state(params, optimizer)
  grads = {"w": jnp.ones((3,), jnp.float32)}

  new_state, _ = state_lib.apply_gradients(state, grads, jnp.float32(1.0), optimizer)

  np.testing.assert_array_equal(new_state.params["w"], params["w"])
  assert int(new_state.step) == 1
  assert int(new_state.skipped_steps) == 1
  assert int(new_state.nonfinite_step) == 0
  assert int(new_state.nonfinite_cause) == state_lib.CAUSE_PARAMS


def test_stop_request_saves_current_step(sources, uninterrupted, tmp_path):
  config = tiny_config()
  mesh = parallel.make_mesh(config.mesh)
  trainer = make_trainer("distill", config, tmp_path, sources, mesh)
  original_step_fn = trainer.step_fn

  def step_then_signal(*args):
    outputs = original_step_fn(*args)
    if int(jax.device_get(outputs[0].step)) == 4:
      preemption.request_stop("SIGTERM")
    return outputs

  trainer.step_fn = step_then_signal
  try:
    with pytest.raises(preemption.RunStopped,
                       match="distill: stopped at step 4 of 6 after SIGTERM; the checkpoint of "
                       "step 4 is saved"):
      trainer.train(trainer.restore())
  finally:
    preemption.clear()
    trainer.close()
  assert sorted(int(n) for n in os.listdir(tmp_path / "checkpoints" / "distill")) == [3, 4]

  resumed = train_stage(config, tmp_path, sources, mesh)
  for expected, actual in zip(uninterrupted, leaves(resumed.state.params)):
    np.testing.assert_array_equal(expected, actual)
