"""Layer normalisation over the last axis, with its closed-form per-example rules.

For one row z (C,) of an example (the example's last axis; any axes before it are more
rows, normalised separately):

    mu = mean(z),   var = mean((z - mu)^2)          (the biased variance)
    zhat = (z - mu) / sqrt(var + eps),   y = zhat * scale + offset

The output is linear in the params, so A_i^T q is read off directly: per example b,
d scale_b = sum over the rows of q_b * zhat_b and d offset_b = sum over the rows of q_b,
both (C,). The rules below give every extension's quantity from these, without a
per-example pullback.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp

from funcnet._arguments import check_real, check_shape
from funcnet._errors import ArgumentError, LayerError, shape_str
from funcnet.nn._layer import Layer

DEFAULT_EPS = 1e-5


def _normalised(z, eps: float):
    """zhat = (z - mean) / sqrt(var + eps) over the last axis, var the biased variance."""
    centred = z - jnp.mean(z, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(centred), axis=-1, keepdims=True)
    return centred * jax.lax.rsqrt(var + eps)


def _per_example_grads(layer: "LayerNorm", params, z, q):
    """A_b^T q_b per example: {"scale": sum_rows q_b * zhat_b, "offset": sum_rows q_b},
    leaves (B, C); z and q (B, *rows, C)."""
    batch, features = z.shape[0], z.shape[-1]
    zhat = _normalised(z, layer.eps).reshape(batch, -1, features)
    q_rows = q.reshape(batch, -1, features)
    return {"scale": jnp.sum(q_rows * zhat, axis=1), "offset": jnp.sum(q_rows, axis=1)}


def _per_example_sq_norms(layer: "LayerNorm", params, z, q):
    """||A_b^T q_b||^2 per leaf, (B,): the (B, C) per-example grads, squared and summed."""
    return jax.tree.map(lambda a: jnp.sum(jnp.square(a), axis=1),
                        _per_example_grads(layer, params, z, q))


def _sum_of_squares(layer: "LayerNorm", params, z, q):
    """sum_b (A_b^T q_b)^2 entrywise, leaves (C,)."""
    return jax.tree.map(lambda a: jnp.sum(jnp.square(a), axis=0),
                        _per_example_grads(layer, params, z, q))


@dataclasses.dataclass(frozen=True, repr=False)
class LayerNorm(Layer):
    """``(z - mean) / sqrt(var + eps) * scale + offset`` over the last axis of z.

    Params: ``{"scale": (C,), "offset": (C,)}``, ones and zeros in JAX's default float
    dtype, C the last axis of the per-example shape. Shapes: ``(B, *S, C) -> (B, *S, C)``.

    Per example, for a row z (C,) with zhat, sigma = sqrt(var + eps) as in the module
    docstring and the output cotangent q (C,): A_i^T q = (q * zhat, q), summed over the
    rows of the example; B_i^T q = (g - mean(g) - zhat * mean(g * zhat)) / sigma with
    g = q * scale. A repeat keeps the input z_i and rebuilds the step from it.
    """

    eps: float = DEFAULT_EPS

    repeat_keeps: ClassVar[str] = "input"
    rules: ClassVar = (("per_example_grads", _per_example_grads),
                       ("per_example_sq_norms", _per_example_sq_norms),
                       ("sum_of_squares", _sum_of_squares))

    def __post_init__(self):
        eps = check_real("layer_norm(eps)", self.eps)
        if eps <= 0:
            raise ArgumentError("layer_norm(eps)", f"must be positive (it keeps the division "
                                                   f"by sqrt(var + eps) finite for constant "
                                                   f"rows), got {eps}.")
        object.__setattr__(self, "eps", eps)

    @property
    def name(self) -> str:
        return "layer_norm" if self.eps == DEFAULT_EPS else f"layer_norm(eps={self.eps:g})"

    def describe(self) -> str:
        return (f"(z - mean) / sqrt(var + {self.eps:g}) * scale + offset over the last "
                f"axis")

    def init(self, key, in_shape):
        in_shape = check_shape("in_shape", in_shape)
        if len(in_shape) == 0 or in_shape[-1] < 1:
            raise LayerError(
                f"{self.name} normalises over the last axis of each example, so it needs a "
                f"per-example shape ending in a positive feature axis, got "
                f"{shape_str(in_shape)}. Arrays carry a leading batch axis: pass x of shape "
                f"(batch, ..., features)."
            )
        features = in_shape[-1]
        return {"scale": jnp.ones((features,)), "offset": jnp.zeros((features,))}, in_shape

    def apply(self, params, z):
        lead = (1,) * (z.ndim - 1)
        scale = params["scale"].reshape(lead + params["scale"].shape)
        offset = params["offset"].reshape(lead + params["offset"].shape)
        return _normalised(z, self.eps) * scale + offset

    def flops(self, in_shape) -> int:
        """Per row of C entries: 7 C (mean, centre, square, variance, normalise, scale,
        offset) plus 3 (add eps, square root, reciprocal)."""
        rows = math.prod(in_shape[:-1])
        return rows * (7 * in_shape[-1] + 3)


def layer_norm(eps: float = DEFAULT_EPS) -> Layer:
    """Layer normalisation over the last axis; see :class:`LayerNorm`.

    Args:
      eps: a positive real added to the (biased) variance.

    Example:
      >>> import jax, funcnet as fnet
      >>> params, out_shape = fnet.layer_norm().init(jax.random.key(0), (5, 8))
      >>> params["scale"].shape, params["offset"].shape, out_shape
      ((8,), (8,), (5, 8))
    """
    return LayerNorm(eps)
