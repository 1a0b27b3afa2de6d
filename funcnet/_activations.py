"""Elementwise activation layers: parameterless g(z) = sigma(z), shape-preserving.

For these layers A_i is empty (params ``()``) and B_i is diagonal: B_i = diag(sigma'(z_i)),
so the backward step q_i = B_i^T q_{i+1} is the elementwise product sigma'(z_i) * q_{i+1}.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from funcnet._errors import LayerError
from funcnet._layer import Layer


@dataclasses.dataclass(frozen=True)
class Elementwise(Layer):
    """A parameterless layer applying ``fn`` to every entry; params ``()``."""

    fn: Callable[[jax.Array], jax.Array]
    name: str

    def init(self, key, in_shape):
        return (), tuple(in_shape)

    def apply(self, params, z):
        return self.fn(z)


def _gelu(z):
    return jax.nn.gelu(z, approximate=False)


#: max(z, 0); its derivative at 0 is 0 (JAX's convention, and the lecture notes').
relu = Elementwise(jax.nn.relu, "relu")
tanh = Elementwise(jnp.tanh, "tanh")
sigmoid = Elementwise(jax.nn.sigmoid, "sigmoid")
softplus = Elementwise(jax.nn.softplus, "softplus")
gelu = Elementwise(_gelu, "gelu")
identity = Elementwise(lambda z: z, "identity")


@dataclasses.dataclass(frozen=True)
class LeakyRelu(Layer):
    """``z if z >= 0 else alpha * z``; params ``()``. The derivative at 0 is alpha."""

    alpha: float

    def __post_init__(self):
        if not isinstance(self.alpha, (int, float)):
            raise LayerError(f"leaky_relu(alpha) needs a Python number, got {self.alpha!r}.")

    @property
    def name(self) -> str:
        return f"leaky_relu({self.alpha})"

    def init(self, key, in_shape):
        return (), tuple(in_shape)

    def apply(self, params, z):
        return jnp.where(z > 0, z, self.alpha * z)


def leaky_relu(alpha: float = 0.01) -> Layer:
    """A leaky relu with negative slope ``alpha`` (a Python number)."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise LayerError(
            f"leaky_relu(alpha) needs a Python number for the negative slope, got {alpha!r} "
            f"of type {type(alpha).__name__}; e.g. leaky_relu(0.01).")
    return LeakyRelu(float(alpha))
