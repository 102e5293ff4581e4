"""Orbax checkpoint managers for train states and data iterators."""

from distill_jax.checkpoints.manager import (
    StageCheckpointer,
    restore_params,
)

__all__ = ["StageCheckpointer", "restore_params"]
