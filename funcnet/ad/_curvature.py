"""Curvature products, matrix-free: G v and H v from the hand-written passes.

For a batch of B examples, J_b = d net(w, x_b) / d w and H_b the Hessian of example b's
own loss l_b at its output; the batch loss is mean_b l_b. Then

    G v = mean_b J_b^T H_b J_b v    (the generalized Gauss-Newton matrix)
        = J^T [ Hess_out(loss) (J v) ]:  forward mode u = J v (``layer_jvp``, one jvp per
          layer), the loss Hessian applied to u (``jax.jvp`` of the loss's gradient in
          the outputs: row b is H_b u_b / B, the batch mean's block), and the backward
          walk seeded with it (p = J^T of that, the walk's A_i^T);
    H v = d/dt grad(w + t v) at t = 0: forward-over-reverse, ``jax.jvp`` of the walk's
          own gradient.

No Jacobian and no Hessian is formed; each product costs a few passes, under jit and
``jax.vmap`` (over v, say, for several directions at once).
"""

from __future__ import annotations

import jax

from funcnet.ad._forward import check_tangent_params, layer_jvp
from funcnet.ad._inputs import (check_batch, check_loss, check_targets, check_training_key,
                                output_struct)
from funcnet.ad._reverse import Loss, grad, layer_vjp
from funcnet.ad._walk import Walk
from funcnet.nn._layer import Layer


def _check(net: Layer, loss: Loss, params, x, y, v, key) -> None:
    out_shape = check_batch(net, params, x)
    check_training_key(net, key)
    check_targets(output_struct(params, x, out_shape), y, loss)
    check_tangent_params(net, params, v, what="v")


def ggn_vp(net: Layer, loss: Loss, remat: str = "keep"):
    """``f(params, x, y, v) -> G v``, G = mean_b J_b^T H_b J_b, v and G v like params.

    A composition of forward mode (u = J v), the loss Hessian in the outputs and the
    backward walk (J^T), never forming J or G. ``remat`` is the walk's memory policy;
    ``f`` takes ``key=`` for stochastic layers (dropout) as :func:`funcnet.backprop` does.
    G is positive semi-definite for convex losses (the three of ``fnet.losses``).

    Example:
      >>> import jax, jax.numpy as jnp, funcnet as fnet
      >>> net = fnet.chain(fnet.dense(3), fnet.tanh, fnet.dense(2))
      >>> params, _ = net.init(jax.random.key(0), (4,))
      >>> gv = fnet.ggn_vp(net, fnet.losses.squared_error)(
      ...     params, jnp.ones((5, 4)), jnp.zeros((5, 2)), params)
      >>> gv[0]["w"].shape
      (4, 3)
    """
    Walk(remat)
    check_loss(loss)

    def ggn_vp_fn(params, x, y, v, key=None):
        _check(net, loss, params, x, y, v, key)
        out, u = layer_jvp(net, params, x, v, None, key)  # u = J v
        _, hu = jax.jvp(jax.grad(lambda o: loss(o, y)), (out,), (u,))  # rows H_b u_b / B
        _, pullback = layer_vjp(net, params, x, remat, key)
        return pullback(hu)[0]  # J^T, by the walk

    return ggn_vp_fn


def hvp(net: Layer, loss: Loss, remat: str = "keep"):
    """``f(params, x, y, v) -> H v``, H the Hessian of the batch loss in the params.

    Forward-over-reverse: ``jax.jvp`` of the hand-written gradient (:func:`funcnet.grad`,
    the walk) in the direction v; exact for every layer, curved or not.

    Example:
      >>> import jax, jax.numpy as jnp, funcnet as fnet
      >>> net = fnet.chain(fnet.dense(3), fnet.tanh, fnet.dense(2))
      >>> params, _ = net.init(jax.random.key(0), (4,))
      >>> hv = fnet.hvp(net, fnet.losses.squared_error)(
      ...     params, jnp.ones((5, 4)), jnp.zeros((5, 2)), params)
      >>> hv[2]["b"].shape
      (2,)
    """
    grad_fn = grad(net, loss, remat)

    def hvp_fn(params, x, y, v, key=None):
        _check(net, loss, params, x, y, v, key)
        return jax.jvp(lambda w: grad_fn(w, x, y, key), (params,), (v,))[1]

    return hvp_fn
