"""``batch_l2``: every example's squared gradient norm per params leaf, from the one walk."""

from __future__ import annotations

import dataclasses

import jax

from funcnet.ad.extensions._base import Extension, LeafContext, per_example_sq_norms


@dataclasses.dataclass(frozen=True)
class BatchL2(Extension):
    """||g_b||^2 summed over each params leaf, leaves (B,).

    g_b = B a_b with a_b = A_b^T q_b (example b's row of q_{i+1} pulled back alone), so
    ||g_b||^2 = B^2 ||a_b||^2. Dense layers give ||a_b||^2 without forming a_b:
    ||z_b||^2 ||q_b||^2 for vector inputs, the Gram form <z_b z_b^T, q_b q_b^T> for
    sequences where it is cheaper; any other layer squares its per-example pullbacks.
    A repeat's copies add up (its leaf holds all copies). The square root of the sum over
    all leaves is ||g_b||, what :func:`funcnet.per_example_grad_norms` returns.
    """

    name = "batch_l2"
    batched = True
    copies = "sum"

    def at_leaf(self, context: LeafContext):
        scale = context.batch_size ** 2
        return jax.tree.map(lambda s: s * scale, per_example_sq_norms(context))


def batch_l2() -> BatchL2:
    """The ``"batch_l2"`` extension: per-example squared gradient norms, leaves (B,).

    Example:
      >>> import jax, jax.numpy as jnp, funcnet as fnet
      >>> net = fnet.chain(fnet.dense(3), fnet.tanh, fnet.dense(2))
      >>> params, _ = net.init(jax.random.key(0), (4,))
      >>> record = fnet.backprop(net, fnet.losses.squared_error, params, jnp.ones((5, 4)),
      ...                        jnp.zeros((5, 2)), extensions=(fnet.extensions.batch_l2(),))
      >>> record.extensions["batch_l2"][0]["w"].shape
      (5,)
    """
    return BatchL2()
