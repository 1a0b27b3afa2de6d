"""Reshaping layers."""

from __future__ import annotations

import dataclasses
import math

from funcnet._arguments import check_shape
from funcnet.nn._layer import Layer


@dataclasses.dataclass(frozen=True, repr=False)
class Flatten(Layer):
    """``(B, d1, ..., dk) -> (B, d1 * ... * dk)``; params ``()``. B_i is a reshape, so
    q_i is q_{i+1} reshaped back to the input shape."""

    name: str = "flatten"

    def init(self, key, in_shape):
        return (), (math.prod(check_shape("in_shape", in_shape)),)

    def apply(self, params, z):
        return z.reshape(z.shape[0], -1)

    def flops(self, in_shape) -> int:
        return 0

    def describe(self) -> str:
        return "each example's axes flattened into one; no params"


flatten = Flatten()
