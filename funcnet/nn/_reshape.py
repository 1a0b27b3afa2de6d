"""Reshaping layers: each example's entries, in row-major order, given a new shape.

B_i is a reshape, so q_i = B_i^T q_{i+1} is q_{i+1} reshaped back to the input shape;
A_i is empty (params ``()``)."""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import ClassVar, Tuple

import numpy as np

from funcnet._arguments import check_int, check_shape
from funcnet._errors import ArgumentError, LayerError, shape_str
from funcnet.nn._layer import Layer


@dataclasses.dataclass(frozen=True, repr=False)
class Flatten(Layer):
    """``(B, d1, ..., dk) -> (B, d1 * ... * dk)``; params ``()``. B_i is a reshape, so
    q_i is q_{i+1} reshaped back to the input shape."""

    name: str = "flatten"
    curvature: ClassVar[str] = "linear"

    def init(self, key, in_shape):
        return (), (math.prod(check_shape("in_shape", in_shape)),)

    def apply(self, params, z):
        return z.reshape(z.shape[0], -1)

    def flops(self, in_shape) -> int:
        return 0

    def describe(self) -> str:
        return "each example's axes flattened into one; no params"


flatten = Flatten()


def _target(shape) -> Tuple[int, ...]:
    """``reshape(shape)`` as a tuple of positive ints and at most one -1, else
    :class:`~funcnet.ArgumentError`."""
    if not isinstance(shape, (tuple, list)):
        hint = (f"; pass ({shape},) for one axis" if isinstance(shape, numbers.Integral)
                and not isinstance(shape, (bool, np.bool_)) else "")
        raise ArgumentError("reshape(shape)", f"must be a per-example shape tuple such as "
                                              f"(4, -1), got {shape!r} "
                                              f"({type(shape).__name__}){hint}.")
    target = tuple(check_int(f"reshape(shape)[{i}]", d) for i, d in enumerate(shape))
    if any(d < 1 and d != -1 for d in target) or target.count(-1) > 1:
        raise ArgumentError("reshape(shape)", f"must hold positive sizes and at most one -1 "
                                              f"(the size inferred from the input), got "
                                              f"{target}.")
    return target


@dataclasses.dataclass(frozen=True, repr=False)
class Reshape(Layer):
    """``(B, *in_shape) -> (B, *shape)``, each example reshaped (row-major); params ``()``.

    One entry of ``shape`` may be -1: it is inferred at ``init`` from the per-example
    size. The sizes must match: a per-example shape of another size raises
    :class:`~funcnet.LayerError` at ``init``.
    """

    shape: Tuple[int, ...]
    curvature: ClassVar[str] = "linear"

    def __post_init__(self):
        object.__setattr__(self, "shape", _target(self.shape))

    @property
    def name(self) -> str:
        return f"reshape({shape_str(self.shape)})"

    def describe(self) -> str:
        return f"each example reshaped to {shape_str(self.shape)}; no params"

    def init(self, key, in_shape):
        return (), self.out_shape(check_shape("in_shape", in_shape))

    def out_shape(self, in_shape) -> Tuple[int, ...]:
        """The per-example output shape for ``in_shape``, the -1 resolved."""
        size, known = math.prod(in_shape), math.prod(d for d in self.shape if d != -1)
        if -1 in self.shape and size % known == 0:
            return tuple(size // known if d == -1 else d for d in self.shape)
        if -1 not in self.shape and size == known:
            return self.shape
        needs = (f"a multiple of {known}" if -1 in self.shape
                 else f"exactly {known}")
        raise LayerError(
            f"{self.name} needs a per-example size of {needs} entries, but its input "
            f"{shape_str(in_shape)} holds {size}. Give a target shape whose sizes multiply "
            f"to {size} (one of them may be -1), or check the layer before it."
        )

    def apply(self, params, z):
        return z.reshape((z.shape[0],) + self.shape)

    def flops(self, in_shape) -> int:
        return 0


def reshape(shape) -> Layer:
    """Each example reshaped to ``shape`` (per example: no batch axis; one entry may be
    -1); see :class:`Reshape`.

    Example:
      >>> import jax, funcnet as fnet
      >>> params, out_shape = fnet.reshape((4, -1)).init(jax.random.key(0), (2, 6))
      >>> params, out_shape
      ((), (4, 3))
    """
    return Reshape(shape)
