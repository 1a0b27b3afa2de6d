"""``variance``: the variance over the batch of the per-example gradients."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from funcnet.ad.extensions._base import Extension, LeafContext
from funcnet.ad.extensions._second_moment import SecondMoment


@dataclasses.dataclass(frozen=True)
class Variance(Extension):
    """mean_b g_b^2 - (mean_b g_b)^2 entrywise, leaves like params (the biased variance).

    mean_b g_b is p_i, which the walk has computed; the second moment comes from
    :class:`SecondMoment`'s rules. Computed as the difference it is defined by (as
    BackPACK does), so rounding can leave entries of a near-zero variance slightly
    negative; nothing is clamped. A batch of one example has variance exactly 0 (zeros,
    not the rounding residue of the difference).
    """

    name = "variance"

    def at_leaf(self, context: LeafContext):
        if context.batch_size == 1:
            return jax.tree.map(jnp.zeros_like, context.params)
        return jax.tree.map(lambda m, p: m - p * p, SecondMoment().at_leaf(context),
                            context.grads)


def variance() -> Variance:
    """The ``"variance"`` extension: the per-example gradients' variance, like params."""
    return Variance()
