"""``second_moment``: the mean over the batch of the squared per-example gradients."""

from __future__ import annotations

import dataclasses

import jax

from funcnet.ad.extensions._base import Extension, LeafContext, sum_of_squares


@dataclasses.dataclass(frozen=True)
class SecondMoment(Extension):
    """mean_b g_b^2 entrywise, leaves like params.

    With g_b = B a_b (a_b = A_b^T q_b), mean_b g_b^2 = B sum_b a_b^2. Dense layers with
    vector inputs give sum_b a_b^2 as one product (Z^2)^T (Q^2), no a_b formed; any other
    layer squares its per-example pullbacks.
    """

    name = "second_moment"

    def at_leaf(self, context: LeafContext):
        batch = context.batch_size
        return jax.tree.map(lambda s: s * batch, sum_of_squares(context))


def second_moment() -> SecondMoment:
    """The ``"second_moment"`` extension: mean_b g_b^2, leaves like params."""
    return SecondMoment()
