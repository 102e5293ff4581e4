"""Graceful stop on SIGTERM and SIGINT.

Cloud TPU VMs and batch schedulers send SIGTERM before they preempt a job. The
handlers installed here only record the signal. The training loop reads the
record after each step, saves a checkpoint and raises `RunStopped`, and the
command line exits with code 0. A second signal stops the run at once with
`KeyboardInterrupt`, and the run resumes from its last completed checkpoint.
"""

import contextlib
from collections.abc import Iterator
import signal

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_received: str | None = None


class RunStopped(Exception):
  """Raised after a stop signal, once the current step's checkpoint is saved."""


def _handle(signum: int, frame) -> None:
  del frame
  global _received
  name = signal.Signals(signum).name
  if _received is not None:
    raise KeyboardInterrupt(f"second stop signal {name}")
  _received = name
  logging.warning("received %s: finishing the current step, then saving a checkpoint and "
                  "exiting; send it again to exit at once", name)


def request_stop(reason: str) -> None:
  """Ask the training loop to stop after its current step, as a stop signal does."""
  global _received
  _received = reason


def clear() -> None:
  global _received
  _received = None


def stop_requested() -> str | None:
  """Return the name of the stop signal received in this process, or None."""
  return _received


def stop_requested_anywhere() -> str | None:
  """Return the stop signal when any process of the run received one.

  Every process must call this at the same step; with one process it only
  reads the local record.
  """
  if jax.process_count() == 1:
    return _received
  # NOTE: the all-gather path has not run on more than one host yet.
  flags = multihost_utils.process_allgather(np.array(_received is not None))
  return _received or ("a stop signal on another process" if np.any(flags) else None)


@contextlib.contextmanager
def handle_stop_signals() -> Iterator[None]:
  """Record SIGTERM and SIGINT while the block runs, then restore the previous handlers.

  A signal that is ignored when the block starts (SIGINT of a background job
  started by a shell) stays ignored.
  """
  clear()
  previous = {}
  for signum in _STOP_SIGNALS:
    if signal.getsignal(signum) is not signal.SIG_IGN:
      previous[signum] = signal.signal(signum, _handle)
  try:
    yield
  finally:
    for signum, handler in previous.items():
      signal.signal(signum, handler)
    clear()
