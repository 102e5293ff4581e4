"""Checks and set-up of a run's working directory, done before any training.

A workdir belongs to one config: rerunning with the same config resumes, and a
run whose config differs in anything that changes the results is rejected, so
checkpoints of one config are never resumed under another.
"""

from collections.abc import Mapping
import glob
import json
import os
import shutil
from typing import Any

from absl import logging

from distill_jax.errors import UserInputError

CONFIG_FILE = "config.json"

# Files and directories a run writes into its workdir. `--overwrite` deletes
# these and nothing else.
RUN_ENTRIES = ("checkpoints", "tensorboard", "teacher_cache", CONFIG_FILE, "report.json",
               "report.md", "*.png", "*_eval_history.jsonl", "nonfinite_*.json")

# Keys that change how a run is logged, checkpointed or measured, but not what
# it trains; they may differ when a run is resumed.
RESUMABLE_KEYS = (
    "log_every_steps",
    "eval_every_steps",
    "checkpoint",
    "report",
    "data.data_dir",
    "data.worker_count",
    "data.eval_batch_size",
    "teacher_cache.only",
    "nonfinite_policy",
)


class WorkdirError(UserInputError):
  """A workdir that cannot be used: not writable, or containing another config's run."""


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    path = f"{prefix}{key}"
    if isinstance(value, Mapping):
      flat.update(_flatten(value, path + "."))
    else:
      flat[path] = list(value) if isinstance(value, tuple) else value
  return flat


def _is_resumable_key(key: str) -> bool:
  return any(key == prefix or key.startswith(prefix + ".") for prefix in RESUMABLE_KEYS)


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
  """List the keys whose values differ between two configs, as `key: saved -> current`."""
  saved_flat, current_flat = _flatten(saved), _flatten(current)
  differences = []
  for key in sorted(set(saved_flat) | set(current_flat)):
    if _is_resumable_key(key):
      continue
    old, new = saved_flat.get(key, "<unset>"), current_flat.get(key, "<unset>")
    if old != new:
      differences.append(f"{key}: {old!r} -> {new!r}")
  return differences


def delete_run(workdir: str) -> list[str]:
  """Delete the files and directories of `RUN_ENTRIES` in `workdir`; return their names."""
  deleted = []
  for pattern in RUN_ENTRIES:
    for path in sorted(glob.glob(os.path.join(glob.escape(workdir), pattern))):
      if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
      else:
        os.remove(path)
      deleted.append(os.path.basename(path))
  return deleted


def prepare_workdir(workdir: str, config_json: str, write: bool = True,
                    overwrite: bool = False) -> str:
  """Create `workdir` if needed and record the config, or reject an incompatible one.

  Args:
    workdir: the run's working directory.
    config_json: the run's config as JSON.
    write: whether to write config.json and delete an overwritten run; in a
      multi-process run only process 0 writes.
    overwrite: delete a run of a different config found in `workdir` instead
      of rejecting it. A run of the same config is always resumed.

  Returns:
    The absolute path of the workdir.

  Raises:
    WorkdirError: if the workdir cannot be created or written, or contains a run
      whose config differs in a key outside `RESUMABLE_KEYS` and `overwrite`
      is not set.
  """
  workdir = os.path.abspath(os.path.expanduser(workdir))
  try:
    os.makedirs(workdir, exist_ok=True)
  except (FileExistsError, NotADirectoryError):
    raise WorkdirError(f"--workdir={workdir} cannot be created because a file is in the way; "
                       "choose a directory path") from None
  except PermissionError:
    raise WorkdirError(f"--workdir={workdir} cannot be created: permission denied; choose a "
                       "writable directory") from None
  if not os.access(workdir, os.W_OK | os.X_OK):
    raise WorkdirError(f"--workdir={workdir} is not writable; choose a writable directory")

  path = os.path.join(workdir, CONFIG_FILE)
  current = json.loads(config_json)
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    differences = config_differences(saved, current)
    listed = "; ".join(differences[:3]) + ("; ..." if len(differences) > 3 else "")
    if differences and not overwrite:
      raise WorkdirError(f"--workdir={workdir} contains a run with a different config ({listed}); "
                         "use a new --workdir, rerun with the saved config to resume it, or add "
                         "--overwrite to delete it")
    if differences and write:
      deleted = delete_run(workdir)
      logging.warning("--overwrite: deleted the run of a different config (%s) in %s: %s",
                      listed, workdir, ", ".join(deleted))

  if not write:
    return workdir
  temporary_path = path + ".tmp"
  with open(temporary_path, "w") as f:
    f.write(config_json)
  os.replace(temporary_path, path)
  return workdir
