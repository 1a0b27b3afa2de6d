"""One step of training with any optax optimizer on top of funcnet's hand-written gradient.

    (value, p) = funcnet.value_and_grad(net, loss)(w, x, y)    # the one backward walk
    (u, s)     = optimizer.update(p, s, w)                      # any optax transformation
    w          = optax.apply_updates(w, u)

compiled as one ``jax.jit`` with the params and optimizer state donated, so XLA updates
them in place. Without extensions the compiled step is the program ``jax.value_and_grad``
compiles to (tested by XLA's FLOP count).
"""

from __future__ import annotations

from typing import Optional

import jax
import optax
from jax.sharding import Mesh

from funcnet._caches import bounded_cache
from funcnet._errors import ArgumentError
from funcnet.ad._inputs import check_loss, check_training_key, stochastic_layer
from funcnet.ad._reverse import Loss, value_and_grad
from funcnet.nn._layer import Layer
from funcnet.train._parallel import batch_sharded, replicated
from funcnet.train._privacy import DPSGD, check_privacy, private_train_step
from funcnet.train._sharding import constrain_state, splits_params
from funcnet.train._state import TrainState, check_not_donated, check_optimizer


def train_step(net: Layer, loss: Loss, optimizer: optax.GradientTransformation,
               mesh: Optional[Mesh] = None, remat: str = "keep",
               privacy: Optional[DPSGD] = None):
    """A jitted ``step(state, x, y, key=None) -> (state, loss value)``, state buffers donated.

    The donated ``state`` must not be used after the call (its buffers are reused for the
    new state); keep the returned one. Passing a donated state again raises
    :class:`funcnet.ArgumentError` naming ``state``. With a ``mesh`` (see
    :func:`funcnet.data_parallel_mesh`) the step is data-parallel: state replicated, x and
    y split along the batch over the mesh's devices (place them with
    :func:`funcnet.global_batch`, or :func:`funcnet.shard_batch` from each process's own
    rows). On a mesh with a ``"model"`` axis (:func:`funcnet.model_parallel_mesh`) the
    state is sharded as :func:`funcnet.state_shardings` says (place it with
    ``jax.device_put(state, fnet.state_shardings(net, state, mesh))``, or the first step
    moves it). ``remat`` is the backward pass's memory policy ("keep", "sqrt" or
    "recompute"; see :func:`funcnet.value_and_grad`). ``key`` reaches the net's stochastic
    layers (dropout): required when it holds one (a :class:`~funcnet.LayerError` names the
    layer), and a new one every step. Example::

        step = fnet.train_step(net, fnet.losses.softmax_cross_entropy, optax.adam(1e-3))
        state = fnet.init_train_state(params, optax.adam(1e-3))
        state, value = step(state, x, y)

    With ``privacy=fnet.dp_sgd(max_norm, noise_multiplier)`` the step is DP-SGD on the
    batch given: ``step(state, x, y, key)`` clips every example's gradient to max_norm,
    adds Gaussian noise of standard deviation noise_multiplier * max_norm drawn from
    ``key`` to the clipped sum and divides by the batch size; the sampling of the
    batches, and so the privacy accounting (:func:`funcnet.privacy_spent` for Poisson
    sampling), are the caller's. :func:`funcnet.fit` with ``privacy`` does both.
    """
    check_loss(loss)
    check_optimizer(optimizer)
    if privacy is not None:
        check_privacy(privacy)
        if mesh is not None:
            raise ArgumentError("privacy", "DP-SGD steps run on one device: leave mesh=None.")
        return private_train_step(net, loss, optimizer, privacy, remat)
    try:
        compiled = _compiled_train_step(net, loss, optimizer, mesh, remat)
    except TypeError:  # an unhashable loss or optimizer: compile without the cache
        compiled = _compiled_train_step.__wrapped__(net, loss, optimizer, mesh, remat)

    stochastic = stochastic_layer(net) is not None

    def step(state: TrainState, x, y, key=None):
        if not isinstance(state, TrainState):
            raise ArgumentError("state", f"must be a fnet.TrainState (fnet.init_train_state("
                                         f"params, optimizer)), got {type(state).__name__}.")
        if key is not None or stochastic:
            check_training_key(net, key)
        try:
            return compiled(state, x, y, key)
        except ValueError:  # jax's error for a deleted buffer, said plainly
            check_not_donated("state", state)
            raise

    step.lower = compiled.lower  # the jitted program's, for cost and memory analyses
    return step


@bounded_cache(maxsize=64)
def _compiled_train_step(net, loss, optimizer, mesh, remat):
    step = step_fn(net, loss, optimizer, remat)
    if mesh is None:
        return jax.jit(step, donate_argnums=0)
    batch, everywhere = batch_sharded(mesh), replicated(mesh)
    if splits_params(mesh):  # params split over "model": the shardings follow the shapes
        def sharded_step(state, x, y, key=None):
            state, value = step(constrain_state(net, state, mesh), x, y, key)
            return constrain_state(net, state, mesh), value

        return jax.jit(sharded_step, in_shardings=(None, batch, batch, everywhere),
                       out_shardings=(None, everywhere), donate_argnums=0)
    return jax.jit(step, in_shardings=(everywhere, batch, batch, everywhere),
                   out_shardings=(everywhere, everywhere), donate_argnums=0)


def step_fn(net, loss, optimizer, remat="keep"):
    """The uncompiled ``step(state, x, y, key=None) -> (state, value)``."""
    value_and_grad_fn = value_and_grad(net, loss, remat)

    def step(state: TrainState, x, y, key=None):
        value, grads = value_and_grad_fn(state.params, x, y, key)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(params, opt_state, state.step + 1), value

    return step


