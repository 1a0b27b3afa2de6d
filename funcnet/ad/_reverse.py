"""Reverse mode, public: vjp, value_and_grad, grad and backprop on the one backward walk.

For a chain z_{i+1} = g_i(w_i; z_i), i = 1..L, and a loss l_y(z_{L+1}):

    forward:   z_{i+1} = g_i(w_i; z_i), recording each layer's pullback
    seed:      q_{L+1} = grad l_y(z_{L+1})
    backward:  for i = L, ..., 1:   (p_i, q_i) = (A_i^T q_{i+1}, B_i^T q_{i+1})

The walk itself (``funcnet.ad._walk``) computes every step; these functions check their
inputs, seed it and shape what it returns. ``jax.grad`` is never called on this path.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Dict, Tuple

import jax
import jax.numpy as jnp
from jax.tree_util import Partial

from funcnet._arguments import check_array, check_float_leaves, check_key
from funcnet._errors import ArgumentError, LayerError, shape_str
from funcnet.ad import _compiled
from funcnet.ad._inputs import (check_batch, check_loss, check_targets, check_training_key,
                                output_struct)
from funcnet.ad import _factors as factors
from funcnet.ad._factors import Flow
from funcnet.ad._walk import Walk, record, record_layers, walk_down, walk_layers
from funcnet.ad.extensions._base import Extension
from funcnet.nn._chain import Chain, top_level, top_level_keys
from funcnet.nn._layer import Layer

Loss = Callable[[jax.Array, Any], jax.Array]


def layer_vjp(layer: Layer, params, z, remat: str = "keep", key=None):
    """``(z_next, pullback)`` with ``pullback(q_next) -> (p, q) = (A^T q_next, B^T q_next)``.

    The pullback is a pytree (a ``jax.tree_util.Partial`` over the recorded nodes), so it
    may be returned from a jitted function. ``remat`` is the memory policy of repeats
    inside the layer; ``key`` (optional) reaches its stochastic layers.
    """
    walk = Walk(remat)
    out, node = record(layer, params, z, walk, key)
    return out, Partial(functools.partial(_pullback, walk), node)


def _pullback(walk, node, q):
    down = walk_down(node, Flow(q), walk)
    return down.grads, down.q.q


def vjp(net: Layer, params, x, key=None):
    """``(out, pullback)`` of the network at (params, x), by the hand-written backward pass.

    Args:
      net: a layer (usually a chain).
      params: its params, as built by ``net.init``.
      x: inputs, shape (B, *in_shape).
      key: optional PRNG key for stochastic layers (dropout), split over them as
        ``net.apply(params, x, key=key)`` splits it; without one they are deterministic.

    Returns:
      ``out`` of shape (B, *out_shape) and ``pullback(ct) -> (ct_params, ct_x)``: for a
      cotangent ``ct`` shaped like ``out``, ``ct_params = J_w^T ct`` (structure of params;
      the p_i of the notes when ct is q_{L+1}) and ``ct_x = J_x^T ct`` (q_1).
    """
    check_batch(net, params, x)
    if key is not None:
        check_key("key", key)
    out, pullback = layer_vjp(net, params, x, key=key)
    # the output shape is static: bound into the function part of the Partial, not a leaf
    return out, Partial(functools.partial(_checked_pullback, tuple(out.shape)), pullback)


def _checked_pullback(out_shape, pullback, ct):
    check_array("ct", ct)
    check_float_leaves("ct", ct)
    if jnp.shape(ct) != out_shape:
        raise LayerError(
            f"the cotangent passed to the pullback has shape {shape_str(jnp.shape(ct))}, "
            f"but the network's output has shape {shape_str(out_shape)}; pass an "
            f"array shaped like the output."
        )
    return pullback(ct)


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["value", "grads", "cotangents", "activations", "extensions"],
                   meta_fields=[])
@dataclasses.dataclass(frozen=True)
class Backprop:
    """Everything the backward pass computed, indexed as in the lecture notes.

    Attributes:
      value: the loss l_y(z_{L+1}), a scalar.
      grads: p_1..p_L, the parameter gradients; exactly the structure of params.
      cotangents: q_1..q_{L+1}, a tuple of L+1 arrays; q_i = d loss / d z_i, shaped like
        z_i. q_{L+1} is the loss gradient at the outputs and q_1 the input gradient.
      activations: z_1..z_{L+1}, a tuple of L+1 arrays; z_1 = x, z_{L+1} the outputs.
      extensions: ``{name: result}`` for every extension asked for, each result a pytree
        like params (see ``fnet.extensions``); empty when none was.

    L counts the net's top-level layers (a nested chain counts as one layer; a network
    that is not a chain counts as a chain of one).
    """

    value: jax.Array
    grads: Any
    cotangents: Tuple[jax.Array, ...]
    activations: Tuple[jax.Array, ...]
    extensions: Dict[str, Any]


def backprop(net: Layer, loss: Loss, params, x, y, extensions=(), remat: str = "keep",
             key=None) -> Backprop:
    """The forward and the hand-written backward pass, keeping every intermediate quantity.

    Args:
      net: a layer (usually a chain) of L top-level layers.
      loss: ``loss(outputs, targets) -> scalar`` (the batch mean), e.g. a ``fnet.losses`` one.
      params: the net's params; x: inputs (B, *in_shape); y: targets for ``loss``.
      extensions: quantities computed by the same backward walk, e.g.
        ``(fnet.extensions.batch_grad(),)``; results in ``record.extensions[name]``.
      remat: the memory policy of the walk (see :func:`value_and_grad`).
      key: the PRNG key of the stochastic layers (dropout), split over them as
        ``net.apply(params, x, key=key)`` splits it: the result is exactly the gradient
        of ``loss(net.apply(params, x, key=key), y)``. Required when the net holds one
        (a :class:`~funcnet.LayerError` names it otherwise), and by the extensions that
        sample targets (``diag_ggn_mc``, ``kfac``), which draw from
        fold_in(key, 0x6D63).

    Returns:
      A :class:`Backprop` record: value, grads (p_i), cotangents (q_1..q_{L+1}),
      activations (z_1..z_{L+1}) and extensions.

    Example:
      >>> import jax, jax.numpy as jnp, funcnet as fnet
      >>> net = fnet.chain(fnet.dense(8), fnet.tanh, fnet.dense(1))
      >>> params, _ = net.init(jax.random.key(0), (3,))
      >>> record = fnet.backprop(net, fnet.losses.squared_error, params, jnp.ones((5, 3)),
      ...                        jnp.zeros((5, 1)))
      >>> [q.shape for q in record.cotangents]
      [(5, 3), (5, 8), (5, 8), (5, 1)]
    """
    if isinstance(extensions, Extension):  # one extension, not in a tuple
        extensions = (extensions,)
    if not isinstance(extensions, (tuple, list)):
        raise ArgumentError("extensions", f"must be a tuple of fnet.extensions objects such "
                                          f"as (fnet.extensions.batch_grad(),), got "
                                          f"{extensions!r}.")
    walk = Walk(remat, tuple(extensions))
    check_loss(loss)
    out_shape = check_batch(net, params, x)
    check_training_key(net, key)
    check_targets(output_struct(params, x, out_shape), y, loss)
    _check_extensions(walk, net, key)
    layers, layer_params = top_level(net, params)
    out, activations, nodes = record_layers(layers, layer_params, x, walk,
                                            top_level_keys(net, key))
    value, q = loss_and_seed(loss, out, y)
    flow = Flow(q, factors.seed(walk.factor_kinds, loss, out, y, key))
    grads, flows, shares = walk_layers(nodes, flow, walk)
    results = {}
    for k, extension in enumerate(walk.extensions):
        per_layer = tuple(share[k] for share in shares)
        results[extension.name] = per_layer if isinstance(net, Chain) else per_layer[0]
    grads = tuple(grads) if isinstance(net, Chain) else grads[0]
    return Backprop(value, grads, tuple(flow.q for flow in flows), tuple(activations), results)


def _check_extensions(walk: Walk, net: Layer, key) -> None:
    """Each extension's own check of the net, and a key for sampled curvature factors."""
    for extension in walk.extensions:
        extension.check_network(net)
        if key is None and any(factors.samples_of(kind) for kind in extension.factor_kinds):
            raise ArgumentError(
                "key", f"the {extension.name!r} extension samples targets from the model's "
                       f"predictive distribution and needs a PRNG key: pass "
                       f"key=jax.random.key(...) to backprop (a new one for each estimate).")


def loss_and_seed(loss: Loss, out, y):
    """The loss value l_y(z_{L+1}) and the seed of the backward pass q_{L+1} = grad l_y
    (targets checked by the caller)."""
    if _compiled.is_concrete(out, y):
        try:
            return _compiled.compiled_loss_seed(loss)(out, y)
        except TypeError:  # an unhashable loss object: run it op by op
            pass
    return _compiled.loss_and_seed(loss, out, y)


def value_and_grad(net: Layer, loss: Loss, remat: str = "keep"):
    """``f(params, x, y) -> (loss value, grads)`` by the hand-written backward pass.

    The same numbers as ``jax.value_and_grad(lambda p: loss(net.apply(p, x), y))``; grads
    have exactly the structure of params. Wrap in ``jax.jit`` for speed: the compiled
    program is the one ``jax.value_and_grad`` compiles to.

    Args:
      net, loss: the network and ``loss(out, y) -> scalar``.
      remat: what the forward pass keeps for the backward pass (``funcnet.ad._policies``):
        ``"keep"`` every layer's residuals (fastest; memory grows with depth),
        ``"sqrt"`` only the inputs of segments of about sqrt(L) layers, each segment
        recomputed once on the way down (about one extra forward pass), or
        ``"recompute"`` only the input x, every layer's input recomputed from x when the
        backward pass reaches it (least memory; O(L^2) layer evaluations).

    The function takes ``key=`` for stochastic layers (dropout; required when the net
    holds one), as :func:`backprop` does.

    Example:
      >>> import jax, jax.numpy as jnp, funcnet as fnet
      >>> net = fnet.chain(fnet.dense(8), fnet.tanh, fnet.dense(1))
      >>> params, _ = net.init(jax.random.key(0), (3,))
      >>> x, y = jnp.ones((5, 3)), jnp.zeros((5, 1))
      >>> value, grads = jax.jit(fnet.value_and_grad(net, fnet.losses.squared_error))(params, x, y)
      >>> grads[0]["w"].shape
      (3, 8)
    """
    Walk(remat)  # checks the policy and the loss now, before anything runs
    check_loss(loss)

    def value_and_grad_fn(params, x, y, key=None):
        record_ = backprop(net, loss, params, x, y, remat=remat, key=key)
        return record_.value, record_.grads

    return value_and_grad_fn


def grad(net: Layer, loss: Loss, remat: str = "keep"):
    """``f(params, x, y) -> grads``; see :func:`value_and_grad`."""
    value_and_grad_fn = value_and_grad(net, loss, remat)

    def grad_fn(params, x, y, key=None):
        return value_and_grad_fn(params, x, y, key)[1]

    return grad_fn
