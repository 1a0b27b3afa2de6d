"""Reverse mode, hand-written: the forward pass records pullbacks, the backward pass walks down.

For a chain z_{i+1} = g_i(w_i; z_i), i = 1..L, and a loss l_y(z_{L+1}):

    forward:   z_{i+1} = g_i(w_i; z_i), keeping the pullback of g_i at (w_i, z_i)
    seed:      q_{L+1} = grad l_y(z_{L+1})
    backward:  for i = L, ..., 1:   (p_i, q_i) = pullback_i(q_{i+1}) = (A_i^T q_{i+1}, B_i^T q_{i+1})

where (A_i, B_i) is the Jacobian of g_i split into parameter and input columns. Each
pullback is a vector-Jacobian product from ``jax.vjp`` of that one layer: A_i and B_i are
never materialised, only cotangent vectors flow. Chains nested inside a chain, and the
inner layer of a residual, are walked by the same code recursively; ``jax.grad`` is never
called on this path.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, List, NamedTuple, Tuple

import jax
import jax.numpy as jnp
from jax.tree_util import Partial

from funcnet import _repeat_residuals
from funcnet._chain import Chain, Residual, top_level
from funcnet._errors import LayerError, shape_str
from funcnet._inputs import check_batch, check_scalar_loss, check_targets
from funcnet._layer import Layer
from funcnet._repeat import Repeat

Loss = Callable[[jax.Array, Any], jax.Array]

#: Memory policies of the backward pass; see :func:`value_and_grad`.
REMAT_POLICIES = ("keep", "sqrt", "recompute")


def layer_vjp(layer: Layer, params, z, remat: str = "keep"):
    """``(z_next, pullback)`` with ``pullback(q_next) -> (p, q) = (A^T q_next, B^T q_next)``.

    Chains and residuals recurse into this module's own loop, a repeat into two scans
    that keep only the activations its layers need (``funcnet._repeat_residuals``); any
    other layer is one ``jax.vjp`` of its ``apply``. The pullback is a pytree (a
    ``jax.tree_util.Partial``), so it may be returned from a jitted function or stacked
    by ``jax.lax.scan``. ``remat`` is the memory policy of repeats inside the layer (see
    ``funcnet._remat``); chains and residuals pass it down.
    """
    if isinstance(layer, Chain):
        out, _, pullbacks = forward_pass(layer.layers, params, z, remat)
        return out, Partial(_chain_pullback, tuple(pullbacks))
    if isinstance(layer, Residual):
        inner_out, inner_pullback = layer_vjp(layer.inner, params, z, remat)
        return z + inner_out, Partial(_residual_pullback, inner_pullback)
    if isinstance(layer, Repeat):
        if remat != "keep":
            from funcnet import _remat  # the policies build on this module

            return _remat.repeat_vjp(layer, params, z, remat)
        return _repeat_residuals.repeat_vjp(layer, params, z, layer_vjp)
    if is_concrete(params, z):  # called without jit: run compiled per-layer code
        out, pullback = compiled_vjp(layer)(params, z)
        return out, Partial(_run_pullback, pullback)
    return jax.vjp(layer.apply, params, z)


# --- Without jax.jit --------------------------------------------------------------------
# Called eagerly, jax.vjp would dispatch every operation of every layer one by one (8-12x
# slower than jitted code). Instead each layer's forward-with-pullback is compiled once
# per layer and shapes and reused; the pullback it returns is a pytree of residuals that
# one more compiled function applies. The caches are bounded and keyed on the (hashable,
# immutable) layers, so repeated calls reuse them and they do not grow.


def is_concrete(*trees) -> bool:
    """True when no leaf is a tracer, i.e. we are not inside jit, vmap or grad."""
    return not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(trees))


@functools.lru_cache(maxsize=1024)
def compiled_vjp(layer: Layer):
    """``jax.jit`` of ``(params, z) -> jax.vjp(layer.apply, params, z)``, one per layer."""
    return jax.jit(lambda params, z: jax.vjp(layer.apply, params, z))


@jax.jit
def _run_pullback(pullback, q):
    return pullback(q)


@functools.lru_cache(maxsize=256)
def _compiled_loss_seed(loss: Loss):
    return jax.jit(lambda out, y: _loss_and_seed(loss, out, y))


def forward_pass(layers, params, x, remat: str = "keep"):
    """Runs the chain forward; returns (z_{L+1}, [z_1..z_{L+1}], [pullback_1..pullback_L])."""
    activations, pullbacks = [x], []
    z = x
    for layer, layer_params in zip(layers, params):
        z, pullback = layer_vjp(layer, layer_params, z, remat)
        activations.append(z)
        pullbacks.append(pullback)
    return z, activations, pullbacks


def backward_pass(pullbacks, q):
    """Walks the chain down from q = q_{L+1}: returns ((p_1..p_L), [q_1..q_{L+1}])."""
    grads: List[Any] = [None] * len(pullbacks)
    cotangents = [q]
    for i in reversed(range(len(pullbacks))):
        grads[i], q = pullbacks[i](q)  # p_i = A_i^T q_{i+1},  q_i = B_i^T q_{i+1}
        cotangents.append(q)
    return tuple(grads), cotangents[::-1]


def _chain_pullback(pullbacks, q):
    grads, cotangents = backward_pass(pullbacks, q)
    return grads, cotangents[0]


def _residual_pullback(inner_pullback, q):
    p, q_inner = inner_pullback(q)  # A^T q and B_inner^T q
    return p, q + q_inner  # B = I + B_inner


def vjp(net: Layer, params, x):
    """``(out, pullback)`` of the network at (params, x), by the hand-written backward pass.

    Args:
      net: a layer (usually a chain).
      params: its params, as built by ``net.init``.
      x: inputs, shape (B, *in_shape).

    Returns:
      ``out`` of shape (B, *out_shape) and ``pullback(ct) -> (ct_params, ct_x)``: for a
      cotangent ``ct`` shaped like ``out``, ``ct_params = J_w^T ct`` (structure of params;
      the p_i of the notes when ct is q_{L+1}) and ``ct_x = J_x^T ct`` (q_1).
    """
    check_batch(net, params, x)
    out, pullback = layer_vjp(net, params, x)
    # the output shape is static: bound into the function part of the Partial, not a leaf
    return out, Partial(functools.partial(_checked_pullback, tuple(out.shape)), pullback)


def _checked_pullback(out_shape, pullback, ct):
    if jnp.shape(ct) != out_shape:
        raise LayerError(
            f"the cotangent passed to the pullback has shape {shape_str(jnp.shape(ct))}, "
            f"but the network's output has shape {shape_str(out_shape)}; pass an "
            f"array shaped like the output."
        )
    return pullback(ct)


class Backprop(NamedTuple):
    """Everything the backward pass computed, indexed as in the lecture notes.

    Attributes:
      value: the loss l_y(z_{L+1}), a scalar.
      grads: p_1..p_L, the parameter gradients; exactly the structure of params.
      cotangents: q_1..q_{L+1}, a tuple of L+1 arrays; q_i = d loss / d z_i, shaped like
        z_i. q_{L+1} is the loss gradient at the outputs and q_1 the input gradient.
      activations: z_1..z_{L+1}, a tuple of L+1 arrays; z_1 = x, z_{L+1} the outputs.

    L counts the net's top-level layers (a nested chain counts as one layer; a network
    that is not a chain counts as a chain of one).
    """

    value: jax.Array
    grads: Any
    cotangents: Tuple[jax.Array, ...]
    activations: Tuple[jax.Array, ...]


def backprop(net: Layer, loss: Loss, params, x, y) -> Backprop:
    """The forward and the hand-written backward pass, keeping every intermediate quantity.

    Args:
      net: a layer (usually a chain) of L top-level layers.
      loss: ``loss(outputs, targets) -> scalar`` (the batch mean), e.g. a ``fnet.losses`` one.
      params: the net's params; x: inputs (B, *in_shape); y: targets for ``loss``.

    Returns:
      A :class:`Backprop` record: value, grads (p_i), cotangents (q_1..q_{L+1}) and
      activations (z_1..z_{L+1}).
    """
    check_batch(net, params, x)
    layers, layer_params = top_level(net, params)
    out, activations, pullbacks = forward_pass(layers, layer_params, x)
    value, q = loss_and_seed(loss, out, y)
    grads, cotangents = backward_pass(pullbacks, q)
    if not isinstance(net, Chain):
        grads = grads[0]
    return Backprop(value, grads, tuple(cotangents), tuple(activations))


def loss_and_seed(loss: Loss, out, y):
    """The loss value l_y(z_{L+1}) and the seed of the backward pass q_{L+1} = grad l_y."""
    check_targets(out, y, loss)
    if is_concrete(out, y):
        try:
            return _compiled_loss_seed(loss)(out, y)
        except TypeError:  # an unhashable loss object: run it op by op
            pass
    return _loss_and_seed(loss, out, y)


def _loss_and_seed(loss: Loss, out, y):
    value, loss_pullback = jax.vjp(lambda z: loss(z, y), out)
    check_scalar_loss(value, loss)
    (q,) = loss_pullback(jnp.ones_like(value))
    return value, q


def value_and_grad(net: Layer, loss: Loss, remat: str = "keep"):
    """``f(params, x, y) -> (loss value, grads)`` by the hand-written backward pass.

    The same numbers as ``jax.value_and_grad(lambda p: loss(net.apply(p, x), y))``; grads
    have exactly the structure of params. Wrap in ``jax.jit`` for speed.

    Args:
      net, loss: the network and ``loss(out, y) -> scalar``.
      remat: what the forward pass keeps for the backward pass (``funcnet._remat``):
        ``"keep"`` every layer's residuals (fastest; memory grows with depth),
        ``"sqrt"`` only the inputs of segments of about sqrt(L) layers, each segment
        recomputed once on the way down (about one extra forward pass), or
        ``"recompute"`` only the input x, every layer's input recomputed from x when the
        backward pass reaches it (least memory; O(L^2) layer evaluations).

    Example:
      >>> import jax, jax.numpy as jnp, funcnet as fnet
      >>> net = fnet.chain(fnet.dense(8), fnet.tanh, fnet.dense(1))
      >>> params, _ = net.init(jax.random.key(0), (3,))
      >>> x, y = jnp.ones((5, 3)), jnp.zeros((5, 1))
      >>> value, grads = jax.jit(fnet.value_and_grad(net, fnet.losses.squared_error))(params, x, y)
      >>> grads[0]["w"].shape
      (3, 8)
    """
    if remat not in REMAT_POLICIES:
        raise LayerError(f"remat must be one of {REMAT_POLICIES}, got {remat!r}.")

    def value_and_grad_fn(params, x, y):
        if remat == "keep":
            record = backprop(net, loss, params, x, y)
            return record.value, record.grads
        from funcnet import _remat  # the policies are built on this module's walk

        return _remat.value_and_grad(net, loss, params, x, y, remat)

    return value_and_grad_fn


def grad(net: Layer, loss: Loss, remat: str = "keep"):
    """``f(params, x, y) -> grads``; see :func:`value_and_grad`."""
    value_and_grad_fn = value_and_grad(net, loss, remat)

    def grad_fn(params, x, y):
        return value_and_grad_fn(params, x, y)[1]

    return grad_fn
