"""``batch_grad``: every example's own gradient g_b, from the one backward walk."""

from __future__ import annotations

import dataclasses

import jax

from funcnet.ad.extensions._base import Extension, LeafContext, per_example_grads


@dataclasses.dataclass(frozen=True)
class BatchGrad(Extension):
    """g_b = grad_w l_b for every example b, leaves (B, *param leaf shape).

    At leaf layer i, example b's share of p_i = A_i^T q_{i+1} is A_b^T q_b (its row of
    q_{i+1} pulled back alone), and since the batch loss is the mean of the l_b,
    g_b = B A_b^T q_b. For dense layers that is B z_b^T q_b (one einsum, the layer's own
    rule); any other layer pulls back one example at a time (generic rule). The mean of
    the g_b over the batch is p_i.
    """

    name = "batch_grad"
    batched = True

    def at_leaf(self, context: LeafContext):
        batch = context.batch_size
        return jax.tree.map(lambda g: g * batch, per_example_grads(context))


def batch_grad() -> BatchGrad:
    """The ``"batch_grad"`` extension: per-example gradients, leaves (B, *shape).

    Example:
      >>> import jax, jax.numpy as jnp, funcnet as fnet
      >>> net = fnet.chain(fnet.dense(3), fnet.tanh, fnet.dense(2))
      >>> params, _ = net.init(jax.random.key(0), (4,))
      >>> x, y = jnp.ones((5, 4)), jnp.zeros((5, 2))
      >>> record = fnet.backprop(net, fnet.losses.squared_error, params, x, y,
      ...                        extensions=(fnet.extensions.batch_grad(),))
      >>> record.extensions["batch_grad"][0]["w"].shape
      (5, 4, 3)
    """
    return BatchGrad()
