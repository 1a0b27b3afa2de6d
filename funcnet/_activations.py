"""Elementwise activation layers: parameterless g(z) = sigma(z), shape-preserving.

For these layers A_i is empty (params ``()``) and B_i is diagonal: B_i = diag(sigma'(z_i)),
so the backward step q_i = B_i^T q_{i+1} is the elementwise product sigma'(z_i) * q_{i+1}.
For tanh, sigmoid, relu and identity sigma'(z_i) is also a function of the layer's output
y = sigma(z_i) (``derivative_of_output``): 1 - y^2, y (1 - y), [y > 0] and 1. A repeat uses
that to keep one activation per layer instead of two (see ``funcnet._repeat_residuals``).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from funcnet._errors import LayerError
from funcnet._layer import Layer


@dataclasses.dataclass(frozen=True)
class Elementwise(Layer):
    """A parameterless layer applying ``fn`` to every entry; params ``()``.

    ``derivative_of_output``, when given, maps the output y = fn(z) to fn'(z) (same shape
    and dtype): the backward step can then be taken from the output alone.
    """

    fn: Callable[[jax.Array], jax.Array]
    name: str
    derivative_of_output: Optional[Callable[[jax.Array], jax.Array]] = None

    def init(self, key, in_shape):
        return (), tuple(in_shape)

    def apply(self, params, z):
        return self.fn(z)


def _gelu(z):
    return jax.nn.gelu(z, approximate=False)


def _tanh_derivative(y):
    return 1 - y * y


def _sigmoid_derivative(y):
    return y * (1 - y)


def _relu_derivative(y):
    return (y > 0).astype(y.dtype)  # y > 0 exactly where z > 0; 0 at z = 0, as JAX's relu


#: max(z, 0); its derivative at 0 is 0 (JAX's convention, and the lecture notes').
relu = Elementwise(jax.nn.relu, "relu", _relu_derivative)
tanh = Elementwise(jnp.tanh, "tanh", _tanh_derivative)
sigmoid = Elementwise(jax.nn.sigmoid, "sigmoid", _sigmoid_derivative)
softplus = Elementwise(jax.nn.softplus, "softplus")
gelu = Elementwise(_gelu, "gelu")
identity = Elementwise(lambda z: z, "identity", jnp.ones_like)


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
