"""The convolution layer (cross-correlation, channels last, 1 to 3 spatial axes), with its
closed-form FLOPs and per-example rules (gradients and their squared norms) for the
extensions."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, Tuple, Union

import jax
import jax.numpy as jnp

from funcnet._arguments import check_bool, check_int, check_shape
from funcnet.nn._dense import uses_gram
from funcnet.nn._layer import Layer
from funcnet.nn._padding import (Geometry, Padding, Sizes, check_padding, check_same_rank,
                                 check_sizes, geometry, size_str, window_taps)

_EXACT = jax.lax.Precision.HIGHEST  # per-example products in full precision on every backend

# lax's dimension numbers, channels last, per spatial rank: (input, kernel, output)
_DIMENSIONS = {1: ("NWC", "WIO", "NWC"), 2: ("NHWC", "HWIO", "NHWC"),
               3: ("NDHWC", "DHWIO", "NDHWC")}


def patches(geo: Geometry, z: jax.Array) -> jax.Array:
    """The windows of z (B, *spatial, C) as rows: P of shape (B, O, K C) with O = prod(out)
    positions and K = prod(kernel) taps, P[b, o, (k, c)] = z_pad[b, o s + k d, c] (tap k
    and channel c flattened row-major, as w's leading axes (*kernel, C) are).

    One strided slice of the zero-padded input per tap (:func:`window_taps`): exact (no
    products) on every backend, and in w's own layout.
    """
    stacked = window_taps(geo, z, 0)  # (B, *out, K, C)
    return stacked.reshape(z.shape[0], math.prod(geo.out), -1)


def _rows(layer: "Conv", z, q):
    """(P, Q): the patches of z (B, O, K C) and q as (B, O, features)."""
    geo = layer.geometry(z.shape[1:])
    return patches(geo, z), q.reshape(q.shape[0], -1, layer.features)


def _per_example_grads(layer: "Conv", params, z, q):
    """A_b^T q_b for every example b, without a per-example vjp.

    With P_b (O, K C) the patches of z_b and Q_b (O, features) its output cotangent:
    dw_b = P_b^T Q_b, reshaped to (*kernel, C_in, features), and db_b = sum_o Q_b[o].
    Leaves (B, *leaf shape); their sum over b is p_i.
    """
    p_rows, q_rows = _rows(layer, z, q)
    w = jnp.einsum("boi,bof->bif", p_rows, q_rows, precision=_EXACT)
    grads = {"w": w.reshape((z.shape[0],) + params["w"].shape)}
    if layer.bias:
        grads["b"] = jnp.sum(q_rows, axis=1)
    return grads


def _per_example_sq_norms(layer: "Conv", params, z, q):
    """||A_b^T q_b||^2 per params leaf, (B,).

    ||P_b^T Q_b||_F^2 = <P_b P_b^T, Q_b Q_b^T> (two O x O Gram matrices) when
    :func:`~funcnet.nn._dense.uses_gram` says that is cheaper than forming the
    (K C, features) product (few output positions, large kernels), else P_b^T Q_b is
    formed and squared. Bias: ||sum_o Q_b[o]||^2.
    """
    p_rows, q_rows = _rows(layer, z, q)
    positions, fan_in = p_rows.shape[1], p_rows.shape[2]
    if uses_gram(positions, fan_in, layer.features):
        p_gram = jnp.einsum("boi,bpi->bop", p_rows, p_rows, precision=_EXACT)
        q_gram = jnp.einsum("bof,bpf->bop", q_rows, q_rows, precision=_EXACT)
        w = jnp.sum(p_gram * q_gram, axis=(1, 2))
    else:
        grads = jnp.einsum("boi,bof->bif", p_rows, q_rows, precision=_EXACT)
        w = jnp.sum(jnp.square(grads), axis=(1, 2))
    norms = {"w": w}
    if layer.bias:
        norms["b"] = jnp.sum(jnp.square(jnp.sum(q_rows, axis=1)), axis=1)
    return norms


def _per_example_factor_diag(layer: "Conv", params, z, s, signs=None):
    """sum_m sign[m, b] (A_b^T s[m, b])^2 for every example b, leaves (B, *leaf shape).

    All M columns in ONE product per example: P_b^T [S_b[0] ... S_b[M-1]], the patches
    (K C, O) against the columns side by side (O, M features), then squared, signed and
    summed over m; bias: (sum_o S_b[m, o])^2 summed the same way."""
    p_rows = patches(layer.geometry(z.shape[1:]), z)
    s_rows = s.reshape(s.shape[:2] + (-1, layer.features))  # (M, B, O, features)
    weight = jnp.ones(s.shape[:2], s.dtype) if signs is None else signs  # (M, B)
    w = jnp.einsum("boi,mbof->mbif", p_rows, s_rows, precision=_EXACT)
    w = jnp.einsum("mbif,mb->bif", jnp.square(w), weight, precision=_EXACT)
    diag = {"w": w.reshape((z.shape[0],) + params["w"].shape)}
    if layer.bias:
        diag["b"] = jnp.einsum("mbf,mb->bf", jnp.square(jnp.sum(s_rows, axis=2)), weight,
                               precision=_EXACT)
    return diag


def _factor_diag(layer: "Conv", params, z, s, signs=None):
    """sum_b of :func:`_per_example_factor_diag`, leaves like params."""
    return {name: jnp.sum(leaf, axis=0)
            for name, leaf in _per_example_factor_diag(layer, params, z, s, signs).items()}


@dataclasses.dataclass(frozen=True, repr=False)
class Conv(Layer):
    """Cross-correlation with zero padding, channels last, 1, 2 or 3 spatial axes.

    Per example, for an input z of shape (*spatial, C_in) zero-padded to z_pad, and params
    ``{"w": (*kernel, C_in, features), "b": (features,)}`` (no ``"b"`` when
    ``bias=False``; ``w`` drawn from N(0, 1/fan_in), fan_in = prod(kernel) C_in, ``b``
    zero, in JAX's default float dtype)::

        out[o, f] = b[f] + sum_{k, c} z_pad[o * stride + k * dilation, c] * w[k, c, f]

    for every output position o (a multi-index over the spatial axes, see
    :mod:`funcnet.nn._padding` for their count). With the patches P (O x K C, one row per
    position: the window's taps and channels, flattened like w's leading axes) and
    W = w reshaped to (K C, features), that is out = P W + b, so for an output cotangent
    Q (O x features):

        p_i = A_i^T q_{i+1} = (P^T Q reshaped like w, sum_o Q[o])
        q_i = B_i^T q_{i+1}: q_i[j, c] = sum over (o, k) with o s + k d - lo = j of
              sum_f Q[o, f] w[k, c, f]   (a transposed convolution, cropped to the input)

    Both only need the input z_i and w: a repeat keeps the input.
    """

    features: int
    kernel_size: Sizes
    stride: Sizes = 1
    padding: Padding = "SAME"
    dilation: Sizes = 1
    bias: bool = True

    repeat_keeps: ClassVar[str] = "input"
    curvature: ClassVar[str] = "linear"
    rules: ClassVar = (("per_example_grads", _per_example_grads),
                       ("per_example_sq_norms", _per_example_sq_norms),
                       ("per_example_factor_diag", _per_example_factor_diag),
                       ("factor_diag", _factor_diag))

    def __post_init__(self):
        # normalised (numpy ints to ints, lists to tuples, padding names upper-case), so
        # equal settings give equal, hashable layers with plain names
        checked = {
            "features": check_int("conv(features)", self.features, minimum=1),
            "kernel_size": check_sizes("conv(kernel_size)", self.kernel_size, "kernel size"),
            "stride": check_sizes("conv(stride)", self.stride, "stride"),
            "padding": check_padding("conv(padding)", self.padding),
            "dilation": check_sizes("conv(dilation)", self.dilation, "dilation"),
            "bias": check_bool("conv(bias)", self.bias),
        }
        check_same_rank("conv", **{k: checked[k] for k in
                                   ("kernel_size", "stride", "dilation", "padding")})
        for field, value in checked.items():
            object.__setattr__(self, field, value)

    @property
    def name(self) -> str:
        settings = [f"{self.features}", size_str(self.kernel_size)]
        if self.stride != 1:
            settings.append(f"stride {size_str(self.stride)}")
        if self.dilation != 1:
            settings.append(f"dilation {size_str(self.dilation)}")
        if self.padding != "SAME":
            settings.append(f"padding {self.padding}")
        if not self.bias:
            settings.append("no bias")
        return f"conv({', '.join(settings)})"

    def describe(self) -> str:
        return (f"cross-correlation of z (zero-padded, {self.padding}) with w, kernel "
                f"{size_str(self.kernel_size)}, stride {size_str(self.stride)}, dilation "
                f"{size_str(self.dilation)}{' + b' if self.bias else ''}; channels last")

    def geometry(self, in_shape: Tuple[int, ...]) -> Geometry:
        """The windows on per-example inputs ``in_shape = (*spatial, C_in)``, per spatial
        axis; :class:`~funcnet.LayerError` when they do not fit."""
        return geometry(self.name, tuple(in_shape), self.kernel_size, self.stride,
                        self.dilation, self.padding, window_name="kernel_size")

    def init(self, key, in_shape):
        in_shape = check_shape("in_shape", in_shape)
        geo = self.geometry(in_shape)
        fan_in = math.prod(geo.window) * in_shape[-1]
        # drawn flat and reshaped, as dense does (a cheaper compile)
        w = jax.random.normal(key, (fan_in * self.features,)).reshape(
            geo.window + (in_shape[-1], self.features)) / jnp.sqrt(fan_in)
        params = {"w": w, "b": jnp.zeros((self.features,))} if self.bias else {"w": w}
        return params, geo.out + (self.features,)

    def model_axes(self, params):
        """The output features (w's and b's last axis): column blocks per device."""
        return {name: -1 for name in params}

    def apply(self, params, z):
        geo = self.geometry(z.shape[1:])
        dtype = jnp.result_type(z, params["w"])
        out = jax.lax.conv_general_dilated(
            z.astype(dtype), params["w"].astype(dtype), window_strides=geo.stride,
            padding=geo.pads, rhs_dilation=geo.dilation,
            dimension_numbers=_DIMENSIONS[len(geo.out)])
        if not self.bias:
            return out
        return out + params["b"].reshape((1,) * (out.ndim - 1) + (self.features,))

    def flops(self, in_shape) -> int:
        """2 prod(kernel) C_in features per output position, plus features for the bias."""
        geo = self.geometry(tuple(in_shape))
        per_position = 2 * math.prod(geo.window) * in_shape[-1] * self.features
        return math.prod(geo.out) * (per_position + (self.features if self.bias else 0))


def conv(features: int, kernel_size: Union[int, Tuple[int, ...]], stride=1,
         padding: Padding = "SAME", dilation=1, bias: bool = True) -> Layer:
    """A convolution with ``features`` output channels; see :class:`Conv`.

    Args:
      features: output channels.
      kernel_size, stride, dilation: an int, or one per spatial axis.
      padding: ``"SAME"`` (lax's rule: ceil(n / stride) outputs), ``"VALID"`` (none), an
        int p (p on both sides of every spatial axis) or ``((lo, hi), ...)``, one pair
        per spatial axis.
      bias: whether to add ``b``.

    Bad values raise :class:`~funcnet.ArgumentError` naming e.g. ``conv(stride)``; an
    input shape they do not fit raises :class:`~funcnet.LayerError` at ``init``.

    Example:
      >>> import jax, funcnet as fnet
      >>> params, out_shape = fnet.conv(4, 3, stride=2).init(jax.random.key(0), (8, 8, 3))
      >>> params["w"].shape, params["b"].shape, out_shape
      ((3, 3, 3, 4), (4,), (4, 4, 4))
    """
    return Conv(features, kernel_size, stride, padding, dilation, bias)
