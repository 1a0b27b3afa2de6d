"""The training state: params w, optimizer state s and the step count, as a pytree; the
copies that keep donation from consuming the caller's arrays; and the checks of what a
step is given (an optimizer, arrays not yet donated)."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from funcnet._caches import bounded_cache
from funcnet._errors import ArgumentError


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
