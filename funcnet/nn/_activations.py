"""Elementwise activation layers: parameterless g(z) = sigma(z), shape-preserving.

For these layers A_i is empty (params ``()``) and B_i is diagonal: B_i = diag(sigma'(z_i)),
so the backward step q_i = B_i^T q_{i+1} is the elementwise product sigma'(z_i) * q_{i+1}.
For tanh, sigmoid, relu and identity sigma'(z_i) is also a function of the layer's output
y = sigma(z_i): 1 - y^2, y (1 - y), [y > 0] and 1. Those layers say so
(``repeat_keeps = "output"``), and a repeat then keeps one activation per layer instead
of two; the others are recomputed from their input there (``repeat_keeps = "input"``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp

from funcnet._arguments import check_real, check_shape
from funcnet.nn._layer import Layer


@dataclasses.dataclass(frozen=True, repr=False)
class Elementwise(Layer):
    """A parameterless layer applying ``sigma`` to every entry; params ``()``.

    Subclasses give ``name``, ``formula`` and ``sigma``; those whose derivative is a
    function of the output set ``repeat_keeps = "output"`` and give
    :meth:`input_cotangent_from_output`.
    """

    name: ClassVar[str] = "elementwise"
    formula: ClassVar[str] = "sigma(z)"
    repeat_keeps: ClassVar[str] = "input"
    curvature: ClassVar[str] = "elementwise"

    def sigma(self, z: jax.Array) -> jax.Array:
        raise NotImplementedError

    def init(self, key, in_shape):
        return (), check_shape("in_shape", in_shape)

    def apply(self, params, z):
        return self.sigma(z)

    def flops(self, in_shape) -> int:
        """One per entry."""
        return math.prod(in_shape)

    def describe(self) -> str:
        return f"{self.formula}, per entry; no params"


class Relu(Elementwise):
    """relu(z) = max(z, 0) per entry; params ``()``. Its derivative at 0 is 0 (JAX's
    convention, and the lecture notes'): q_i = [z_i > 0] q_{i+1} = [y > 0] q_{i+1}."""

    name = "relu"
    formula = "max(z, 0)"
    repeat_keeps = "output"
    curvature = "linear"

    def sigma(self, z):
        return jax.nn.relu(z)

    def input_cotangent_from_output(self, y, q):
        return (y > 0).astype(y.dtype) * q  # y > 0 exactly where z > 0


class Tanh(Elementwise):
    """tanh(z) per entry; params ``()``; q_i = (1 - y^2) q_{i+1} for y = tanh(z_i)."""

    name = "tanh"
    formula = "tanh(z)"
    repeat_keeps = "output"

    def sigma(self, z):
        return jnp.tanh(z)

    def input_cotangent_from_output(self, y, q):
        return (1 - y * y) * q


class Sigmoid(Elementwise):
    """sigmoid(z) = 1 / (1 + exp(-z)) per entry; params ``()``;
    q_i = y (1 - y) q_{i+1} for y = sigmoid(z_i)."""

    name = "sigmoid"
    formula = "1 / (1 + exp(-z))"
    repeat_keeps = "output"

    def sigma(self, z):
        return jax.nn.sigmoid(z)

    def input_cotangent_from_output(self, y, q):
        return y * (1 - y) * q


class Identity(Elementwise):
    """z itself; params ``()``; q_i = q_{i+1}."""

    name = "identity"
    formula = "z"
    repeat_keeps = "output"
    curvature = "linear"

    def sigma(self, z):
        return z

    def input_cotangent_from_output(self, y, q):
        return q


class Softplus(Elementwise):
    """softplus(z) = log(1 + exp(z)) per entry (computed stably); params ``()``;
    q_i = sigmoid(z_i) q_{i+1}."""

    name = "softplus"
    formula = "log(1 + exp(z))"

    def sigma(self, z):
        return jax.nn.softplus(z)


class Gelu(Elementwise):
    """gelu(z) = z Phi(z) per entry, Phi the standard normal CDF (the exact form, not the
    tanh approximation); params ``()``."""

    name = "gelu"
    formula = "z Phi(z), Phi the normal CDF"

    def sigma(self, z):
        return jax.nn.gelu(z, approximate=False)


relu = Relu()
tanh = Tanh()
sigmoid = Sigmoid()
softplus = Softplus()
gelu = Gelu()
identity = Identity()


@dataclasses.dataclass(frozen=True, repr=False)
class LeakyRelu(Elementwise):
    """``z if z > 0 else alpha * z`` per entry; params ``()``. The derivative at 0 is alpha."""

    alpha: float = 0.01
    formula: ClassVar[str] = "z if z > 0 else alpha z"
    curvature: ClassVar[str] = "linear"

    def __post_init__(self):
        object.__setattr__(self, "alpha", check_real("leaky_relu(alpha)", self.alpha))

    @property
    def name(self) -> str:
        return f"leaky_relu({self.alpha})"

    def describe(self) -> str:
        return f"z if z > 0 else {self.alpha} z, per entry; no params"

    def sigma(self, z):
        return jnp.where(z > 0, z, self.alpha * z)


def leaky_relu(alpha: float = 0.01) -> Layer:
    """A leaky relu with negative slope ``alpha`` (a finite real number)."""
    return LeakyRelu(alpha)
