"""Data parallelism through JAX's own sharding: the batch split over a device mesh.

The params and optimizer state are replicated on every device, each device holds a slice
of the batch, and ``jax.jit`` (GSPMD) partitions the train step: each device runs the
forward and the hand-written backward pass on its slice, and XLA inserts the all-reduce
that the batch mean of the loss needs. The same script runs on one CPU, on 8 GPUs, or on
many hosts (after ``jax.distributed.initialize()``, with a mesh over ``jax.devices()``).
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from funcnet._errors import ArgumentError

BATCH_AXIS = "batch"


def data_parallel_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A one-axis mesh named ``"batch"`` over ``devices`` (default: all, every host)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (BATCH_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    """The sharding of params and optimizer state: a full copy on every device."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """The sharding of inputs and targets: the leading (batch) axis split over the mesh."""
    return NamedSharding(mesh, PartitionSpec(mesh.axis_names[0]))


def check_divisible(mesh: Mesh, batch_size: int) -> None:
    devices = mesh.devices.size
    if batch_size % devices:
        raise ArgumentError(
            "batch_size", f"{batch_size} cannot be split evenly over the mesh's {devices} "
                          f"devices; use a multiple of {devices} (e.g. "
                          f"{devices * max(1, batch_size // devices)}).")


def shard_batch(mesh: Mesh, local_batch):
    """Places a host batch (any pytree of arrays, batch first) split over the mesh.

    On one host this is ``jax.device_put``; on several, each process passes its own part
    of the global batch (``jax.make_array_from_process_local_data``).
    """
    sharding = batch_sharded(mesh)
    return jax.tree.map(lambda a: jax.make_array_from_process_local_data(sharding, np.asarray(a)),
                        local_batch)
