"""Stop signals and SIGKILL against the command line; resumed runs end bitwise equal."""

import glob
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import REPO_ROOT

RECIPE = "configs/fashion_mnist_kd.py"
STEPS = 60
# A two-stage run that saves often, so that kills land in and between saves.
RUN_FLAGS = (f"--config.teacher.train.steps={STEPS}", f"--config.student.train.steps={STEPS}",
             "--config.checkpoint.every_steps=4", "--config.log_every_steps=2",
             "--config.eval_every_steps=20", "--config.run_baseline=False",
             "--config.report.latency_repeats=1", "--config.data.in_memory=False",
             "--config.mesh.data=1")


class Cli:
  """The command line in a child process, its stderr read line by line as it runs."""

  def __init__(self, workdir, tfds_data_dir, *extra_flags):
    cli_args = [f"--config={RECIPE}:tiny", f"--workdir={workdir}",
                f"--config.data.data_dir={tfds_data_dir}", *RUN_FLAGS, *extra_flags]
    # A shell may start background children with SIGINT ignored, and Python then
    # keeps ignoring it. The launcher installs Python's own handler, as a terminal
    # run would have, before it runs the command line.
    launcher = ("import runpy, signal, sys; "
                "signal.signal(signal.SIGINT, signal.default_int_handler); "
                f"sys.argv = ['distill-jax', *{cli_args!r}]; "
                "runpy.run_module('distill_jax.main', run_name='__main__')")
    # One device starts faster than the 8 simulated ones of the other tests.
    environment = {**os.environ, "XLA_FLAGS": ""}
    self.process = subprocess.Popen([sys.executable, "-c", launcher], cwd=REPO_ROOT,
                                    env=environment, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, text=True)
    self.lines = []
    self._condition = threading.Condition()
    self._kill_pattern = None
    self.killed_after = None
    self._reader = threading.Thread(target=self._read, daemon=True)
    self._reader.start()

  def _read(self):
    for line in self.process.stderr:
      with self._condition:
        self.lines.append(line)
        # Kill from this thread, without waiting for the test thread to wake up,
        # so that a kill after "saving checkpoint" lands while the save runs.
        if self._kill_pattern is not None and re.search(self._kill_pattern[0], line):
          self._kill_pattern[1] -= 1
          if self._kill_pattern[1] == 0:
            self.process.kill()
            self.killed_after = line.strip()
            self._kill_pattern = None
        self._condition.notify_all()
    with self._condition:
      self._condition.notify_all()

  def kill_after(self, pattern, count):
    """SIGKILL the process as soon as it has printed `count` more lines matching `pattern`."""
    with self._condition:
      self._kill_pattern = [pattern, count]

  def wait_for(self, pattern, timeout=300):
    deadline = time.monotonic() + timeout
    with self._condition:
      while True:
        match = next((line for line in self.lines if re.search(pattern, line)), None)
        if match is not None:
          return match
        if self.process.poll() is not None and not self._reader.is_alive():
          return None
        assert time.monotonic() < deadline, f"no line matching {pattern!r} in {timeout} s"
        self._condition.wait(timeout=1.0)

  def finish(self, timeout=600):
    self.process.wait(timeout=timeout)
    self._reader.join(timeout=60)
    return self.process.returncode, "".join(self.lines)


def final_params(workdir, stage="distill"):
  """The parameters of the newest checkpoint of `stage`, read back with Orbax."""
  directory = workdir / "checkpoints" / stage
  step = max(int(name) for name in os.listdir(directory) if name.isdigit())
  state = ocp.StandardCheckpointer().restore(str(directory / str(step) / "state"))
  flat = {}
  for path, value in _flatten(state["params"]):
    flat[path] = np.asarray(value)
  return step, flat


def _flatten(tree, prefix=""):
  if isinstance(tree, dict):
    for key, value in sorted(tree.items()):
      yield from _flatten(value, f"{prefix}/{key}")
  else:
    yield prefix, tree


def assert_bitwise_equal(expected, actual):
  assert expected[0] == actual[0] == STEPS
  assert sorted(expected[1]) == sorted(actual[1])
  for name, value in expected[1].items():
    other = actual[1][name]
    assert value.dtype == other.dtype, name
    assert value.shape == other.shape, name
    assert value.tobytes() == other.tobytes(), f"{name} differs"


@pytest.fixture(scope="module")
def reference(tfds_data_dir, tmp_path_factory):
  """Final teacher and student parameters of an uninterrupted run."""
  workdir = tmp_path_factory.mktemp("uninterrupted")
  returncode, output = Cli(workdir, tfds_data_dir).finish()
  assert returncode == 0, output[-3000:]
  return final_params(workdir, "teacher"), final_params(workdir, "distill")


def unfinished_saves(workdir):
  return glob.glob(str(workdir / "checkpoints" / "*" / "*.orbax-checkpoint-tmp*"))


def newest_checkpoints(workdir):
  """The newest complete checkpoint step of each stage."""
  newest = {}
  for directory in glob.glob(str(workdir / "checkpoints" / "*")):
    steps = [int(name) for name in os.listdir(directory) if name.isdigit()]
    if steps:
      newest[os.path.basename(directory)] = max(steps)
  return newest


def stop_gracefully(cli, stop_signal):
  """Send `stop_signal` a few steps into the student's training; return the stopped step."""
  cli.wait_for(r"distill step \d+/")
  cli.process.send_signal(stop_signal)
  returncode, output = cli.finish()
  assert returncode == 0, output[-3000:]
  assert "Traceback" not in output
  last_line = output.strip().splitlines()[-1]
  stopped = re.fullmatch(rf"distill-jax: distill: stopped at step (\d+) of {STEPS} after "
                         f"{stop_signal.name}; the checkpoint of step \\d+ is saved in "
                         r"\S+; rerun the same command to resume", last_line)
  assert stopped, last_line
  return int(stopped.group(1))


def test_interrupted_run_resumes_bitwise(reference, tfds_data_dir, tmp_path):
  rng = random.Random(20261205)
  workdir = tmp_path / "run"
  kills, kills_during_save, expected_resume = [], 0, {}
  while len(kills) < 12:
    cli = Cli(workdir, tfds_data_dir)
    kind = len(kills) % 3
    if kind == 0:
      # Right after the loop hands a checkpoint to the background writer.
      cli.kill_after(r"saving checkpoint of step \d+", rng.randint(1, 2))
    elif kind == 1:
      # Between two steps, a few steps into training.
      cli.kill_after(r"(teacher|distill) step \d+/", rng.randint(1, 4))
    else:
      # At a random time: in start-up, compilation, a step, an evaluation or a save.
      time.sleep(rng.uniform(0.5, 5.0))
      cli.process.kill()
      cli.killed_after = "a random delay"
    returncode, output = cli.finish()
    assert returncode == -signal.SIGKILL, output[-3000:]
    for stage, step in expected_resume.items():
      for resumed in re.findall(rf"{stage}: resuming at step (\d+)", output):
        assert int(resumed) == step, (stage, resumed, step)
    kills.append(cli.killed_after)
    kills_during_save += bool(unfinished_saves(workdir))
    expected_resume = newest_checkpoints(workdir)

  # Then a preemption notice and a Ctrl-C, each stopping after a step with a checkpoint.
  for stop_signal in (signal.SIGTERM, signal.SIGINT):
    stopped_at = stop_gracefully(Cli(workdir, tfds_data_dir), stop_signal)
    assert newest_checkpoints(workdir)["distill"] == stopped_at
  returncode, output = Cli(workdir, tfds_data_dir).finish()

  assert returncode == 0, output[-3000:]
  assert f"distill: resuming at step {stopped_at} of {STEPS}" in output
  assert len(kills) >= 10
  assert kills_during_save >= 1, kills
  assert not unfinished_saves(workdir)
  assert_bitwise_equal(reference[0], final_params(workdir, "teacher"))
  assert_bitwise_equal(reference[1], final_params(workdir, "distill"))


def test_second_signal_exits_at_once(tfds_data_dir, tmp_path):
  workdir = tmp_path / "run"
  cli = Cli(workdir, tfds_data_dir, "--config.teacher.train.steps=100000")
  cli.wait_for(r"teacher step \d+/")
  cli.process.send_signal(signal.SIGTERM)
  cli.process.send_signal(signal.SIGINT)
  returncode, output = cli.finish()

  assert returncode == 130, output[-3000:]
  assert "Traceback" not in output
  assert output.strip().splitlines()[-1].startswith("distill-jax: interrupted; rerun the same")
