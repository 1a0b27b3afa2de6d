"""fit's arguments, all checked before its first step.

Each mistake raises :class:`ArgumentError` (or :class:`LayerError` for params that do
not fit the network) naming the argument, the sizes and the fix. Nothing here runs a
FLOP of the network: shapes come from ``jax.eval_shape``, and the targets' values (label
ranges) are checked on the host.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from funcnet._arguments import (check_array, check_bool, check_float_leaves, check_int,
                                check_key)
from funcnet._errors import ArgumentError, LayerError, shape_str
from funcnet._processes import several
from funcnet.ad._inputs import check_layer, check_loss, check_targets, output_struct
from funcnet.ad._walk import Walk
from funcnet.train._parallel import check_divisible
from funcnet.train._privacy import check_privacy
from funcnet.train._state import TrainState, check_not_donated, check_optimizer


@dataclasses.dataclass(frozen=True)
class FitPlan:
    """fit's normalised settings: examples n, batch_size, steps per epoch and per call."""

    examples: int
    batch_size: int
    steps_per_epoch: int
    steps_per_call: int
    epochs: int
    first_epoch: int


def check_fit(net, loss, optimizer, params, x, y, *, key, epochs, batch_size, eval_data,
              state, first_epoch, progress, mesh, checkpoint_path, remat, steps_per_call,
              on_epoch_end, privacy=None) -> FitPlan:
    """Checks every argument of :func:`funcnet.fit`; returns the normalised settings."""
    check_layer(net)
    check_loss(loss)
    check_optimizer(optimizer)
    check_key("key", key)
    if mesh is not None and not isinstance(mesh, Mesh):
        raise ArgumentError("mesh", f"must be a jax.sharding.Mesh such as "
                                    f"fnet.data_parallel_mesh(), got {mesh!r}.")
    Walk(remat)
    epochs = check_int("epochs", epochs, minimum=1)
    first_epoch = check_int("first_epoch", first_epoch, minimum=0)
    if progress is not None:
        check_bool("progress", progress)
    if on_epoch_end is not None and not callable(on_epoch_end):
        raise ArgumentError("on_epoch_end", f"must be a function (epoch, state) -> None, got "
                                            f"{on_epoch_end!r}.")
    n = _check_inputs("x", x)
    _check_batch_of_targets("y", y, n, "x")
    batch_size = n if batch_size is None else check_int("batch_size", batch_size, minimum=1)
    if batch_size > n:
        raise ArgumentError("batch_size", f"must lie in [1, {n}] (the training set size), got "
                                          f"{batch_size}. Use batch_size=None for full-batch "
                                          f"steps.")
    steps_per_epoch = n // batch_size
    calls = _check_steps_per_call(steps_per_call, steps_per_epoch, mesh)
    if privacy is not None:
        check_privacy(privacy)
        if mesh is not None or calls > 1:
            raise ArgumentError("privacy", "DP-SGD runs one Poisson-sampled step per call on "
                                           "one device: leave mesh=None and steps_per_call=1.")
    if mesh is not None:
        check_divisible(mesh, batch_size)
    _check_processes(mesh)
    params = _check_state(net, optimizer, params, state, x)
    out_shape = net.check(params, jnp.shape(x)[1:])
    check_targets(output_struct(params, x, out_shape), y, loss)
    if eval_data is not None:
        _check_eval_data(eval_data, x, params, out_shape, loss)
    if checkpoint_path is not None:
        _check_checkpoint_path(checkpoint_path)
    return FitPlan(n, batch_size, steps_per_epoch, calls, epochs, first_epoch)


def _check_inputs(argument: str, x) -> int:
    """x is an array with a batch of at least one example; returns the batch size."""
    check_array(argument, x)
    if jnp.ndim(x) < 1 or jnp.shape(x)[0] == 0:
        raise ArgumentError(argument, f"must hold at least one example along its leading "
                                      f"axis, got shape {shape_str(jnp.shape(x))}.")
    return int(jnp.shape(x)[0])


def _check_batch_of_targets(argument: str, y, n: int, inputs: str) -> None:
    if isinstance(y, list) or y is None:
        raise ArgumentError(argument, f"must be an array (or a pytree of arrays) of targets, "
                                      f"got {type(y).__name__}; convert it: jnp.asarray(y).")
    for leaf in jax.tree.leaves(y):
        if jnp.ndim(leaf) < 1 or jnp.shape(leaf)[0] != n:
            raise ArgumentError(
                argument, f"has shape {shape_str(jnp.shape(leaf))}, but {inputs} holds {n} "
                          f"examples: pass one target per example, {n} along the leading "
                          f"axis (nothing is truncated or repeated).")


def _check_processes(mesh) -> None:
    """In a run of several processes fit needs a mesh with devices of every process."""
    if not several():
        return
    processes = jax.process_count()
    if mesh is None:
        raise ArgumentError("mesh", f"this run has {processes} processes (jax.distributed), "
                                    f"so fit needs a mesh over all their devices: pass "
                                    f"mesh=fnet.data_parallel_mesh(); without one every "
                                    f"process would train alone.")
    present = {device.process_index for device in mesh.devices.flat}
    absent = sorted(set(range(processes)) - present)
    if absent:
        raise ArgumentError("mesh", f"holds no device of process(es) {absent} of this run's "
                                    f"{processes}; build it over jax.devices() (every "
                                    f"process's devices), e.g. fnet.data_parallel_mesh().")


def _check_steps_per_call(steps_per_call, steps_per_epoch: int, mesh) -> int:
    if steps_per_call == "epoch":
        steps_per_call = steps_per_epoch
    elif isinstance(steps_per_call, str):
        raise ArgumentError("steps_per_call", f"must be a positive int or 'epoch', got "
                                              f"{steps_per_call!r}.")
    steps_per_call = check_int("steps_per_call", steps_per_call, minimum=1)
    if steps_per_call > 1 and mesh is not None:
        raise ArgumentError("steps_per_call", "steps_per_call > 1 scans device-resident "
                                              "batches and is not combined with mesh=...; use "
                                              "steps_per_call=1 for data-parallel training.")
    return min(steps_per_call, steps_per_epoch)


def _check_state(net, optimizer, params, state: Optional[TrainState], x) -> Any:
    """The params training starts from (those of ``state`` when given), checked: floating
    point, not donated, and (for a state) with an optimizer state of this optimizer."""
    if state is None:
        check_not_donated("params", params)
        check_float_leaves("params", params)
        return params
    if not isinstance(state, TrainState):
        raise ArgumentError("state", f"must be a fnet.TrainState (fnet.init_train_state(params, "
                                     f"optimizer), or a FitResult's .state), got "
                                     f"{type(state).__name__}.")
    check_not_donated("state", state)
    check_float_leaves("state.params", state.params)
    net.check(state.params, jnp.shape(x)[1:])
    expected = jax.eval_shape(optimizer.init, state.params)
    expected_leaves, expected_tree = jax.tree.flatten(expected)
    leaves, tree = jax.tree.flatten(state.opt_state)
    same = expected_tree == tree and all(
        jnp.shape(a) == b.shape and jnp.result_type(a) == b.dtype
        for a, b in zip(leaves, expected_leaves))
    if not same:
        raise ArgumentError("state", f"its optimizer state does not fit this optimizer: "
                                     f"optimizer.init(params) makes {_brief(expected_tree)}, "
                                     f"the state holds {_brief(tree)}. Pass the optimizer the "
                                     f"state was made with, or start afresh with "
                                     f"fnet.init_train_state(state.params, optimizer).")
    return state.params


def _brief(treedef) -> str:
    text = str(treedef).replace("PyTreeDef", "")
    return text if len(text) <= 160 else text[:157] + "..."


def _check_eval_data(eval_data, x, params, out_shape, loss) -> None:
    if not isinstance(eval_data, (tuple, list)) or len(eval_data) != 2:
        raise ArgumentError("eval_data", f"must be a pair (x_eval, y_eval), got "
                                         f"{type(eval_data).__name__}"
                                         + (f" of {len(eval_data)} entries"
                                            if isinstance(eval_data, (tuple, list)) else "")
                                         + ".")
    x_eval, y_eval = eval_data
    n_eval = _check_inputs("eval_data[0]", x_eval)
    if jnp.shape(x_eval)[1:] != jnp.shape(x)[1:]:
        raise ArgumentError("eval_data[0]", f"holds examples of shape "
                                            f"{shape_str(jnp.shape(x_eval)[1:])}, but x's are "
                                            f"{shape_str(jnp.shape(x)[1:])}; they must match.")
    _check_batch_of_targets("eval_data[1]", y_eval, n_eval, "eval_data[0]")
    try:
        check_targets(output_struct(params, x_eval, out_shape), y_eval, loss)
    except (ArgumentError, LayerError) as error:
        raise ArgumentError("eval_data[1]", getattr(error, "problem", str(error))) from None


def _check_checkpoint_path(checkpoint_path) -> None:
    try:
        path = os.fspath(checkpoint_path)
    except TypeError:
        raise ArgumentError("checkpoint_path", f"must be a file path (str or os.PathLike), got "
                                               f"{checkpoint_path!r}.") from None
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ArgumentError("checkpoint_path", f"{path} is a directory; give a file name in it, "
                                               f"e.g. {os.path.join(path, 'checkpoint.npz')}.")
    if not os.path.isdir(directory):
        raise ArgumentError("checkpoint_path", f"its directory {directory} does not exist; "
                                               f"create it first (os.makedirs(..., "
                                               f"exist_ok=True)).")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ArgumentError("checkpoint_path", f"its directory {directory} is not writable, so "
                                               f"no checkpoint could be saved; choose another "
                                               f"directory or fix its permissions.")
