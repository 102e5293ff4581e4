"""One Orbax `CheckpointManager` per training stage.

A checkpoint contains the train state of the model being trained (step,
parameters, optimizer state) and the Grain data iterator's state, so a resumed
run reads exactly the batches it would have read. A teacher is never written
into a student's checkpoint: the distillation stage reloads the teacher from
the teacher stage's own directory.
"""

import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging


def _abstract(tree: Any) -> Any:
  """Shapes, dtypes and shardings of `tree`, the restore target."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class StageCheckpointer:
  """Saves and restores one stage's train state and data iterator.

  Saves run in a background thread when `async_save` is set. Call `close()`,
  or use the object as a context manager, before the process exits, because
  `close()` waits for the last save to finish.
  """

  def __init__(self, directory: str, *, max_to_keep: int, async_save: bool):
    self.directory = os.path.abspath(os.path.expanduser(directory))
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        enable_async_checkpointing=async_save,
        create=True,
        # A save cut short by a crash or Ctrl-C leaves a temporary directory
        # that is never restored; remove it when the stage starts again.
        cleanup_tmp_directories=True,
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, data_iterator: grain.DatasetIterator | None) -> None:
    """Start saving `state` (and the iterator's position) as checkpoint `step`."""
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data_iterator"] = grain.checkpoint.CheckpointSave(data_iterator)
    self._manager.save(step, args=ocp.args.Composite(**items), force=True)
    logging.info("saving checkpoint of step %d to %s", step, self.directory)

  def restore(self, step: int, target_state: Any,
              data_iterator: grain.DatasetIterator | None) -> Any:
    """Restore checkpoint `step` into the structure and shardings of `target_state`.

    The data iterator, when given, is moved in place to its saved position.
    """
    items = {"state": ocp.args.StandardRestore(_abstract(target_state))}
    if data_iterator is not None:
      items["data_iterator"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    logging.info("restored step %d from %s", step, self.directory)
    return restored["state"]

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> "StageCheckpointer":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def restore_params(directory: str, target_state: Any) -> tuple[Any, int]:
  """Restore the latest train state in `directory`, e.g. a finished teacher.

  Returns:
    The restored state and its step.

  Raises:
    FileNotFoundError: if `directory` contains no checkpoint.
  """
  directory = os.path.abspath(os.path.expanduser(directory))
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False))
  try:
    step = manager.latest_step()
    if step is None:
      raise FileNotFoundError(f"no checkpoint found in {directory}")
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(_abstract(target_state))))
  finally:
    manager.close()
  logging.info("restored step %d from %s", step, directory)
  return restored["state"], step
