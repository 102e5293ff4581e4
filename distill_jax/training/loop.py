"""The training loop of one stage: restore, train, evaluate, checkpoint, log."""

from collections.abc import Callable, Iterator, Mapping
import dataclasses
import functools
import json
import os
import time
from typing import Any
import zlib

import jax
import numpy as np
from absl import logging
from clu import metric_writers, periodic_actions
from flax import nnx

from distill_jax import parallel
from distill_jax.checkpoints import StageCheckpointer
from distill_jax.evaluation import add_sums, finalize_sums
from distill_jax.losses import DistillationLoss
from distill_jax.training import nonfinite
from distill_jax.training import preemption
from distill_jax.training import state as state_lib
from distill_jax.training import steps
from distill_jax.training.metrics import namespaced

NonFiniteLossError = nonfinite.NonFiniteLossError


@dataclasses.dataclass(frozen=True)
class Teacher:
  """A frozen teacher: its structure and its parameters on the mesh."""
  graphdef: nnx.GraphDef
  params: nnx.State


@dataclasses.dataclass
class StageResult:
  """Outputs of a finished stage, for the next stages and the report."""
  name: str
  graphdef: nnx.GraphDef
  params: nnx.State
  steps: int
  eval_history: list[dict[str, float]]
  # Seconds spent training over every invocation of the stage; time between
  # a stage's last evaluation and an interruption is not counted.
  train_seconds: float


def _format_seconds(seconds: float) -> str:
  minutes, seconds = divmod(int(round(seconds)), 60)
  return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def evaluate(
    student_graphdef: nnx.GraphDef,
    student_params: nnx.State,
    teacher: Teacher | None,
    eval_batches: Callable[[], Iterator[Mapping[str, np.ndarray]]],
    mesh: jax.sharding.Mesh,
) -> dict[str, float]:
  """Evaluate on every batch of `eval_batches()`; returns accuracy, agreement and KL."""
  eval_fn = _jitted_eval_step(student_graphdef, teacher.graphdef if teacher else None)
  teacher_params = teacher.params if teacher else None

  sums = None
  for local_batch in eval_batches():
    batch = parallel.global_batch_from_local(local_batch, mesh)
    batch_sums = eval_fn(student_params, teacher_params, batch)
    sums = add_sums(sums, batch_sums)
  return finalize_sums(jax.device_get(sums))


@functools.lru_cache(maxsize=16)
def _jitted_eval_step(student_graphdef, teacher_graphdef):
  return jax.jit(functools.partial(
      steps.eval_step, student_graphdef=student_graphdef, teacher_graphdef=teacher_graphdef))


class _History:
  """Evaluation results of a stage, kept in a JSON-lines file that survives restarts."""

  def __init__(self, path: str):
    self.path = path
    self.records: list[dict[str, float]] = []
    if os.path.exists(path):
      with open(path) as f:
        self.records = [json.loads(line) for line in f if line.strip()]

  def truncate(self, step: int) -> None:
    """Drop records after `step`, the step a resumed run restarts from."""
    self.records = [r for r in self.records if r["step"] <= step]
    self._rewrite()

  def append(self, record: dict[str, float]) -> None:
    self.records = [r for r in self.records if r["step"] != record["step"]] + [record]
    self._rewrite()

  def _rewrite(self) -> None:
    temporary_path = self.path + ".tmp"
    with open(temporary_path, "w") as f:
      for record in self.records:
        f.write(json.dumps(record) + "\n")
    os.replace(temporary_path, self.path)


def stage_seed(seed: int, name: str) -> int:
  """Derive the seed of stage `name`; it is the same across runs and processes."""
  return (seed * 1_000_003 + zlib.crc32(name.encode())) & 0x7FFFFFFF


class StageTrainer:
  """Trains one model for `train_config.steps` steps, resuming from its checkpoints.

  Checkpoints go to WORKDIR/checkpoints/NAME, TensorBoard logs to
  WORKDIR/tensorboard/NAME and evaluation results to
  WORKDIR/NAME_eval_history.jsonl.
  """

  def __init__(
      self,
      name: str,
      *,
      model: nnx.Module,
      train_config: Mapping[str, Any],
      config: Mapping[str, Any],
      workdir: str,
      mesh: jax.sharding.Mesh,
      make_train_iterator: Callable[[int, int], Any],
      eval_batches: Callable[[], Iterator[Mapping[str, np.ndarray]]],
      teacher: Teacher | None = None,
      distillation_loss: DistillationLoss | None = None,
      eval_teacher: Teacher | None = None,
      step_fn: Callable[..., Any] | None = None,
      evaluate_fn: Callable[[nnx.GraphDef, nnx.State], dict[str, float]] | None = None,
      tokens_per_example: int | None = None,
  ):
    """Build the jitted step, the data iterator and the checkpointer.

    Args:
      name: stage name, used in paths, logs and random keys.
      model: the model to train, with its initial parameters.
      train_config: steps, batch size, optimizer and schedule.
      config: the whole run config (seed, logging, checkpoint and eval periods).
      workdir: the run's working directory.
      mesh: device mesh of the run.
      make_train_iterator: returns a checkpointable iterator of host batches
        for (global batch size, seed).
      eval_batches: returns a fresh pass over the test split in fixed-size,
        masked batches.
      teacher: the frozen teacher to distill from, or None to train on labels.
      distillation_loss: the loss used with a teacher.
      eval_teacher: a teacher to compare with during evaluation only (for
        agreement and KL curves of the baseline); defaults to `teacher`.
      step_fn: a pure train step `step_fn(state, teacher_params, batch, rng, *,
        student_graphdef, optimizer, schedule)` with its other settings
        already bound; defaults to the classification `steps.train_step`.
      evaluate_fn: returns evaluation results for (graphdef, params); defaults
        to classification accuracy, agreement and KL on `eval_batches`.
      tokens_per_example: tokens in one example, to log `perf/tokens_per_second`.
    """
    self.name = name
    self.mesh = mesh
    self.teacher = teacher
    self.eval_teacher = eval_teacher if eval_teacher is not None else teacher
    self.eval_batches = eval_batches
    self.total_steps = int(train_config["steps"])
    self.batch_size = int(train_config["batch_size"])
    self.log_every = int(config["log_every_steps"])
    self.eval_every = int(config["eval_every_steps"])
    self.checkpoint_every = int(config["checkpoint"]["every_steps"])
    self.nonfinite_policy = config.get("nonfinite_policy", "halt")
    self.workdir = workdir
    seed = stage_seed(int(config["seed"]), name)

    self.graphdef, initial_params = nnx.split(model, nnx.Param)
    optimizer = state_lib.make_optimizer(train_config)
    create_state = functools.partial(state_lib.create_train_state, optimizer=optimizer)
    replicated = parallel.replicated_sharding(mesh)
    self.state_sharding = jax.tree.map(lambda _: replicated, jax.eval_shape(create_state,
                                                                            initial_params))
    self.state = jax.jit(create_state, out_shardings=self.state_sharding)(initial_params)

    schedule = state_lib.make_learning_rate_schedule(train_config)
    if step_fn is None:
      step_fn = functools.partial(
          steps.train_step,
          teacher_graphdef=teacher.graphdef if teacher else None,
          distillation_loss=distillation_loss,
          augment=bool(train_config["augment"]))
    self.evaluate_fn = evaluate_fn
    self.tokens_per_example = tokens_per_example
    self.step_fn = jax.jit(
        functools.partial(step_fn, student_graphdef=self.graphdef, optimizer=optimizer,
                          schedule=schedule),
        in_shardings=(self.state_sharding, replicated, parallel.batch_sharding(mesh), replicated),
        out_shardings=(self.state_sharding, replicated),
        donate_argnums=(0,),
    )
    self.rng = jax.device_put(jax.random.key(seed), replicated)

    self._make_data_iterator = functools.partial(make_train_iterator, self.batch_size, seed)
    self.data_iterator = self._make_data_iterator()
    checkpoint_config = config["checkpoint"]
    self.checkpointer = StageCheckpointer(os.path.join(workdir, "checkpoints", name),
                                          max_to_keep=int(checkpoint_config["max_to_keep"]),
                                          async_save=bool(checkpoint_config["async_save"]))
    self.history = _History(os.path.join(workdir, f"{name}_eval_history.jsonl"))
    self.writer = metric_writers.create_default_writer(
        os.path.join(workdir, "tensorboard", name), just_logging=jax.process_index() > 0,
        asynchronous=True)
    self.progress = periodic_actions.ReportProgress(
        num_train_steps=self.total_steps, every_steps=self.log_every, every_secs=None)
    # Training seconds of earlier invocations, up to the last evaluation at or
    # before the restored step, read back from the evaluation history.
    self.earlier_train_seconds = 0.0
    self._train_started: float | None = None
    self._reported_skips = 0
    self._skipped_steps = 0

  def restore(self) -> int:
    """Restore the newest intact checkpoint of this stage, if any; returns the step to start at."""
    start_step = 0
    had_checkpoints = self.checkpointer.latest_step() is not None
    restored = self.checkpointer.restore_latest(self.state, self.data_iterator)
    if restored is not None:
      self.state, _ = restored
      start_step = int(jax.device_get(self.state.step))
      self._reported_skips = int(jax.device_get(self.state.skipped_steps))
      logging.info("%s: resuming at step %d of %d", self.name, start_step, self.total_steps)
    elif had_checkpoints:
      # A failed restore may have moved the iterator; start the data over.
      self.data_iterator = self._make_data_iterator()
      logging.warning("%s: no intact checkpoint is left in %s; starting from step 0", self.name,
                      self.checkpointer.directory)
    self.history.truncate(start_step)
    if self.history.records:
      self.earlier_train_seconds = self.history.records[-1].get("train_seconds", 0.0)
    return start_step

  def evaluate(self, step: int) -> dict[str, float]:
    """Evaluate the current parameters on the test split and record the result."""
    with self.progress.timed("eval"):
      if self.evaluate_fn is not None:
        results = self.evaluate_fn(self.graphdef, self.state.params)
      else:
        results = evaluate(self.graphdef, self.state.params, self.eval_teacher,
                           self.eval_batches, self.mesh)
    # The model being trained is the "student" of the metric sums in every stage,
    # the teacher stage included.
    if "student_accuracy" in results:
      results["accuracy"] = results.pop("student_accuracy")
    record = {"step": step, **{f"eval/{key}": value for key, value in results.items()}}
    self.writer.write_scalars(step, {k: v for k, v in record.items()
                                     if k not in ("step", "eval/num_examples")})
    logging.info("%s step %d: %s", self.name, step,
                 ", ".join(f"{k}={v:.4f}" for k, v in record.items() if k != "step"))
    if self._train_started is not None:
      record["train_seconds"] = (self.earlier_train_seconds + time.perf_counter()
                                 - self._train_started)
    self.history.append(record)
    return record

  def _check_finite(self, step: int, metrics: Any, interval_first_step: int) -> None:
    """Apply the non-finite policy to the updates since the last check."""
    nonfinite_step, cause, skipped = (int(x) for x in jax.device_get(
        (self.state.nonfinite_step, self.state.nonfinite_cause, self.state.skipped_steps)))
    self._skipped_steps = skipped
    if nonfinite_step < 0:
      return
    if self.nonfinite_policy == "skip":
      if skipped > self._reported_skips:
        logging.warning("%s: dropped %d update(s) with NaN or Inf values up to step %d; the "
                        "first was step %d (%s)", self.name, skipped, step, nonfinite_step + 1,
                        ", ".join(nonfinite.cause_names(cause)))
        self._reported_skips = skipped
      return

    interval_metrics = ({k: float(v) for k, v in namespaced(metrics.compute()).items()}
                        if metrics is not None else {})
    last_checkpoint_step = self.checkpointer.latest_step()
    path = nonfinite.write_diagnostic(
        self.workdir, stage=self.name, step=nonfinite_step + 1, detected_at_step=step,
        cause=cause, skipped_steps=skipped, interval_metrics=interval_metrics,
        interval_first_step=interval_first_step, last_checkpoint_step=last_checkpoint_step,
        checkpoint_dir=self.checkpointer.directory)
    raise NonFiniteLossError(nonfinite.halt_message(self.name, nonfinite_step + 1, cause,
                                                    last_checkpoint_step, path))

  def _stop_signal(self, step: int) -> str | None:
    """Return the stop signal to act on after `step`, or None to go on."""
    if jax.process_count() == 1:
      return preemption.stop_requested()
    # Every process must take part, so processes compare notes at log steps only.
    return preemption.stop_requested_anywhere() if step % self.log_every == 0 else None

  def _log_train_metrics(self, step: int, metrics: Any, interval_steps: int,
                         interval_seconds: float) -> None:
    scalars = namespaced({k: float(v) for k, v in metrics.compute().items()})
    # Read by `_check_finite`, which runs before every log step.
    scalars["train/skipped_steps"] = float(self._skipped_steps)
    steps_per_second = interval_steps / max(interval_seconds, 1e-9)
    eta_seconds = (self.total_steps - step) / max(steps_per_second, 1e-9)
    scalars.update({
        "perf/steps_per_second": steps_per_second,
        "perf/examples_per_second": steps_per_second * self.batch_size,
        "perf/eta_seconds": eta_seconds,
    })
    if self.tokens_per_example:
      scalars["perf/tokens_per_second"] = (steps_per_second * self.batch_size
                                           * self.tokens_per_example)
    self.writer.write_scalars(step, scalars)
    logging.info("%s step %d/%d (%.0f%%): loss %.4f, %.2f steps/s, ETA %s", self.name, step,
                 self.total_steps, 100.0 * step / self.total_steps, scalars["train/loss"],
                 steps_per_second, _format_seconds(eta_seconds))

  def train(self, start_step: int, end_step: int | None = None) -> float:
    """Run the steps after `start_step` up to `end_step` (default: the last step).

    Returns:
      The seconds spent. A checkpoint is saved at `end_step` as at the last step.
    """
    end_step = self.total_steps if end_step is None else min(end_step, self.total_steps)
    if start_step >= self.total_steps:
      logging.info("%s: already finished (%d steps); skipping training", self.name,
                   self.total_steps)
      return 0.0
    logging.info("%s: training steps %d to %d at batch %d on mesh %s", self.name, start_step,
                 self.total_steps, self.batch_size, dict(self.mesh.shape))

    signal_name = preemption.stop_requested()
    if signal_name is not None:
      raise preemption.RunStopped(f"{self.name}: stopped before step {start_step + 1} after "
                                  f"{signal_name}; no new checkpoint was needed")
    teacher_params = self.teacher.params if self.teacher else None
    metrics = None
    started = interval_start = time.perf_counter()
    self._train_started = started
    interval_first_step = start_step
    for step in range(start_step + 1, end_step + 1):
      batch = parallel.global_batch_from_local(next(self.data_iterator), self.mesh)
      self.state, step_metrics = self.step_fn(self.state, teacher_params, batch, self.rng)
      metrics = step_metrics if metrics is None else metrics.merge(step_metrics)
      self.progress(step)

      is_last = step == end_step
      signal_name = self._stop_signal(step)
      should_log = step % self.log_every == 0 or is_last or signal_name is not None
      should_save = step % self.checkpoint_every == 0 or is_last or signal_name is not None
      if should_log or should_save:
        self._check_finite(step, metrics, interval_first_step)
      if should_log:
        now = time.perf_counter()
        self._log_train_metrics(step, metrics, step - interval_first_step, now - interval_start)
        metrics, interval_start, interval_first_step = None, now, step
      if step % self.eval_every == 0 or is_last:
        self.evaluate(step)
      if should_save:
        self.checkpointer.save(step, self.state, self.data_iterator)
      if signal_name is not None:
        self.checkpointer.wait_until_finished()
        raise preemption.RunStopped(
            f"{self.name}: stopped at step {step} of {self.total_steps} after {signal_name}; "
            f"the checkpoint of step {step} is saved in {self.checkpointer.directory}")
    self._train_started = None
    return time.perf_counter() - started

  def close(self) -> None:
    """Wait for pending checkpoint writes and flush the logs."""
    self.checkpointer.close()
    self.writer.flush()
    self.writer.close()


def run_stage(name: str, **kwargs) -> StageResult:
  """Train one stage to its last step (resuming if it has checkpoints) and evaluate it."""
  trainer = StageTrainer(name, **kwargs)
  try:
    start_step = trainer.restore()
    train_seconds = trainer.earlier_train_seconds + trainer.train(start_step)
    if not trainer.history.records or trainer.history.records[-1]["step"] != trainer.total_steps:
      trainer.evaluate(trainer.total_steps)
  finally:
    trainer.close()
  # The last evaluation's count, when there is one, is what a rerun reads back.
  train_seconds = trainer.history.records[-1].get("train_seconds", train_seconds)
  return StageResult(name=name, graphdef=trainer.graphdef, params=trainer.state.params,
                     steps=trainer.total_steps, eval_history=trainer.history.records,
                     train_seconds=train_seconds)
