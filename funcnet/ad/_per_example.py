"""Per-example quantities from the one backward walk: gradients, their norms, and the
clipped mean gradient of differentially private training.

For a batch of B examples, l_b is example b's own loss and g_b = grad_w l_b; the batch
loss is the mean of the l_b (as for every loss of ``fnet.losses``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from funcnet._arguments import check_real
from funcnet._errors import ArgumentError, LayerError, shape_str
from funcnet.ad import _compiled
from funcnet.ad._inputs import check_batch, check_loss, check_target_arrays
from funcnet.ad._reverse import Loss, backprop
from funcnet.ad._walk import Walk
from funcnet.ad.extensions import batch_grad, batch_l2
from funcnet.nn._chain import Chain, top_level, top_level_keys
from funcnet.nn._layer import Layer, apply_with_key


def per_example_grads(net: Layer, loss: Loss, remat: str = "keep"):
    """``f(params, x, y) -> grads`` with a leading batch axis on every leaf.

    Leaf b is g_b, the gradient of loss(net(params, x[b:b+1]), y[b:b+1]), example b's own
    loss, from ONE forward pass and ONE backward walk of the whole batch with the
    ``batch_grad`` extension (dense layers: g_b = B z_b^T q_b; other layers: their
    pullback one example at a time). The loss must be the batch mean of per-example
    losses, as every loss of ``fnet.losses`` is; then the mean over the batch axis equals
    ``fnet.grad(net, loss)(params, x, y)``. Jit-compatible. The function takes ``key=``
    for stochastic layers (dropout), as :func:`funcnet.backprop` does: g_b is then the
    gradient of example b's loss under the batch's own masks.

    Example:
      >>> import jax, jax.numpy as jnp, funcnet as fnet
      >>> net = fnet.chain(fnet.dense(3), fnet.relu, fnet.dense(2))
      >>> params, _ = net.init(jax.random.key(0), (4,))
      >>> g = fnet.per_example_grads(net, fnet.losses.squared_error)(
      ...     params, jnp.ones((6, 4)), jnp.zeros((6, 2)))
      >>> g[2]["w"].shape
      (6, 3, 2)
    """
    check_loss(loss)
    extensions = (batch_grad(),)
    Walk(remat, extensions)

    def per_example_grads_fn(params, x, y, key=None):
        _check_per_example_targets(net, params, x, y)
        record = backprop(net, loss, params, x, y, extensions=extensions, remat=remat, key=key)
        return record.extensions["batch_grad"]

    return per_example_grads_fn


def per_example_grad_norms(net: Layer, loss: Loss, remat: str = "keep"):
    """``f(params, x, y) -> (B,)``: ||g_b|| over all params, example by example.

    From ONE forward pass and ONE backward walk with the ``batch_l2`` extension: dense
    layers give ||g_b||^2 without forming g_b (||z_b||^2 ||q_b||^2 times B^2, or the Gram
    form for sequence inputs), so no per-example gradient is materialised for them; other
    layers square their per-example pullbacks. Jit-compatible; ``key=`` as for
    :func:`per_example_grads`.

    Example:
      >>> import jax, jax.numpy as jnp, funcnet as fnet
      >>> net = fnet.chain(fnet.dense(3), fnet.relu, fnet.dense(2))
      >>> params, _ = net.init(jax.random.key(0), (4,))
      >>> fnet.per_example_grad_norms(net, fnet.losses.squared_error)(
      ...     params, jnp.ones((6, 4)), jnp.zeros((6, 2))).shape
      (6,)
    """
    check_loss(loss)
    extensions = (batch_l2(),)
    Walk(remat, extensions)

    def norms_fn(params, x, y, key=None):
        _check_per_example_targets(net, params, x, y)
        record = backprop(net, loss, params, x, y, extensions=extensions, remat=remat, key=key)
        return _norms(record.extensions["batch_l2"], jnp.shape(x)[0], record.value.dtype)

    return norms_fn


def clipped_value_and_grad(net: Layer, loss: Loss, max_norm: float, remat: str = "keep"):
    """``f(params, x, y) -> (value, clipped grads)``: the batch loss and
    mean_b g_b min(1, max_norm / ||g_b||), each example's gradient clipped to norm
    ``max_norm`` before averaging (the clipped sum of DP-SGD, before its noise).

    One forward pass and one backward walk give the loss, every q_{i+1} and the norms
    ||g_b|| (``batch_l2``). With c_b = min(1, max_norm / ||g_b||) (1 for a zero
    gradient), the clipped mean is, layer by layer, the parameter pullback of the
    reweighted cotangent:

        sum_b c_b A_b^T q_b = A_i^T (diag(c) q_{i+1}),

    for dense Z^T diag(c) Q: one product per layer, no per-example gradient formed and
    no second backward pass through the network (q_i is not needed again). Each top-level
    layer's pullback is taken at its recorded input z_i; a top-level container (a nested
    chain, residual or repeat) pulls back through itself once more.

    Args:
      max_norm: the clipping norm, a positive finite number.
      remat: the walk's memory policy (see :func:`funcnet.value_and_grad`).

    The function takes ``key=`` as :func:`per_example_grads` does.
    """
    check_loss(loss)
    max_norm = check_real("max_norm", max_norm)
    if max_norm <= 0:
        raise ArgumentError("max_norm", f"must be positive, got {max_norm}.")
    extensions = (batch_l2(),)
    Walk(remat, extensions)

    def clipped_fn(params, x, y, key=None):
        _check_per_example_targets(net, params, x, y)
        record, _, grads = clipped_mean(net, loss, max_norm, remat, params, x, y, key=key)
        return record.value, grads

    return clipped_fn


def clipped_mean(net: Layer, loss: Loss, max_norm: float, remat: str, params, x, y,
                 weights=None, key=None):
    """(the walk's record, the norms ||g_b|| (B,), (1/B) sum_b w_b c_b g_b) with
    c_b = min(1, max_norm / ||g_b||) and example weights w_b (all 1 when None; DP-SGD
    passes a 0/1 mask for padded examples). Arguments are not checked here."""
    record = backprop(net, loss, params, x, y, extensions=(batch_l2(),), remat=remat, key=key)
    norms = _norms(record.extensions["batch_l2"], jnp.shape(x)[0], record.value.dtype)
    factors = jnp.where(norms > max_norm, max_norm / jnp.where(norms > 0, norms, 1), 1)
    if weights is not None:
        factors = factors * weights
    layers, layer_params = top_level(net, params)
    grads = []
    for i, (layer, w, layer_key) in enumerate(zip(layers, layer_params,
                                                   top_level_keys(net, key))):
        q = record.cotangents[i + 1]
        weighted = q * factors.reshape((-1,) + (1,) * (q.ndim - 1)).astype(q.dtype)
        grads.append(_param_pullback(layer, w, record.activations[i], weighted, layer_key))
    return record, norms, tuple(grads) if isinstance(net, Chain) else grads[0]


def _norms(squares, batch: int, dtype) -> jax.Array:
    """sqrt of the per-example squares summed over every params leaf, (B,)."""
    leaves = jax.tree.leaves(squares)
    total = sum(leaves[1:], leaves[0]) if leaves else jnp.zeros((batch,), dtype)
    return jnp.sqrt(total)


def _param_pullback(layer: Layer, w, z, q, key=None):
    """A^T q for the layer at input z (with its key, drawing the walk's masks again): the
    params part of its pullback (compiled per layer when called without jit; under jit
    XLA drops the unused forward output)."""
    if not jax.tree.leaves(w):
        return w
    if _compiled.is_concrete(w, z, q, key):
        _, pullback = _compiled.compiled_vjp(layer)(w, z, key)
        return _compiled.run_pullback(pullback, q)[0]
    return jax.vjp(lambda params: apply_with_key(layer, params, z, key), w)[1](q)[0]


def _check_per_example_targets(net: Layer, params, x, y) -> None:
    """Per-example quantities split the targets by example: every leaf of y must carry
    the batch axis of x."""
    check_batch(net, params, x)
    check_target_arrays(y)
    for leaf in jax.tree.leaves(y):
        if jnp.ndim(leaf) < 1 or jnp.shape(leaf)[0] != jnp.shape(x)[0]:
            raise LayerError(
                f"per-example quantities: targets of shape {shape_str(jnp.shape(leaf))} do "
                f"not have the inputs' batch size {jnp.shape(x)[0]} as their leading axis; "
                f"pass one target per example."
            )
