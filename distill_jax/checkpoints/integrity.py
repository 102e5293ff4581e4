"""Checksums and finiteness of a train state, computed on the devices.

Every checkpoint stores one checksum per array next to the arrays. A restore
recomputes them, so bytes changed on disk after the save (a bit flip, a file
overwritten or cut short) are detected even where the array file itself still
decodes.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Multiplier of the position weights (Knuth's multiplicative hash constant).
_GOLDEN = np.uint32(2654435761)


def _as_uint32_words(array: jax.Array) -> jax.Array:
  """Reinterpret the bits of `array` as a flat vector of uint32 words."""
  array = jnp.ravel(array)
  if array.dtype == jnp.bool_:
    return array.astype(jnp.uint32)
  itemsize = array.dtype.itemsize
  if itemsize == 4:
    return jax.lax.bitcast_convert_type(array, jnp.uint32)
  if itemsize == 2:
    return jax.lax.bitcast_convert_type(array, jnp.uint16).astype(jnp.uint32)
  if itemsize == 1:
    return jax.lax.bitcast_convert_type(array, jnp.uint8).astype(jnp.uint32)
  if itemsize == 8:
    return jnp.ravel(jax.lax.bitcast_convert_type(array, jnp.uint32))
  raise TypeError(f"no checksum for arrays of dtype {array.dtype}")


def _array_checksum(array: jax.Array) -> jax.Array:
  """Return sum(word_i * w_i) mod 2**32 with odd weights w_i.

  Each weight is odd, so flipping any one bit changes the sum. Integer
  addition is associative, so the result is the same however the sum is
  split across devices.
  """
  words = _as_uint32_words(array)
  positions = jnp.arange(words.shape[0], dtype=jnp.uint32)
  weights = positions * _GOLDEN | np.uint32(1)
  return jnp.sum(words * weights, dtype=jnp.uint32)


def _array_is_finite(array: jax.Array) -> jax.Array:
  if jnp.issubdtype(array.dtype, jnp.inexact):
    return jnp.all(jnp.isfinite(array))
  return jnp.array(True)


@jax.jit
def _summarize(tree: Any) -> tuple[list[jax.Array], jax.Array]:
  leaves = jax.tree.leaves(tree)
  checksums = [_array_checksum(leaf) for leaf in leaves]
  finite = jnp.all(jnp.stack([_array_is_finite(leaf) for leaf in leaves]))
  return checksums, finite


def leaf_names(tree: Any) -> list[str]:
  """Return the key path of every array in `tree`, in `jax.tree.leaves` order."""
  return [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(tree)]


def summarize(tree: Any) -> tuple[dict[str, int], bool]:
  """Return a checksum per array of `tree`, keyed by key path, and whether all are finite."""
  checksums, finite = jax.device_get(_summarize(tree))
  return dict(zip(leaf_names(tree), (int(c) for c in checksums))), bool(finite)


def nonfinite_leaves(tree: Any) -> list[str]:
  """Return the key paths of the arrays of `tree` that hold a NaN or Inf."""
  flags = jax.device_get(jax.jit(lambda t: [_array_is_finite(x) for x in jax.tree.leaves(t)])(tree))
  return [name for name, finite in zip(leaf_names(tree), flags) if not finite]


def mismatched_leaves(expected: dict[str, int], actual: dict[str, int]) -> list[str]:
  """Return the key paths whose checksums differ, or that only one side has."""
  return sorted(name for name in set(expected) | set(actual)
                if expected.get(name) != actual.get(name))
