"""Orbax checkpoint managers for train states and data iterators."""

from distill_jax.checkpoints.manager import (
    CheckpointWriteError,
    NonFiniteStateError,
    StageCheckpointer,
    restore_params,
)

__all__ = ["CheckpointWriteError", "NonFiniteStateError", "StageCheckpointer", "restore_params"]
