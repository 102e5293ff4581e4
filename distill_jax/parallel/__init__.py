"""Device meshes, shardings and multi-process start-up."""

from distill_jax.parallel.mesh import (
    MESH_AXES,
    batch_partition_spec,
    batch_sharding,
    global_batch_from_local,
    make_mesh,
    replicated_sharding,
)

__all__ = [
    "MESH_AXES",
    "batch_partition_spec",
    "batch_sharding",
    "global_batch_from_local",
    "make_mesh",
    "replicated_sharding",
]
