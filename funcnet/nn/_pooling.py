"""Pooling layers: the maximum or the mean over windows of the spatial axes, per channel
(channels last, 1 to 3 spatial axes, params ``()``)."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from funcnet._arguments import check_shape
from funcnet.nn._layer import Layer
from funcnet.nn._padding import (Geometry, Padding, Sizes, check_padding, check_same_rank,
                                 check_sizes, check_windows_touch_input, geometry, size_str,
                                 window_taps)


@dataclasses.dataclass(frozen=True, repr=False)
class _Pool(Layer):
    """What max and average pooling share: the window, its stride (the window when None),
    the padding, shapes, and names. Subclasses give ``kind`` and ``apply``."""

    window: Sizes
    stride: Optional[Sizes] = None
    padding: Padding = "VALID"

    kind: ClassVar[str] = "pool"
    repeat_keeps: ClassVar[str] = "input"
    curvature: ClassVar[str] = "linear"  # max: piecewise linear

    def __post_init__(self):
        # normalised (numpy ints to ints, lists to tuples, padding names upper-case,
        # stride=None to the window), so equal settings give equal, hashable layers
        window = check_sizes(f"{self.kind}(window)", self.window, "window size")
        stride = window if self.stride is None else check_sizes(
            f"{self.kind}(stride)", self.stride, "stride")
        padding = check_padding(f"{self.kind}(padding)", self.padding)
        check_same_rank(self.kind, window=window, stride=stride, padding=padding)
        object.__setattr__(self, "window", window)
        object.__setattr__(self, "stride", stride)
        object.__setattr__(self, "padding", padding)

    @property
    def name(self) -> str:
        settings = [size_str(self.window)]
        if self.stride != self.window:
            settings.append(f"stride {size_str(self.stride)}")
        if self.padding != "VALID":
            settings.append(f"padding {self.padding}")
        return f"{self.kind}({', '.join(settings)})"

    def geometry(self, in_shape: Tuple[int, ...]) -> Geometry:
        """The windows on per-example inputs ``in_shape = (*spatial, C)``, per spatial axis;
        :class:`~funcnet.LayerError` when they do not fit or one holds padding only."""
        geo = geometry(self.name, tuple(in_shape), self.window, self.stride, 1, self.padding)
        check_windows_touch_input(self.name, tuple(in_shape), geo)
        return geo

    def init(self, key, in_shape):
        in_shape = check_shape("in_shape", in_shape)
        return (), self.geometry(in_shape).out + (in_shape[-1],)

    @staticmethod
    def _reduce(geo: Geometry, z, init, computation):
        """lax's reduce_window over the spatial axes of z (B, *spatial, C); padded entries
        take the value ``init``."""
        return jax.lax.reduce_window(z, np.array(init, z.dtype), computation,
                                     (1,) + geo.window + (1,), (1,) + geo.stride + (1,),
                                     ((0, 0),) + geo.pads + ((0, 0),))

    def _window_entries(self, in_shape) -> Tuple[int, int]:
        """(output entries, entries per window) on per-example inputs ``in_shape``."""
        geo = self.geometry(tuple(in_shape))
        return math.prod(geo.out) * in_shape[-1], math.prod(geo.window)


class MaxPool(_Pool):
    """``out[o, c] = max_k z_pad[o * stride + k, c]``, the padding -inf (never chosen:
    every window holds at least one input entry); params ``()``.

    Per example, B_i routes each output cotangent to the entry its window chose:
    q_i[j, c] = sum over windows o whose maximum is z[j, c] of q_{i+1}[o, c] (a tie goes to
    the window's first maximum in row-major order, as in lax). A_i is empty; a repeat keeps
    the input.

    Computed from the window's taps (one strided slice each,
    :func:`~funcnet.nn._padding.window_taps`) as the tap its first maximum selects, so that
    the pullback is that selection and one pad per tap: several times faster on a CPU than
    lax's select-and-scatter, the pullback of ``reduce_window`` (measured: 5x for a 2 x 2
    pool of a (128, 28, 28, 16) batch).
    """

    kind = "max_pool"

    def apply(self, params, z):
        taps = window_taps(self.geometry(z.shape[1:]), z, -np.inf)  # (B, *out, K, C)
        first = jnp.argmax(taps, axis=-2)[..., None, :]  # the first maximum of each window
        chosen = jax.lax.broadcasted_iota(first.dtype, taps.shape, taps.ndim - 2) == first
        return jnp.sum(jnp.where(chosen, taps, 0), axis=-2)

    def flops(self, in_shape) -> int:
        """prod(window) - 1 comparisons per output entry."""
        outputs, window = self._window_entries(in_shape)
        return outputs * (window - 1)

    def describe(self) -> str:
        return (f"the maximum over windows {size_str(self.window)}, stride "
                f"{size_str(self.stride)}, padding {self.padding} (-inf), per channel; "
                f"no params")


def in_input_counts(geo: Geometry, spatial: Tuple[int, ...]) -> np.ndarray:
    """How many entries of each window lie inside the input (not in the padding), shape
    ``out``: the product over axes of the per-axis counts #{k : 0 <= o s + k - lo < n}."""
    counts = np.ones((), np.int64)
    for n, k, s, (lo, _), out in zip(spatial, geo.window, geo.stride, geo.pads, geo.out):
        start = np.arange(out) * s - lo
        axis = np.minimum(start + k, n) - np.maximum(start, 0)
        counts = np.multiply.outer(counts, axis)
    return counts


class AvgPool(_Pool):
    """``out[o, c] = (1 / n_o) sum_k z_pad[o * stride + k, c]``, the padding zero, with n_o
    the number of window entries inside the input (padding not counted); params ``()``.

    Per example B_i is linear: q_i[j, c] = sum over windows o holding j of
    q_{i+1}[o, c] / n_o. A_i is empty; a repeat keeps the input.
    """

    kind = "avg_pool"

    def apply(self, params, z):
        geo = self.geometry(z.shape[1:])
        sums = self._reduce(geo, z, 0, jax.lax.add)
        counts = in_input_counts(geo, z.shape[1:-1])[..., None]  # static: shapes only
        return sums / jnp.asarray(counts[None], z.dtype)

    def flops(self, in_shape) -> int:
        """prod(window) - 1 adds and one division per output entry."""
        outputs, window = self._window_entries(in_shape)
        return outputs * window

    def describe(self) -> str:
        return (f"the mean over windows {size_str(self.window)}, stride "
                f"{size_str(self.stride)}, padding {self.padding} (not counted), per "
                f"channel; no params")


def max_pool(window, stride=None, padding: Padding = "VALID") -> Layer:
    """The maximum over windows of the spatial axes, per channel; see :class:`MaxPool`.

    Args:
      window: window size, an int or one per spatial axis.
      stride: an int or one per spatial axis; None (the default) for the window size.
      padding: ``"VALID"`` (the default), ``"SAME"``, an int or ``((lo, hi), ...)``, as
        for :func:`~funcnet.conv`; padded entries are -inf, so never the maximum.

    Example:
      >>> import jax, funcnet as fnet
      >>> fnet.max_pool(2).init(jax.random.key(0), (8, 8, 3))
      ((), (4, 4, 3))
    """
    return MaxPool(window, stride, padding)


def avg_pool(window, stride=None, padding: Padding = "VALID") -> Layer:
    """The mean over windows of the spatial axes, per channel; see :class:`AvgPool`.

    Args are those of :func:`max_pool`; the mean divides by the number of window entries
    inside the input, so padding does not dilute it.

    Example:
      >>> import jax, funcnet as fnet
      >>> fnet.avg_pool(3, stride=1, padding="SAME").init(jax.random.key(0), (5, 2))
      ((), (5, 2))
    """
    return AvgPool(window, stride, padding)
