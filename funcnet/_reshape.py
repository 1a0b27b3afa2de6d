"""Reshaping layers."""

from __future__ import annotations

import dataclasses
import math

from funcnet._layer import Layer


@dataclasses.dataclass(frozen=True)
class Flatten(Layer):
    """``(B, d1, ..., dk) -> (B, d1 * ... * dk)``; params ``()``. B_i is a permutation-free
    identity (a reshape), so q_i is q_{i+1} reshaped back to the input shape."""

    name: str = "flatten"

    def init(self, key, in_shape):
        return (), (math.prod(in_shape),)

    def apply(self, params, z):
        return z.reshape(z.shape[0], -1)


flatten = Flatten()
