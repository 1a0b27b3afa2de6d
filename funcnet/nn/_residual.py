"""Composition with a skip connection: ``z + inner(w; z)``."""

from __future__ import annotations

import dataclasses
import math

from funcnet._arguments import check_shape
from funcnet._errors import ArgumentError, LayerError, Path, shape_str
from funcnet.nn._layer import Layer, apply_with_key


@dataclasses.dataclass(frozen=True, repr=False)
class Residual(Layer):
    """``z + inner(w; z)``; params: those of ``inner``.

    Per example, B = I + B_inner and A = A_inner, so the backward step is
    q_i = q_{i+1} + B_inner^T q_{i+1} and p_i = A_inner^T q_{i+1}.
    """

    inner: Layer

    @property
    def name(self) -> str:
        return f"residual({self.inner.name})"

    @property
    def in_dtype(self):
        """The dtype its inputs take: that of the inner layer."""
        return self.inner.in_dtype

    def init(self, key, in_shape):
        in_shape = check_shape("in_shape", in_shape)
        params, out_shape = self.inner.init(key, in_shape)
        _check_width_kept(self.inner, in_shape, out_shape, ())
        return params, in_shape

    @property
    def stochastic(self) -> bool:
        """Whether the inner layer draws from a key (it gets the residual's key)."""
        return self.inner.stochastic

    def apply(self, params, z, key=None):
        return z + apply_with_key(self.inner, params, z, key)

    def check(self, params, in_shape, path: Path = ()):
        out_shape = self.inner.check(params, in_shape, path + ((0, self.inner.name),))
        _check_width_kept(self.inner, in_shape, out_shape, path)
        return tuple(in_shape)

    def check_input_values(self, z, path: Path = ()) -> None:
        """The inner layer's check."""
        self.inner.check_input_values(z, path + ((0, self.inner.name),))

    def flops(self, in_shape) -> int:
        """The inner layer's, plus one add per entry."""
        return self.inner.flops(in_shape) + math.prod(in_shape)

    def model_axes(self, params):
        """The inner layer's."""
        return self.inner.model_axes(params)

    def sublayers(self, in_shape):
        return ((0, self.inner, tuple(in_shape)),)

    def describe(self) -> str:
        return f"z + {self.inner.name}(z)"


def _check_width_kept(inner, in_shape, out_shape, path):
    if tuple(out_shape) != tuple(in_shape):
        raise LayerError(
            f"a residual z + f(z) needs f to keep the shape, but {inner.name} maps "
            f"per-example shape {shape_str(in_shape)} to {shape_str(out_shape)}. Make the "
            f"inner layer end at width {shape_str(in_shape)[1:-1].rstrip(',')}, or move the "
            f"width change outside the residual.",
            path,
        )


def residual(layer: Layer) -> Residual:
    """The skip connection ``z + layer(z)``; ``layer`` must keep the shape."""
    if not isinstance(layer, Layer):
        raise ArgumentError("residual(layer)", f"must be a funcnet Layer, got {layer!r}.")
    return Residual(layer)
