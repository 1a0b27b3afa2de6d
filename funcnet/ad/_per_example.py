"""Per-example gradients from the one backward walk (the ``batch_grad`` extension)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from funcnet._errors import LayerError, shape_str
from funcnet.ad._inputs import check_batch, check_target_arrays
from funcnet.ad._reverse import Loss, backprop
from funcnet.ad.extensions import batch_grad
from funcnet.nn._layer import Layer


def per_example_grads(net: Layer, loss: Loss, remat: str = "keep"):
    """``f(params, x, y) -> grads`` with a leading batch axis on every leaf.

    Leaf b is g_b, the gradient of loss(net(params, x[b:b+1]), y[b:b+1]), example b's own
    loss, from ONE forward pass and ONE backward walk of the whole batch with the
    ``batch_grad`` extension (dense layers: g_b = B z_b^T q_b; other layers: their
    pullback one example at a time). The loss must be the batch mean of per-example
    losses, as every loss of ``fnet.losses`` is; then the mean over the batch axis equals
    ``fnet.grad(net, loss)(params, x, y)``. Jit-compatible.

    Example:
      >>> import jax, jax.numpy as jnp, funcnet as fnet
      >>> net = fnet.chain(fnet.dense(3), fnet.relu, fnet.dense(2))
      >>> params, _ = net.init(jax.random.key(0), (4,))
      >>> g = fnet.per_example_grads(net, fnet.losses.squared_error)(
      ...     params, jnp.ones((6, 4)), jnp.zeros((6, 2)))
      >>> g[2]["w"].shape
      (6, 3, 2)
    """
    extensions = (batch_grad(),)

    def per_example_grads_fn(params, x, y):
        check_batch(net, params, x)
        check_target_arrays(y)
        for leaf in jax.tree.leaves(y):
            if jnp.ndim(leaf) < 1 or jnp.shape(leaf)[0] != jnp.shape(x)[0]:
                raise LayerError(
                    f"per_example_grads: targets of shape {shape_str(jnp.shape(leaf))} do not "
                    f"have the inputs' batch size {jnp.shape(x)[0]} as their leading axis; "
                    f"pass one target per example."
                )
        record = backprop(net, loss, params, x, y, extensions=extensions, remat=remat)
        return record.extensions["batch_grad"]

    return per_example_grads_fn
