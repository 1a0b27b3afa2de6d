"""Sharded parameters: dense and conv weights split over a mesh's ``"model"`` axis.

On a 2-D mesh of shape (data, model) with axes ``("batch", "model")``, device (i, j) holds
batch shard i of every mini-batch and block j of every parameter axis a layer names in
:meth:`funcnet.Layer.model_axes`: the output features of dense and conv layers, so
that w (fan_in, out) is stored as ``model`` column blocks (fan_in, out / model) and b as
(out / model,) pieces, the column-parallel layout of Megatron-LM. Every other leaf (norm
scales, embeddings, attention weights, a user layer's params) and every leaf whose axis
does not divide evenly is replicated. The optimizer state follows the params: a subtree
of the optimizer state shaped like the params (Adam's moments) is sharded like them, the
rest (step counts) replicated.

Nothing in the forward or the hand-written backward pass changes: the sharding is an
annotation on the step's inputs and outputs (``jax.lax.with_sharding_constraint``), and
``jax.jit`` (GSPMD) partitions z @ w, the pullbacks p_i = A_i^T q_{i+1} and
q_i = B_i^T q_{i+1} and the optimizer update from it, inserting the all-gathers and
reductions they need. The numbers are the single-device run's up to float reassociation;
each device holds 1/model of the split weights (and of their optimizer moments).
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from funcnet._errors import ArgumentError
from funcnet._arguments import check_int
from funcnet.nn._layer import Layer
from funcnet.train._parallel import BATCH_AXIS, replicated
from funcnet.train._state import TrainState

MODEL_AXIS = "model"


def model_parallel_mesh(model: int, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A 2-D mesh ``("batch", "model")`` of shape (len(devices) / model, model) over
    ``devices`` (default: all, every process's): mini-batches split over "batch", the
    weights of dense and conv layers over "model" (see the module docstring). ``model=1``
    is data parallelism with a second axis of size one."""
    devices = jax.devices() if devices is None else list(devices)
    model = check_int("model", model, minimum=1)
    if len(devices) % model:
        raise ArgumentError("model", f"{model} does not divide the {len(devices)} devices; "
                                     f"pick a divisor of {len(devices)} (the mesh is "
                                     f"(devices / model) x model).")
    return Mesh(np.asarray(devices).reshape(len(devices) // model, model),
                (BATCH_AXIS, MODEL_AXIS))


def splits_params(mesh: Optional[Mesh]) -> bool:
    """Whether ``mesh`` has a model axis (params are then sharded, not replicated)."""
    return mesh is not None and MODEL_AXIS in mesh.axis_names


def param_shardings(net: Layer, params, mesh: Mesh):
    """The ``NamedSharding`` of every leaf of ``params`` on ``mesh``, a tree like params.

    A leaf whose layer names an axis in :meth:`~funcnet.Layer.model_axes` is split along
    it over the mesh's "model" axis when that axis's length is a multiple of the model
    axis's size; every other leaf is replicated (as every leaf is on a mesh without a
    model axis). ``params`` may be abstract (``jax.ShapeDtypeStruct`` leaves)."""
    if not splits_params(mesh):
        return jax.tree.map(lambda _: replicated(mesh), params)
    size = mesh.shape[MODEL_AXIS]

    def leaf_sharding(axis, leaf):
        shape = np.shape(leaf)
        if axis is None or not shape or shape[axis] % size:
            return replicated(mesh)
        spec = [None] * len(shape)
        spec[axis] = MODEL_AXIS
        return NamedSharding(mesh, PartitionSpec(*spec))

    return jax.tree.map(lambda axis, subtree: jax.tree.map(
        lambda leaf: leaf_sharding(axis, leaf), subtree),
        net.model_axes(params), params, is_leaf=lambda axis: axis is None)


def state_shardings(net: Layer, state: TrainState, mesh: Mesh) -> TrainState:
    """A :class:`TrainState` of shardings: params by :func:`param_shardings`, every
    subtree of the optimizer state with the params' structure and shapes likewise, the
    rest (counts, the step) replicated."""
    params = param_shardings(net, state.params, mesh)
    structure = jax.tree.structure(state.params)
    shapes = [np.shape(leaf) for leaf in jax.tree.leaves(state.params)]

    def like_params(node) -> bool:
        return (jax.tree.structure(node) == structure
                and [np.shape(leaf) for leaf in jax.tree.leaves(node)] == shapes)

    opt_state = jax.tree.map(lambda node: params if like_params(node) else replicated(mesh),
                             state.opt_state, is_leaf=like_params)
    return TrainState(params, opt_state, replicated(mesh))


def constrain_state(net: Layer, state: TrainState, mesh: Mesh) -> TrainState:
    """``state`` with :func:`state_shardings` imposed (inside ``jax.jit``)."""
    return jax.lax.with_sharding_constraint(state, state_shardings(net, state, mesh))
