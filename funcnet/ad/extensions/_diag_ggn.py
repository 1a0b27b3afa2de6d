"""The diagonal of the generalized Gauss-Newton matrix: exact, per example, and sampled.

With J_b = d net(w, x_b) / d w and H_b the Hessian of example b's loss at its output,
the GGN of the batch loss is G = mean_b J_b^T H_b J_b. The walk carries a square root
S_b of H_b down (``funcnet.ad._factors``: C columns, or M sampled ones), so at layer i
the block of layer i's params is

    G_ii = mean_b A_b^T S_b S_b^T A_b = mean_b sum_m (A_b^T S[m, b]) (A_b^T S[m, b])^T,

and its diagonal needs only the squares of the M pulled-back columns: for a dense layer
with vector inputs, (Z^2)^T (sum_m S_m^2) / B, one matrix product.
"""

from __future__ import annotations

import dataclasses
from typing import Tuple

import jax

from funcnet._arguments import check_int
from funcnet.ad._factors import GGN, sampled
from funcnet.ad.extensions._base import (Extension, LeafContext, factor_diag,
                                         per_example_factor_diag)


@dataclasses.dataclass(frozen=True)
class DiagGGN(Extension):
    """diag(G), leaves like params: sum_b sum_m (A_b^T S[m, b])^2 / B with S_b S_b^T = H_b
    exactly (C = the output size columns). Costs about C pullbacks per layer."""

    name = "diag_ggn"

    @property
    def factor_kinds(self) -> Tuple[str, ...]:
        return (GGN,)

    def at_leaf(self, context: LeafContext):
        (factor,) = context.factors[GGN]
        return jax.tree.map(lambda a: a / context.batch_size, factor_diag(context, factor))


@dataclasses.dataclass(frozen=True)
class BatchDiagGGN(Extension):
    """diag(J_b^T H_b J_b) for every example b, leaves (B, *shape): the terms whose mean
    over b is ``diag_ggn``."""

    name = "batch_diag_ggn"
    batched = True

    @property
    def factor_kinds(self) -> Tuple[str, ...]:
        return (GGN,)

    def at_leaf(self, context: LeafContext):
        (factor,) = context.factors[GGN]
        return per_example_factor_diag(context, factor)


@dataclasses.dataclass(frozen=True)
class DiagGGNMC(Extension):
    """An unbiased Monte Carlo estimate of diag(G), leaves like params: S_b of ``samples``
    columns, the gradients of l_b at targets drawn from the model's predictive
    distribution, divided by sqrt(samples) (``fnet.sampled_hessian_sqrt``), so that
    E[S_b S_b^T] = H_b. Costs about ``samples`` pullbacks per layer; needs backprop's key."""

    samples: int = 1
    name = "diag_ggn_mc"

    def __post_init__(self):
        object.__setattr__(self, "samples",
                           check_int("diag_ggn_mc(samples)", self.samples, minimum=1))

    @property
    def factor_kinds(self) -> Tuple[str, ...]:
        return (sampled(self.samples),)

    def at_leaf(self, context: LeafContext):
        (factor,) = context.factors[sampled(self.samples)]
        return jax.tree.map(lambda a: a / context.batch_size, factor_diag(context, factor))


def diag_ggn() -> DiagGGN:
    """The ``"diag_ggn"`` extension: the exact GGN diagonal, leaves like params.

    Example:
      >>> import jax, jax.numpy as jnp, funcnet as fnet
      >>> net = fnet.chain(fnet.dense(3), fnet.tanh, fnet.dense(2))
      >>> params, _ = net.init(jax.random.key(0), (4,))
      >>> record = fnet.backprop(net, fnet.losses.squared_error, params, jnp.ones((5, 4)),
      ...                        jnp.zeros((5, 2)), extensions=(fnet.extensions.diag_ggn(),))
      >>> record.extensions["diag_ggn"][2]["w"].shape
      (3, 2)
    """
    return DiagGGN()


def batch_diag_ggn() -> BatchDiagGGN:
    """The ``"batch_diag_ggn"`` extension: every example's GGN diagonal, leaves (B, *shape)."""
    return BatchDiagGGN()


def diag_ggn_mc(samples: int = 1) -> DiagGGNMC:
    """The ``"diag_ggn_mc"`` extension: a Monte Carlo GGN diagonal from ``samples`` sampled
    targets per example; :func:`funcnet.backprop` needs ``key=``."""
    return DiagGGNMC(samples)
