"""Window geometry shared by convolution and pooling: sizes, strides, dilations and padding
checked at construction, then made per spatial axis for an input shape at ``init``.

Along one spatial axis of n input entries, a window of k taps spaced by the dilation d
spans e = (k - 1) d + 1 entries of the input padded by (lo, hi); windows start every s
(the stride) entries, so there are

    out = floor((n + lo + hi - e) / s) + 1

of them, the first at padded entry 0. Padding may be

- ``"SAME"`` (lax's rule): out = ceil(n / s), total padding
  max((out - 1) s + e - n, 0), floor(total / 2) before and the rest after;
- ``"VALID"``: none;
- an int p: p on both sides of every spatial axis (PyTorch's ``padding=p``);
- ``((lo, hi), ...)``: one pair per spatial axis.

Construction-time mistakes raise :class:`~funcnet.ArgumentError` naming e.g.
``conv(stride)``; mistakes that only the input shape reveals (a wrong number of entries for
the spatial rank, windows that do not fit) raise :class:`~funcnet.LayerError` at ``init``.
"""

from __future__ import annotations

import itertools
import numbers
from typing import NamedTuple, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from funcnet._errors import ArgumentError, LayerError, shape_str

MAX_SPATIAL = 3  # spatial axes a layer takes: 1, 2 or 3

Sizes = Union[int, Tuple[int, ...]]
Padding = Union[str, int, Tuple[Tuple[int, int], ...]]


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def check_sizes(argument: str, value, what: str) -> Sizes:
    """A positive int, or a tuple (or list) of 1 to 3 positive ints, one per spatial axis;
    numpy ints become ints and a list a tuple (hashable, shown plainly in names)."""
    fix = (f"pass a positive int (the same {what} along every spatial axis) or one "
           f"positive int per spatial axis, e.g. 3 or (3, 3)")
    if _is_int(value):
        if value < 1:
            raise ArgumentError(argument, f"must be positive, got {value}; {fix}.")
        return int(value)
    if not isinstance(value, (tuple, list)) or not 1 <= len(value) <= MAX_SPATIAL or not all(
            _is_int(v) for v in value):
        raise ArgumentError(argument, f"must be a positive int or 1 to {MAX_SPATIAL} positive "
                                      f"ints (one per spatial axis), got {value!r}; {fix}.")
    if any(v < 1 for v in value):
        raise ArgumentError(argument, f"must hold positive ints, got {tuple(value)!r}; {fix}.")
    return tuple(int(v) for v in value)


def check_padding(argument: str, value) -> Padding:
    """``"SAME"`` or ``"VALID"`` (any case; stored upper-case), a non-negative int, or a
    tuple of 1 to 3 ``(lo, hi)`` pairs of non-negative ints (stored as tuples)."""
    fix = ('pass "SAME", "VALID", an int p >= 0 (p on both sides of every spatial axis) or '
           'one (lo, hi) pair per spatial axis, e.g. ((1, 1), (0, 2))')
    if isinstance(value, str):
        if value.upper() not in ("SAME", "VALID"):
            raise ArgumentError(argument, f"got the string {value!r}; {fix}.")
        return value.upper()
    if _is_int(value):
        if value < 0:
            raise ArgumentError(argument, f"must not be negative, got {value}; {fix}.")
        return int(value)
    pairs_ok = isinstance(value, (tuple, list)) and 1 <= len(value) <= MAX_SPATIAL and all(
        isinstance(pair, (tuple, list)) and len(pair) == 2 and all(_is_int(v) for v in pair)
        for pair in value)
    if not pairs_ok:
        raise ArgumentError(argument, f"got {value!r}; {fix}.")
    if any(v < 0 for pair in value for v in pair):
        raise ArgumentError(argument, f"must not be negative, got {value!r}; {fix}.")
    return tuple((int(lo), int(hi)) for lo, hi in value)


def check_same_rank(layer: str, **per_axis) -> None:
    """Refuses per-axis arguments of different lengths (e.g. ``kernel_size=(3, 3)`` with
    ``stride=(1, 1, 1)``), naming the first that disagrees."""
    lengths = {name: len(value) for name, value in per_axis.items()
               if isinstance(value, tuple)}
    if len(set(lengths.values())) > 1:
        (first, n), *others = lengths.items()
        name, m = next((name, m) for name, m in others if m != n)
        raise ArgumentError(f"{layer}({name})", f"has {m} entries but {first} has {n}; give "
                                                f"one entry per spatial axis in each, or a "
                                                f"single int.")


def size_str(sizes: Sizes) -> str:
    """``3`` -> ``"3"``, ``(3, 2)`` -> ``"3x2"``."""
    return str(sizes) if isinstance(sizes, int) else "x".join(str(v) for v in sizes)


def spatial_shape(layer: str, in_shape: Tuple[int, ...]) -> Tuple[int, ...]:
    """The spatial axes of a channels-last per-example shape ``(*spatial, C)`` (1 to 3 of
    them, C >= 1); else :class:`LayerError` naming ``layer``."""
    if not 2 <= len(in_shape) <= MAX_SPATIAL + 1:
        raise LayerError(
            f"{layer} needs per-example inputs (*spatial, channels) with 1 to {MAX_SPATIAL} "
            f"spatial axes, channels last, got per-example shape {shape_str(in_shape)}. "
            f"Arrays carry a leading batch axis: images of 28x28 pixels with one channel are "
            f"x of shape (batch, 28, 28, 1); add a channel axis with x[..., None].")
    if in_shape[-1] < 1:
        raise LayerError(f"{layer} needs at least one channel (the last axis), got "
                         f"per-example shape {shape_str(in_shape)}.")
    return tuple(in_shape[:-1])


def _per_axis(layer: str, argument: str, value, spatial: Tuple[int, ...], in_shape):
    """``value`` (an int or a tuple) as one entry per spatial axis."""
    if not isinstance(value, tuple):
        return (value,) * len(spatial)
    if len(value) != len(spatial):
        raise LayerError(
            f"{layer}: {argument} {value!r} has {len(value)} entries, but the input has "
            f"{len(spatial)} spatial axes (per-example shape {shape_str(in_shape)} = "
            f"(*spatial, channels)). Give one entry per spatial axis, or a single value for "
            f"all of them.")
    return value


class Geometry(NamedTuple):
    """The windows of a layer over one input shape, one entry per spatial axis.

    Attributes:
      window: taps per window, k.
      stride: s.
      dilation: d (1 for pooling).
      pads: ``(lo, hi)`` padding.
      out: windows (output entries), floor((n + lo + hi - (k - 1) d - 1) / s) + 1.
    """

    window: Tuple[int, ...]
    stride: Tuple[int, ...]
    dilation: Tuple[int, ...]
    pads: Tuple[Tuple[int, int], ...]
    out: Tuple[int, ...]


def same_pads(n: int, window: int, stride: int, dilation: int) -> Tuple[int, int]:
    """lax's ``"SAME"`` padding along one axis (see the module docstring)."""
    out = -(-n // stride)
    total = max((out - 1) * stride + (window - 1) * dilation + 1 - n, 0)
    return total // 2, total - total // 2


def geometry(layer: str, in_shape: Tuple[int, ...], window: Sizes, stride: Sizes,
             dilation: Sizes, padding: Padding, window_name: str = "window") -> Geometry:
    """The :class:`Geometry` of ``layer`` on per-example inputs ``in_shape = (*spatial, C)``,
    or :class:`LayerError` when an argument (the window's called ``window_name``) has the
    wrong number of entries for the spatial rank or a window does not fit into the padded
    input."""
    spatial = spatial_shape(layer, in_shape)
    window = _per_axis(layer, window_name, window, spatial, in_shape)
    stride = _per_axis(layer, "stride", stride, spatial, in_shape)
    dilation = _per_axis(layer, "dilation", dilation, spatial, in_shape)
    if padding == "SAME":
        pads = tuple(same_pads(*axis) for axis in zip(spatial, window, stride, dilation))
    elif padding == "VALID":
        pads = ((0, 0),) * len(spatial)
    elif isinstance(padding, int):
        pads = ((padding, padding),) * len(spatial)
    else:
        pads = _per_axis(layer, "padding", padding, spatial, in_shape)
    out = []
    for axis, (n, k, s, d, (lo, hi)) in enumerate(zip(spatial, window, stride, dilation, pads)):
        span = (k - 1) * d + 1
        if n + lo + hi < span:
            dilated = f" ((k - 1) * dilation + 1 with k = {k}, dilation {d})" if d > 1 else ""
            raise LayerError(
                f"{layer}: along spatial axis {axis} the window spans {span} entries"
                f"{dilated}, but the input has only {n} entries there, {n + lo + hi} with "
                f"padding ({lo}, {hi}) (per-example shape {shape_str(in_shape)}). Use a "
                f"smaller window or dilation, more padding, or padding=\"SAME\".")
        out.append((n + lo + hi - span) // s + 1)
    return Geometry(tuple(window), tuple(stride), tuple(dilation), tuple(pads), tuple(out))


def check_windows_touch_input(layer: str, in_shape: Tuple[int, ...], geo: Geometry) -> None:
    """Refuses padding so wide that a window holds padding only (a pooled value would be
    -inf, or 0 / 0): the first window must reach entry 0 and the last start before n."""
    for axis, (n, k, s, (lo, hi), out) in enumerate(
            zip(in_shape[:-1], geo.window, geo.stride, geo.pads, geo.out)):
        if lo > k - 1 or (out - 1) * s - lo > n - 1:
            raise LayerError(
                f"{layer}: padding ({lo}, {hi}) along spatial axis {axis} leaves windows of "
                f"{k} entries over padding only (per-example shape {shape_str(in_shape)}). "
                f"Pad at most window - 1 = {k - 1} on each side, or use padding=\"SAME\".")


def window_taps(geo: Geometry, z: jax.Array, pad_value) -> jax.Array:
    """Every window of z (B, *spatial, C), tap by tap: (B, *out, K, C) with K = prod(window)
    and entry [b, o, k, c] = z_pad[b, o s + k d, c], z_pad padded with ``pad_value``.

    One strided slice of the padded input per tap, stacked: exact on every backend, and its
    pullback is cheap (each slice's transpose is a pad), unlike lax's select-and-scatter.
    """
    batch, channels = z.shape[0], z.shape[-1]
    z_pad = jnp.pad(z, ((0, 0),) + geo.pads + ((0, 0),), constant_values=pad_value)
    taps = []
    for tap in itertools.product(*(range(k) for k in geo.window)):
        start = tuple(k * d for k, d in zip(tap, geo.dilation))
        limit = tuple(a + (o - 1) * s + 1 for a, o, s in zip(start, geo.out, geo.stride))
        taps.append(jax.lax.slice(z_pad, (0,) + start + (0,), (batch,) + limit + (channels,),
                                  (1,) + geo.stride + (1,)))
    return jnp.stack(taps, axis=-2)
