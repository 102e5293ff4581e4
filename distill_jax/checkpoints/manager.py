"""One Orbax `CheckpointManager` per training stage.

A checkpoint contains the train state of the model being trained (step,
parameters, optimizer state) and the Grain data iterator's state, so a resumed
run reads exactly the batches it would have read. A teacher is never written
into a student's checkpoint: the distillation stage reloads the teacher from
the teacher stage's own directory.
"""

from collections.abc import Iterator
import contextlib
import errno
import os
import re
import shutil
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from distill_jax.checkpoints import integrity
from distill_jax.errors import UserInputError


class CheckpointWriteError(UserInputError):
  """A checkpoint that could not be written: disk full, read-only or no permission."""


class NonFiniteStateError(UserInputError):
  """A train state holding NaN or Inf, which is never written to a checkpoint."""


class CorruptCheckpointError(Exception):
  """A checkpoint that cannot be read back, or whose arrays changed since the save."""


class IncompatibleCheckpointError(UserInputError):
  """A readable checkpoint of another model: its arrays' names or shapes differ."""


def _path_name(path: tuple[Any, ...]) -> str:
  """Join a pytree key path as a/b/c, whatever kinds of keys it has."""
  parts = []
  for key in path:
    for attribute in ("key", "name", "idx"):
      if hasattr(key, attribute):
        parts.append(str(getattr(key, attribute)))
        break
  return "/".join(parts)


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  return {_path_name(path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def shape_mismatch(state_directory: str, target_state: Any) -> str | None:
  """Compare the arrays saved in `state_directory` with `target_state`.

  Returns:
    None if every array has the same name and shape, else a description of
    the first difference. Raises if the checkpoint's metadata is unreadable.
  """
  metadata = ocp.StandardCheckpointHandler().metadata(epath.Path(state_directory))
  stored = _shapes(metadata)
  expected = _shapes(target_state)
  for name, shape in expected.items():
    if name not in stored:
      return f"it has no array {name}"
    if stored[name] != shape:
      return f"its array {name} has shape {stored[name]}, but this model's has {shape}"
  extra = sorted(set(stored) - set(expected))
  if extra:
    return f"it has an array {extra[0]} that this model does not have"
  return None


def _abstract(tree: Any) -> Any:
  """Shapes, dtypes and shardings of `tree`, the restore target."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


# Room for a checkpoint's metadata files, on top of its arrays.
_METADATA_MARGIN_BYTES = 1 << 20


def _error_chain_text(error: BaseException) -> str:
  """Return the messages of `error` and of the errors that caused it."""
  texts = []
  while error is not None and len(texts) < 10:
    texts.append(str(error))
    error = error.__cause__ or error.__context__
  return " ".join(texts)


def _write_failure_reason(error: BaseException) -> str | None:
  """Return why a save failed when the cause is the file system, else None."""
  if isinstance(error, OSError) and error.errno is not None:
    return os.strerror(error.errno)
  text = str(error)
  for code in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT, errno.EFBIG):
    if os.strerror(code) in text:
      return os.strerror(code)
  if error.__cause__ is not None:
    return _write_failure_reason(error.__cause__)
  return None


class StageCheckpointer:
  """Saves and restores one stage's train state and data iterator.

  Saves run in a background thread when `async_save` is set. Call `close()`,
  or use the object as a context manager, before the process exits, because
  `close()` waits for the last save to finish.

  Each checkpoint also stores a checksum of every array of the state. A
  checkpoint that cannot be read back, or whose checksums no longer match, is
  moved to DIRECTORY_skipped/STEP and the previous one is restored instead.
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
    """Start saving `state` (and the iterator's position) as checkpoint `step`.

    Raises:
      NonFiniteStateError: if any array of `state` contains NaN or Inf; nothing
        is written then.
      CheckpointWriteError: if this save or the previous asynchronous one
        failed to write, for instance on a full disk.
    """
    checksums, finite = integrity.summarize(state)
    if not finite:
      bad = integrity.nonfinite_leaves(state)
      raise NonFiniteStateError(
          f"the state of step {step} contains NaN or Inf in {', '.join(bad[:3])}, so it was not "
          f"saved; {self._newest_on_disk()} in {self.directory}")
    self._check_free_space(step, state)
    items = {"state": ocp.args.StandardSave(state),
             "integrity": ocp.args.JsonSave({"step": step, "checksums": checksums})}
    if data_iterator is not None:
      items["data_iterator"] = grain.checkpoint.CheckpointSave(data_iterator)
    with self._write_errors(step):
      self._manager.save(step, args=ocp.args.Composite(**items), force=True)
    logging.info("saving checkpoint of step %d to %s", step, self.directory)

  def _check_free_space(self, step: int, state: Any) -> None:
    """Raise `CheckpointWriteError` before a save that would not fit on the disk.

    The estimate is the state's uncompressed size plus a margin for metadata;
    Orbax compresses arrays, so a save that passes this check fits unless the
    disk fills up while it is written.
    """
    needed = sum(leaf.nbytes for leaf in jax.tree.leaves(state)) + _METADATA_MARGIN_BYTES
    free = shutil.disk_usage(self.directory).free
    if free < needed:
      raise CheckpointWriteError(
          f"saving a checkpoint to {self.directory} at step {step} needs about "
          f"{needed / 2**20:.1f} MiB, but only {free / 2**20:.1f} MiB are free; "
          f"{self._newest_on_disk()}. Free space, then rerun the same command to resume")

  def _newest_on_disk(self) -> str:
    """Describe the newest committed checkpoint, read from the directory listing."""
    steps = [int(name) for name in os.listdir(self.directory) if name.isdigit()]
    return (f"the checkpoint of step {max(steps)} is the newest intact one" if steps
            else "no earlier checkpoint exists")

  @contextlib.contextmanager
  def _write_errors(self, step: int | None) -> Iterator[None]:
    """Turn a file-system failure while saving into a one-line `CheckpointWriteError`."""
    try:
      yield
    except Exception as error:  # pylint: disable=broad-except
      reason = _write_failure_reason(error)
      if reason is None:
        raise
      # An asynchronous save that failed is reported by the next call, so the
      # failed step is read from the temporary directory named in the error.
      failed = re.search(r"/(\d+)\.orbax-checkpoint-tmp", _error_chain_text(error))
      step = int(failed.group(1)) if failed else step
      at_step = f" at step {step}" if step is not None else ""
      raise CheckpointWriteError(
          f"saving a checkpoint to {self.directory} failed{at_step}: {reason}; "
          f"{self._newest_on_disk()}. Free space or fix permissions, then rerun the same "
          "command to resume") from None

  def restore(self, step: int, target_state: Any,
              data_iterator: grain.DatasetIterator | None) -> Any:
    """Restore checkpoint `step` into the structure and shardings of `target_state`.

    The data iterator, when given, is moved in place to its saved position.

    Raises:
      CorruptCheckpointError: if the checkpoint cannot be read or its arrays'
        checksums differ from those recorded at save time.
      IncompatibleCheckpointError: if it is readable but contains arrays of
        other names or shapes than `target_state`.
    """
    try:
      mismatch = shape_mismatch(os.path.join(self.directory, str(step), "state"), target_state)
    except Exception as error:  # pylint: disable=broad-except
      raise CorruptCheckpointError(f"has unreadable metadata ({type(error).__name__}: "
                                   f"{' '.join(str(error).split())[:300]})") from error
    if mismatch is not None:
      raise IncompatibleCheckpointError(
          f"the checkpoint of step {step} in {self.directory} belongs to another model or "
          f"version of distill_jax: {mismatch}; use a new --workdir, or delete "
          f"{self.directory} to train this stage again")

    items = {"state": ocp.args.StandardRestore(_abstract(target_state)),
             "integrity": ocp.args.JsonRestore()}
    if data_iterator is not None:
      items["data_iterator"] = grain.checkpoint.CheckpointRestore(data_iterator)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    # A damaged checkpoint fails inside Orbax, TensorStore, Grain or the JSON
    # decoder with errors of many types; each means the same: unreadable.
    except Exception as error:  # pylint: disable=broad-except
      reason = " ".join(f"{type(error).__name__}: {error}".split())
      raise CorruptCheckpointError(f"cannot be read ({reason[:300]})") from error

    recorded = restored["integrity"]["checksums"]
    checksums, _ = integrity.summarize(restored["state"])
    mismatched = integrity.mismatched_leaves(recorded, checksums)
    if mismatched:
      raise CorruptCheckpointError(
          f"the checksums of {len(mismatched)} array(s) differ from those saved, first "
          f"{mismatched[0]}")
    logging.info("restored step %d from %s", step, self.directory)
    return restored["state"]

  def restore_latest(self, target_state: Any, data_iterator: grain.DatasetIterator | None
                     ) -> tuple[Any, int] | None:
    """Restore the newest intact checkpoint, skipping damaged ones.

    A skipped checkpoint is logged with its reason and moved out of the way,
    so that the steps after it can be saved again.

    Returns:
      (state, step) of the newest checkpoint that restored, or None if there
      is none. After None the data iterator may have moved, so callers
      should build a fresh one.
    """
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        return self.restore(step, target_state, data_iterator), step
      except CorruptCheckpointError as error:
        moved_to = self._move_aside(step)
        logging.warning("skipped the checkpoint of step %d in %s: it %s; moved it to %s and "
                        "trying the previous one", step, self.directory, error, moved_to)
    return None

  def _move_aside(self, step: int) -> str:
    """Move the directory of checkpoint `step` to DIRECTORY_skipped; return the new path."""
    # NOTE: in a multi-process run every process moves the directory; only
    # single-process runs are tested.
    skipped_root = self.directory + "_skipped"
    os.makedirs(skipped_root, exist_ok=True)
    target = os.path.join(skipped_root, str(step))
    suffix = 1
    while os.path.exists(target):
      target = os.path.join(skipped_root, f"{step}-{suffix}")
      suffix += 1
    os.replace(os.path.join(self.directory, str(step)), target)
    self._manager.reload()
    return target

  def wait_until_finished(self) -> None:
    """Block until the pending save is on disk; raises `CheckpointWriteError` if it failed."""
    with self._write_errors(None):
      self._manager.wait_until_finished()

  def close(self) -> None:
    try:
      self.wait_until_finished()
    finally:
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
    ValueError: if the checkpoint contains arrays of other names or shapes.
  """
  directory = os.path.abspath(os.path.expanduser(directory))
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False))
  try:
    step = manager.latest_step()
    if step is None:
      raise FileNotFoundError(f"no checkpoint found in {directory}")
    # Checked first: a restore that fails part-way leaves Orbax's threads
    # writing tracebacks at exit.
    mismatch = shape_mismatch(os.path.join(directory, str(step), "state"), target_state)
    if mismatch is not None:
      raise ValueError(mismatch)
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(_abstract(target_state))))
  finally:
    manager.close()
  logging.info("restored step %d from %s", step, directory)
  return restored["state"], step
