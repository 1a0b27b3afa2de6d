"""Data parallelism through JAX's own sharding: the batch split over a device mesh.

The params and optimizer state are replicated on every device, each device holds a slice
of the batch, and ``jax.jit`` (GSPMD) partitions the train step: each device runs the
forward and the hand-written backward pass on its slice, and XLA inserts the all-reduce
that the batch mean of the loss needs. The same script runs on one CPU, on 8 GPUs, or on
several processes (after ``jax.distributed.initialize()``, with a mesh over
``jax.devices()``, which lists every process's devices). A mesh's first axis is the
batch axis; :mod:`funcnet.train._sharding` adds a second one that splits the weights.
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


def batch_shards(mesh: Mesh) -> int:
    """Into how many pieces a batch is split: the size of the mesh's first axis."""
    return int(mesh.shape[mesh.axis_names[0]])


def check_divisible(mesh: Mesh, batch_size: int) -> None:
    shards = batch_shards(mesh)
    if batch_size % shards:
        raise ArgumentError(
            "batch_size", f"{batch_size} cannot be split evenly over the mesh's {shards} "
                          f"batch shards (axis {mesh.axis_names[0]!r}); use a multiple of "
                          f"{shards} (e.g. {shards * max(1, batch_size // shards)}).")


def global_batch(mesh: Mesh, batch):
    """Places a batch that every process holds whole (any pytree of host arrays, batch
    first) split over the mesh: each process copies to its own devices only the rows they
    hold (``jax.make_array_from_callback``). fit uses it, since every process passes fit
    the same full (x, y); on one process it is a plain ``jax.device_put``."""
    sharding = batch_sharded(mesh)

    def place(array):
        array = np.asarray(array)
        return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])

    return jax.tree.map(place, batch)


def shard_batch(mesh: Mesh, local_batch):
    """Places a host batch (any pytree of arrays, batch first) split over the mesh, for a
    training loop of your own (fit places its batches itself).

    On one process this is ``jax.device_put``; with several, each process passes only
    its own part of the global batch, the rows its devices hold, in process order
    (``jax.make_array_from_process_local_data``).
    """
    sharding = batch_sharded(mesh)
    return jax.tree.map(lambda a: jax.make_array_from_process_local_data(sharding, np.asarray(a)),
                        local_batch)
