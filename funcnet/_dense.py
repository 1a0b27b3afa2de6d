"""The affine layer z @ w + b."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from funcnet._errors import LayerError, shape_str
from funcnet._layer import Layer


@dataclasses.dataclass(frozen=True)
class Dense(Layer):
    """``g(w; z) = z @ w["w"] + w["b"]`` over the last axis of z.

    Params: ``{"w": (fan_in, out_features), "b": (out_features,)}`` (no ``"b"`` when
    ``bias=False``), with ``w`` drawn from N(0, 1/fan_in) (LeCun normal) and ``b`` zero,
    in JAX's default float dtype. Shapes: ``(B, ..., fan_in) -> (B, ..., out_features)``.

    Per example, for a vector input z (shape (fan_in,)) and output o = w^T z + b:
    B_i = w^T (out x fan_in); A_i with respect to w is the generalized Jacobian
    dO_k/dw_{jl} = z_j [k == l]; with respect to b it is the identity.
    """

    out_features: int
    bias: bool = True

    def __post_init__(self):
        width = self.out_features
        if not isinstance(width, int) or isinstance(width, bool) or width < 1:
            why = (
                "A layer of width 0 has no outputs; remove it or give it at least one unit."
                if width == 0 and not isinstance(width, bool)
                else "Pass the number of output units as a positive int, e.g. dense(64)."
            )
            raise LayerError(f"dense(out_features) needs a positive integer width, got {width!r}. {why}")

    @property
    def name(self) -> str:
        return f"dense({self.out_features})" + ("" if self.bias else ", no bias")

    def init(self, key, in_shape):
        in_shape = tuple(in_shape)
        if len(in_shape) == 0 or in_shape[-1] < 1:
            raise LayerError(
                f"{self.name} needs inputs whose per-example shape ends in a positive "
                f"feature axis, got per-example shape {shape_str(in_shape)}. Arrays carry "
                f"a leading batch axis: pass x of shape (batch, features), e.g. x[None] "
                f"for a single example."
            )
        fan_in = in_shape[-1]
        w = jax.random.normal(key, (fan_in, self.out_features)) / jnp.sqrt(fan_in)
        params = {"w": w, "b": jnp.zeros((self.out_features,))} if self.bias else {"w": w}
        return params, in_shape[:-1] + (self.out_features,)

    def apply(self, params, z):
        out = z @ params["w"]
        if not self.bias:
            return out
        return out + params["b"].reshape((1,) * (out.ndim - 1) + (self.out_features,))


def dense(out_features: int, bias: bool = True) -> Layer:
    """An affine layer ``z @ w + b`` with ``out_features`` outputs; see :class:`Dense`.

    Example:
      >>> import jax, funcnet as fnet
      >>> params, out_shape = fnet.dense(4).init(jax.random.key(0), (3,))
      >>> params["w"].shape, params["b"].shape, out_shape
      ((3, 4), (4,), (4,))
    """
    return Dense(out_features, bias)
