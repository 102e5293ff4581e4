"""The policy for steps whose loss, gradient or parameters become NaN or Inf.

The train step never applies such an update (see `state.apply_gradients`).
With `config.nonfinite_policy="halt"` (the default) the stage stops at its
next log or checkpoint step, writes WORKDIR/nonfinite_STAGE.json and keeps its
last checkpoint. With "skip" it goes on and counts the updates it dropped.
"""

from collections.abc import Mapping
import json
import math
import os

from distill_jax.errors import UserInputError
from distill_jax.training import state as state_lib

POLICIES = ("halt", "skip")


class NonFiniteLossError(UserInputError):
  """Raised by the "halt" policy when a step's loss, gradient or parameters are NaN or Inf."""


def cause_names(cause: int) -> list[str]:
  """Return the names of the bits set in a `TrainState.nonfinite_cause` mask."""
  return [name for bit, name in state_lib.CAUSE_NAMES.items() if cause & bit]


def _join(names: list[str]) -> str:
  """Join names as "a", "a and b" or "a, b and c"."""
  return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def _json_number(value: float) -> float | str:
  """Return `value`, or its name for NaN and Inf, which strict JSON cannot hold."""
  return value if math.isfinite(value) else str(value)


def write_diagnostic(workdir: str, *, stage: str, step: int, detected_at_step: int, cause: int,
                     skipped_steps: int, interval_metrics: Mapping[str, float],
                     interval_first_step: int, last_checkpoint_step: int | None,
                     checkpoint_dir: str) -> str:
  """Write WORKDIR/nonfinite_STAGE.json describing the first non-finite step; return its path.

  Args:
    workdir: the run's working directory.
    stage: the stage name.
    step: the 1-based number of the first step whose update was dropped.
    detected_at_step: the step at which the loop read the flag.
    cause: `TrainState.nonfinite_cause` of that step.
    skipped_steps: updates dropped up to `detected_at_step`.
    interval_metrics: the train metrics averaged over steps
      `interval_first_step + 1` to `detected_at_step`, which include `step`.
    interval_first_step: the step before that interval.
    last_checkpoint_step: the newest checkpoint on disk, or None.
    checkpoint_dir: where that checkpoint is.
  """
  record = {
      "stage": stage,
      "policy": "halt",
      "step": step,
      "nonfinite": cause_names(cause),
      "detected_at_step": detected_at_step,
      "skipped_steps": skipped_steps,
      "interval": [interval_first_step + 1, detected_at_step],
      "nonfinite_metrics": sorted(name for name, value in interval_metrics.items()
                                  if not math.isfinite(value)),
      "interval_metrics": {name: _json_number(value)
                           for name, value in sorted(interval_metrics.items())},
      "last_checkpoint_step": last_checkpoint_step,
      "checkpoint_dir": checkpoint_dir,
      "what_to_do": ("lower the learning rate, raise config.*.train.grad_clip_norm or check the "
                     "inputs, then rerun; or set config.nonfinite_policy='skip' to drop such "
                     "updates and go on"),
  }
  path = os.path.join(workdir, f"nonfinite_{stage}.json")
  temporary_path = path + ".tmp"
  with open(temporary_path, "w") as f:
    json.dump(record, f, indent=2)
    f.write("\n")
  os.replace(temporary_path, path)
  return path


def halt_message(stage: str, step: int, cause: int, last_checkpoint_step: int | None,
                 diagnostic_path: str) -> str:
  checkpoint_state = (f"the checkpoint of step {last_checkpoint_step} is kept"
                      if last_checkpoint_step is not None
                      else "no checkpoint was saved before it")
  return (f"{stage}: the {_join(cause_names(cause))} became NaN or Inf at step {step}; "
          f"{checkpoint_state}, and {diagnostic_path} lists the step's metrics. Lower the "
          "learning rate or check the inputs, or set config.nonfinite_policy='skip' to drop such "
          "updates")
