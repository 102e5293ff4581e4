"""A (data, fsdp, tensor) device mesh and the shardings used on it.

Training steps are jitted with `NamedSharding`s on this mesh instead of being
`pmap`ped: batches are split over the data and fsdp axes, and parameters are
replicated or sharded by rules, in one program that runs unchanged on one CPU,
one GPU or a multi-host TPU slice.
"""

from collections.abc import Mapping
import math
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from distill_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")


def resolve_mesh_shape(mesh_config: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
  """Return the mesh shape in `MESH_AXES` order, with one -1 inferred.

  Raises:
    ConfigError: if a size is 0 or below -1, more than one size is -1, or the
      sizes do not multiply to `num_devices`.
  """
  sizes = [int(mesh_config[axis]) for axis in MESH_AXES]
  for axis, size in zip(MESH_AXES, sizes):
    if size == 0 or size < -1:
      raise ConfigError(f"config.mesh.{axis} must be a positive device count or -1, got {size}")

  inferred = [axis for axis, size in zip(MESH_AXES, sizes) if size == -1]
  if len(inferred) > 1:
    raise ConfigError(f"only one of config.mesh.{{data,fsdp,tensor}} may be -1, got -1 for "
                      f"{', '.join(inferred)}; set all but one to a device count")

  known = math.prod(size for size in sizes if size != -1)
  if inferred:
    if num_devices % known:
      raise ConfigError(f"config.mesh sizes {dict(zip(MESH_AXES, sizes))} do not divide the "
                        f"{num_devices} devices; choose sizes whose product divides {num_devices}")
    sizes[sizes.index(-1)] = num_devices // known
  elif known != num_devices:
    raise ConfigError(f"config.mesh sizes {dict(zip(MESH_AXES, sizes))} multiply to {known}, but "
                      f"the run has {num_devices} device(s); make the product {num_devices} or set "
                      "one axis to -1")
  return tuple(sizes)


def make_mesh(mesh_config: Mapping[str, int], devices: Any = None) -> Mesh:
  """Build a mesh over `devices` (default: all devices of all processes)."""
  devices = jax.devices() if devices is None else list(devices)
  shape = resolve_mesh_shape(mesh_config, len(devices))
  device_array = np.asarray(devices).reshape(shape)
  return Mesh(device_array, MESH_AXES)


def batch_partition_spec() -> PartitionSpec:
  """Split the leading (batch) axis over the data and fsdp axes."""
  return PartitionSpec(("data", "fsdp"))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, batch_partition_spec())


def replicated_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def data_parallel_size(mesh: Mesh) -> int:
  """Number of shards that a batch is split into."""
  return mesh.shape["data"] * mesh.shape["fsdp"]


def global_batch_from_local(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assemble this process's part of a batch into global arrays sharded over the mesh.

  Each process passes the rows it loaded; with one process that is the whole batch.
  """
  sharding = batch_sharding(mesh)
  return {
      key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
      for key, value in local_batch.items()
  }
