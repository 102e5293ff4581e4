"""Size, latency and memory of a model's forward pass.

Every function takes `apply_fn(params, inputs)`, a pure function of a pytree of
parameters and a batch, so the same code profiles the teacher and the students.
For a Flax NNX model, split it once and merge it inside the function:

  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  apply_fn = lambda params, x: nnx.merge(graphdef, params, rest)(x)
"""

from collections.abc import Callable
import math
import time
from typing import Any

from absl import logging
import jax
import numpy as np

_BYTES_PER_MIB = 1024 * 1024

# CompiledMemoryStats fields that `forward_peak_memory_bytes` adds up.
_MEMORY_FIELDS = (
    "argument_size_in_bytes",
    "output_size_in_bytes",
    "temp_size_in_bytes",
    "alias_size_in_bytes",
)


def count_parameters(params: Any) -> int:
  """Count the elements of all arrays in a pytree.

  Args:
    params: Any pytree of arrays, e.g. the `nnx.Param` state from
      `nnx.split(model, nnx.Param, ...)`. Leaves with a `shape` (arrays,
      `jax.ShapeDtypeStruct`) count their elements, and Python and NumPy
      scalars count 1 each.

  Returns:
    The total number of elements.
  """
  total = 0
  for leaf in jax.tree.leaves(params):
    shape = getattr(leaf, "shape", None)
    if shape is None:
      total += int(np.size(leaf))
    else:
      total += math.prod(shape)
  return total


def _batch_size(inputs: Any) -> int:
  """Return the leading dimension of the first array in `inputs`."""
  leaves = jax.tree.leaves(inputs)
  if not leaves or not getattr(leaves[0], "shape", ()):
    raise ValueError(
        "inputs must be an array (or a pytree of arrays) with a leading batch "
        f"dimension, got {type(inputs).__name__}."
    )
  return int(leaves[0].shape[0])


def measure_latency(
    apply_fn: Callable[[Any, Any], Any],
    params: Any,
    inputs: Any,
    *,
    warmup: int = 3,
    repeats: int = 20,
) -> dict[str, float | int]:
  """Measure the wall-clock latency of the jitted forward pass.

  `params` and `inputs` are put on the default device before timing, so the
  timed calls exclude host-to-device copies. Each timed call waits for its
  outputs with `jax.block_until_ready`, so asynchronous dispatch cannot hide
  device time.

  Args:
    apply_fn: Pure function `apply_fn(params, inputs)`.
    params: Pytree of parameters.
    inputs: Batch of inputs whose first dimension is the batch size.
    warmup: Untimed calls before timing. The first one traces and compiles.
    repeats: Timed calls.

  Returns:
    `median_ms` and `p90_ms` (milliseconds per call), `repeats` and
    `batch_size`.

  Raises:
    ValueError: if `warmup` or `repeats` is below 1.
  """
  if warmup < 1:
    raise ValueError(
        f"warmup must be at least 1 so that compilation is not timed, got "
        f"{warmup}."
    )
  if repeats < 1:
    raise ValueError(f"repeats must be at least 1, got {repeats}.")

  batch_size = _batch_size(inputs)
  jitted_fn = jax.jit(apply_fn)
  params = jax.device_put(params)
  inputs = jax.device_put(inputs)

  for _ in range(warmup):
    jax.block_until_ready(jitted_fn(params, inputs))

  durations_ms = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(jitted_fn(params, inputs))
    durations_ms.append((time.perf_counter() - start) * 1000.0)

  return {
      "median_ms": float(np.median(durations_ms)),
      "p90_ms": float(np.percentile(durations_ms, 90)),
      "repeats": repeats,
      "batch_size": batch_size,
  }


def forward_peak_memory_bytes(
    apply_fn: Callable[[Any, Any], Any], params: Any, inputs: Any
) -> int:
  """Return the device memory the compiled forward pass needs, from XLA.

  The result is `argument_size_in_bytes + output_size_in_bytes +
  temp_size_in_bytes - alias_size_in_bytes` from the executable's
  `memory_analysis()` (a `CompiledMemoryStats` in jaxlib 0.10.2). XLA assigns
  buffers statically: arguments and outputs stay allocated for the whole call,
  and every intermediate lives inside one temp allocation of
  `temp_size_in_bytes`. Their sum therefore bounds the memory in use at any
  point of the call from above. Outputs that alias (reuse) argument buffers
  are counted once, which is why the aliased bytes are subtracted. Memory of
  the compiled code (`generated_code_size_in_bytes`) and host-side offloaded
  buffers (the `host_*` fields) are not counted.

  `CompiledMemoryStats` also has `peak_memory_in_bytes`, but this function
  does not use it: with jaxlib 0.10.2 on CPU, for a two-layer MLP, it equalled
  arguments plus outputs and left out the temp buffer.

  Args:
    apply_fn: Pure function `apply_fn(params, inputs)`.
    params: Pytree of parameters.
    inputs: Batch of inputs.

  Returns:
    The memory bound in bytes, or -1 when the backend provides no memory
    analysis (a warning is logged the first time).
  """
  compiled = jax.jit(apply_fn).lower(params, inputs).compile()
  stats = compiled.memory_analysis()

  # `memory_analysis()` returns None where the backend has no analysis. Its
  # structure is not a stable API, so missing fields count as unavailable.
  if stats is None or not all(hasattr(stats, name) for name in _MEMORY_FIELDS):
    logging.log_first_n(
        logging.WARNING,
        "XLA memory analysis is unavailable on backend %s (stats: %r), so "
        "peak memory is reported as -1.",
        1,
        jax.default_backend(),
        stats,
    )
    return -1

  return int(
      stats.argument_size_in_bytes
      + stats.output_size_in_bytes
      + stats.temp_size_in_bytes
      - stats.alias_size_in_bytes
  )


def _bytes_to_mib(num_bytes: int) -> float | None:
  """Convert bytes to MiB, mapping -1 (memory analysis unavailable) to None."""
  if num_bytes < 0:
    return None
  return num_bytes / _BYTES_PER_MIB


def profile_model(
    apply_fn: Callable[[Any, Any], Any],
    params: Any,
    example_inputs_batch1: Any,
    example_inputs_batchN: Any,  # pylint: disable=invalid-name
    *,
    warmup: int = 3,
    repeats: int = 20,
) -> dict[str, float | int | None]:
  """Profile parameter count, latency and peak memory at two batch sizes.

  Args:
    apply_fn: Pure function `apply_fn(params, inputs)`.
    params: Pytree of parameters, counted by `count_parameters`.
    example_inputs_batch1: Inputs with batch size 1.
    example_inputs_batchN: Inputs with the larger batch size N.
    warmup: Untimed calls per batch size, passed to `measure_latency`.
    repeats: Timed calls per batch size, passed to `measure_latency`.

  Returns:
    A flat dict with the key names of a model entry in the report:
    `parameters`, `latency_batch1_ms`, `latency_batch1_p90_ms`,
    `latency_batchN_ms`, `latency_batchN_p90_ms`, `batch_size_N`,
    `latency_repeats`, `peak_memory_batch1_bytes`, `peak_memory_batchN_bytes`,
    `peak_memory_batch1_mib` and `peak_memory_batchN_mib`. Latencies are
    medians in milliseconds. Memory is -1 bytes and None MiB when XLA
    provides no memory analysis.
  """
  latency_batch1 = measure_latency(
      apply_fn, params, example_inputs_batch1, warmup=warmup, repeats=repeats
  )
  latency_batch_n = measure_latency(
      apply_fn, params, example_inputs_batchN, warmup=warmup, repeats=repeats
  )

  memory_batch1 = forward_peak_memory_bytes(
      apply_fn, params, example_inputs_batch1
  )
  memory_batch_n = forward_peak_memory_bytes(
      apply_fn, params, example_inputs_batchN
  )

  profile = {
      "parameters": count_parameters(params),
      "latency_batch1_ms": latency_batch1["median_ms"],
      "latency_batch1_p90_ms": latency_batch1["p90_ms"],
      "latency_batchN_ms": latency_batch_n["median_ms"],
      "latency_batchN_p90_ms": latency_batch_n["p90_ms"],
      "batch_size_N": latency_batch_n["batch_size"],
      "latency_repeats": repeats,
      "peak_memory_batch1_bytes": memory_batch1,
      "peak_memory_batchN_bytes": memory_batch_n,
      "peak_memory_batch1_mib": _bytes_to_mib(memory_batch1),
      "peak_memory_batchN_mib": _bytes_to_mib(memory_batch_n),
  }
  logging.info(
      "Profiled model: %d parameters, %.3f ms at batch 1, %.3f ms at batch %d.",
      profile["parameters"],
      profile["latency_batch1_ms"],
      profile["latency_batchN_ms"],
      profile["batch_size_N"],
  )
  return profile
