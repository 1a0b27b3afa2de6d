"""Kronecker factors of the GGN's dense blocks: KFLR (exact) and KFAC (sampled).

For a dense layer o = w^T z + b with a vector input z_b (fan_in,), write zbar_b = [z_b; 1]
(no 1 when bias=False) and W = [w; b] (fan_in + 1, out). Then A_b^T s = zbar_b s^T for a
column s at the output, and the GGN block of W (flattened row-major) is

    mean_b sum_m (zbar_b s_mb^T)(zbar_b s_mb^T)^T = mean_b kron(zbar_b zbar_b^T, S_b S_b^T),

which for one example is exactly kron(A, G). K-FAC approximates the mean of the products
by the product of the means (Martens & Grosse, 2015):

    A = mean_b zbar_b zbar_b^T   (fan_in + 1, fan_in + 1)
    G = mean_b S_b S_b^T = mean_b of the GGN of l_b at the layer's output   (out, out)

KFLR takes the exact square root of the loss Hessian (C columns, Botev et al., 2017),
KFAC a sampled one (``samples`` columns; needs backprop's key). Any other layer (a dense
layer on sequences, conv, ...) gets None in its slot.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Tuple

from funcnet._arguments import check_int
from funcnet.ad._factors import GGN, sampled
from funcnet.ad.extensions._base import Extension, LeafContext


def kronecker_factors(context: LeafContext, kind: str):
    """(A, G) from the factor of ``kind``, by the layer's ``"kronecker_factors"`` rule (dense
    layers with vector inputs); None for every other layer."""
    rule = context.layer.rule("kronecker_factors")
    if rule is None:
        return None
    (factor,) = context.factors[kind]
    return rule(context.layer, context.params, context.z, *factor)


@dataclasses.dataclass(frozen=True)
class KFLR(Extension):
    """(A, G) per dense layer with vector inputs, G from the exact loss Hessian root."""

    name = "kflr"

    @property
    def factor_kinds(self) -> Tuple[str, ...]:
        return (GGN,)

    def empty_share(self, params) -> Any:
        return None

    def at_leaf(self, context: LeafContext):
        return kronecker_factors(context, GGN)


@dataclasses.dataclass(frozen=True)
class KFAC(Extension):
    """(A, G) per dense layer with vector inputs, G from ``samples`` sampled targets."""

    samples: int = 1
    name = "kfac"

    def __post_init__(self):
        object.__setattr__(self, "samples", check_int("kfac(samples)", self.samples, minimum=1))

    @property
    def factor_kinds(self) -> Tuple[str, ...]:
        return (sampled(self.samples),)

    def empty_share(self, params) -> Any:
        return None

    def at_leaf(self, context: LeafContext):
        return kronecker_factors(context, sampled(self.samples))


def kflr() -> KFLR:
    """The ``"kflr"`` extension: exact Kronecker factors (A, G) of every dense layer with
    vector inputs, None in every other layer's slot.

    Example:
      >>> import jax, jax.numpy as jnp, funcnet as fnet
      >>> net = fnet.chain(fnet.dense(3), fnet.tanh, fnet.dense(2))
      >>> params, _ = net.init(jax.random.key(0), (4,))
      >>> record = fnet.backprop(net, fnet.losses.squared_error, params, jnp.ones((5, 4)),
      ...                        jnp.zeros((5, 2)), extensions=(fnet.extensions.kflr(),))
      >>> a, g = record.extensions["kflr"][0]
      >>> a.shape, g.shape, record.extensions["kflr"][1]
      ((5, 5), (3, 3), None)
    """
    return KFLR()


def kfac(samples: int = 1) -> KFAC:
    """The ``"kfac"`` extension: Kronecker factors with G from ``samples`` sampled targets
    per example (:func:`funcnet.backprop` needs ``key=``)."""
    return KFAC(samples)
