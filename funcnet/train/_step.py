"""One step of training with any optax optimizer on top of funcnet's hand-written gradient.

    (value, p) = funcnet.value_and_grad(net, loss)(w, x, y)    # the one backward walk
    (u, s)     = optimizer.update(p, s, w)                      # any optax transformation
    w          = optax.apply_updates(w, u)

compiled as one ``jax.jit`` with the params and optimizer state donated, so XLA updates
them in place. Without extensions the compiled step is the program ``jax.value_and_grad``
compiles to (tested by XLA's FLOP count).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from funcnet._caches import bounded_cache
from funcnet._errors import ArgumentError
from funcnet.ad._inputs import check_loss
from funcnet.ad._reverse import Loss, value_and_grad
from funcnet.nn._layer import Layer
from funcnet.train._parallel import batch_sharded, replicated


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["params", "opt_state", "step"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class TrainState:
    """What a step reads and writes: params w, optimizer state s, and the step count
    (a pytree)."""

    params: Any
    opt_state: Any
    step: jax.Array


def init_train_state(params, optimizer: optax.GradientTransformation) -> TrainState:
    """A fresh :class:`TrainState` at step 0 holding its own copy of ``params``.

    The copy is what lets :func:`train_step` donate the state's buffers without
    invalidating the caller's ``params``. Built by one compiled program per optimizer
    (cached), not by one small program per parameter shape.
    """
    check_not_donated("params", params)
    check_optimizer(optimizer)
    try:
        return _compiled_init(optimizer)(params)
    except TypeError:  # an unhashable optimizer
        return _compiled_init.__wrapped__(optimizer)(params)


@jax.jit
def owned_copy(tree):
    """A copy of ``tree`` in new buffers (one compiled program per tree layout), which a
    donating step may consume without touching the caller's arrays."""
    return jax.tree.map(jnp.copy, tree)


@bounded_cache(maxsize=64)
def _compiled_init(optimizer):
    def init(params):
        params = jax.tree.map(jnp.copy, params)
        return TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32))

    return jax.jit(init)


def train_step(net: Layer, loss: Loss, optimizer: optax.GradientTransformation,
               mesh: Optional[Mesh] = None, remat: str = "keep"):
    """A jitted ``step(state, x, y) -> (state, loss value)``, state buffers donated.

    The donated ``state`` must not be used after the call (its buffers are reused for the
    new state); keep the returned one. Passing a donated state again raises
    :class:`funcnet.ArgumentError` naming ``state``. With a ``mesh`` (see
    :func:`funcnet.data_parallel_mesh`) the step is data-parallel: state replicated, x and
    y split along the batch over the mesh's devices (place them with
    :func:`funcnet.shard_batch`). ``remat`` is the backward pass's memory policy
    ("keep", "sqrt" or "recompute"; see :func:`funcnet.value_and_grad`). Example::

        step = fnet.train_step(net, fnet.losses.softmax_cross_entropy, optax.adam(1e-3))
        state = fnet.init_train_state(params, optax.adam(1e-3))
        state, value = step(state, x, y)
    """
    check_loss(loss)
    check_optimizer(optimizer)
    try:
        compiled = _compiled_train_step(net, loss, optimizer, mesh, remat)
    except TypeError:  # an unhashable loss or optimizer: compile without the cache
        compiled = _compiled_train_step.__wrapped__(net, loss, optimizer, mesh, remat)

    def step(state: TrainState, x, y):
        if not isinstance(state, TrainState):
            raise ArgumentError("state", f"must be a fnet.TrainState (fnet.init_train_state("
                                         f"params, optimizer)), got {type(state).__name__}.")
        try:
            return compiled(state, x, y)
        except ValueError:  # jax's error for a deleted buffer, said plainly
            check_not_donated("state", state)
            raise

    step.lower = compiled.lower  # the jitted program's, for cost and memory analyses
    return step


def check_optimizer(optimizer) -> None:
    """Refuses anything but an optax.GradientTransformation (init and update callables)."""
    if not (callable(getattr(optimizer, "init", None))
            and callable(getattr(optimizer, "update", None))):
        raise ArgumentError("optimizer", f"must be an optax.GradientTransformation such as "
                                         f"optax.adam(1e-3), got {optimizer!r}.")


def check_not_donated(argument: str, tree) -> None:
    """Raises ArgumentError when an array of ``tree`` was donated to an earlier step (its
    buffer now belongs to that step's result)."""
    if any(isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer)
           and leaf.is_deleted() for leaf in jax.tree.leaves(tree)):
        raise ArgumentError(
            argument, "was donated to an earlier train step, which reused its buffers for "
                      "the state it returned; pass that returned state instead (state, loss "
                      "= step(state, x, y)), or a FitResult's .state.")


@bounded_cache(maxsize=64)
def _compiled_train_step(net, loss, optimizer, mesh, remat):
    step = step_fn(net, loss, optimizer, remat)
    if mesh is None:
        return jax.jit(step, donate_argnums=0)
    state, batch = replicated(mesh), batch_sharded(mesh)
    return jax.jit(step, in_shardings=(state, batch, batch), out_shardings=(state, state),
                   donate_argnums=0)


def step_fn(net, loss, optimizer, remat="keep"):
    """The uncompiled ``step(state, x, y) -> (state, value)``."""
    value_and_grad_fn = value_and_grad(net, loss, remat)

    def step(state: TrainState, x, y):
        value, grads = value_and_grad_fn(state.params, x, y)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(params, opt_state, state.step + 1), value

    return step


