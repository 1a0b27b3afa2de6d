"""Dropout with an explicit key: ``z * m / (1 - rate)``, m ~ Bernoulli(1 - rate) per entry.

Dropout is the one stochastic built-in layer. It draws its mask only when given a key
(``net.apply(params, x, key=key)``, and every training entry point); without one it is
the identity, which is what evaluation wants. The mask is a function of the key alone,
so the same key gives the same mask eager or jitted, and a memory policy that recomputes
the forward pass (``sqrt``, ``recompute``) recomputes the same mask.

Per example, for a drawn mask m (entries 0 or 1): g(z) = (m / (1 - rate)) * z, so A_i is
empty (no params) and B_i = diag(m / (1 - rate)): q_i = (m / (1 - rate)) * q_{i+1}.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp

from funcnet._arguments import check_real, check_shape
from funcnet._errors import ArgumentError
from funcnet.nn._layer import Layer


@dataclasses.dataclass(frozen=True, repr=False)
class Dropout(Layer):
    """Each entry of each example dropped with probability ``rate``, kept ones scaled by
    1 / (1 - rate), when a key is given; the identity without one. Params ``()``; shapes
    unchanged (any per-example shape)."""

    rate: float

    stochastic: ClassVar[bool] = True
    # its pullback holds the mask, which only its key can rebuild: a repeat records it
    repeat_keeps: ClassVar = None
    curvature: ClassVar[str] = "linear"

    def __post_init__(self):
        rate = check_real("dropout(rate)", self.rate)
        if not 0 <= rate < 1:
            raise ArgumentError("dropout(rate)", f"is the probability of dropping an entry, "
                                                 f"in [0, 1), got {rate}.")
        object.__setattr__(self, "rate", rate)

    @property
    def name(self) -> str:
        return f"dropout({self.rate:g})"

    def describe(self) -> str:
        return (f"with a key: each entry zeroed with probability {self.rate:g}, the rest "
                f"divided by {1 - self.rate:g}; without one: z; no params")

    def init(self, key, in_shape):
        return (), check_shape("in_shape", in_shape)

    def apply(self, params, z, key=None):
        """z without a key; else z * m / (1 - rate), m ~ Bernoulli(1 - rate) per entry
        (shape of z, batch axis included: every example gets its own mask)."""
        if key is None or self.rate == 0:
            return z
        keep = jax.random.bernoulli(key, 1 - self.rate, jnp.shape(z))
        return jnp.where(keep, z / jnp.asarray(1 - self.rate, z.dtype), jnp.zeros((), z.dtype))

    def flops(self, in_shape) -> int:
        """One multiply per entry."""
        return math.prod(in_shape)


def dropout(rate: float) -> Dropout:
    """Dropout of probability ``rate`` in [0, 1); see :class:`Dropout`.

    Example:
      >>> import jax, jax.numpy as jnp, funcnet as fnet
      >>> net = fnet.chain(fnet.dense(8), fnet.relu, fnet.dropout(0.5), fnet.dense(1))
      >>> params, _ = net.init(jax.random.key(0), (3,))
      >>> x = jnp.ones((4, 3))
      >>> bool((net.apply(params, x) == net.apply(params, x)).all())  # no key: identity
      True
      >>> train = net.apply(params, x, key=jax.random.key(1))       # masks from the key
      >>> bool((train == net.apply(params, x, key=jax.random.key(1))).all())
      True
    """
    return Dropout(rate)
