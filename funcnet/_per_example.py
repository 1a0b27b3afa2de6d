"""Per-example gradients: the gradient of each example's own loss, batched with jax.vmap."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from funcnet._errors import LayerError, shape_str
from funcnet._inputs import check_batch, check_targets
from funcnet._layer import Layer
from funcnet._reverse import Loss, value_and_grad


def per_example_grads(net: Layer, loss: Loss):
    """``f(params, x, y) -> grads`` with a leading batch axis on every leaf.

    Leaf b is the gradient of loss(net(params, x[b:b+1]), y[b:b+1]), example b's own loss
    (a batch of one, so the batch mean is that example's loss), by the hand-written
    backward pass vmapped over the batch. The mean over the batch axis equals
    ``fnet.grad(net, loss)(params, x, y)``. Jit-compatible.
    """
    value_and_grad_fn = value_and_grad(net, loss)

    def one_example(params, x_b, y_b):
        return value_and_grad_fn(params, x_b[None], jax.tree.map(lambda t: t[None], y_b))[1]

    def per_example_grads_fn(params, x, y):
        check_batch(net, params, x)
        for leaf in jax.tree.leaves(y):
            if jnp.ndim(leaf) < 1 or jnp.shape(leaf)[0] != jnp.shape(x)[0]:
                raise LayerError(
                    f"per_example_grads: targets of shape {shape_str(jnp.shape(leaf))} do not "
                    f"have the inputs' batch size {jnp.shape(x)[0]} as their leading axis; "
                    f"pass one target per example."
                )
        check_targets(jax.eval_shape(net.apply, params, x), y, loss)
        return jax.vmap(one_example, in_axes=(None, 0, 0))(params, x, y)

    return per_example_grads_fn
