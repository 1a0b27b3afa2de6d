"""Composition: chains of layers (which are layers themselves, so they nest) and residuals.

A chain of layers g_1, ..., g_L is the layer

    z_{L+1} = g_L(w_L; g_{L-1}(w_{L-1}; ... g_1(w_1; z_1)))

with params ``(w_1, ..., w_L)``: a tuple with one entry per layer. These classes only say
*what* is composed; the machinery that differentiates through them (reverse mode in
``_reverse``, forward mode in ``_forward``) walks ``Chain.layers`` explicitly.
"""

from __future__ import annotations

import dataclasses
from typing import Tuple

import jax

from funcnet._errors import LayerError, Path, shape_str
from funcnet._layer import Layer


@dataclasses.dataclass(frozen=True)
class Chain(Layer):
    """Layers applied in order; params: a tuple with one entry per layer."""

    layers: Tuple[Layer, ...]
    name: str = "chain"

    def __post_init__(self):
        for index, item in enumerate(self.layers):
            if not isinstance(item, Layer):
                raise LayerError(
                    f"chain(...) takes layers, but argument {index} is {item!r} of type "
                    f"{type(item).__name__}. Wrap a function g(w, z) with fnet.layer(g, "
                    f"init_params) or build a fnet.Layer(init, apply, name)."
                )

    def init(self, key, in_shape):
        shape = tuple(in_shape)
        params = []
        for index, (item, item_key) in enumerate(zip(self.layers, _split(key, len(self.layers)))):
            try:
                item_params, shape = item.init(item_key, shape)
            except LayerError as error:
                raise error.inside(index, item.name) from None
            except (TypeError, ValueError, IndexError) as error:
                raise LayerError(
                    f"init failed for per-example input shape {shape_str(shape)}: {error}",
                    ((index, item.name),),
                ) from error
            params.append(item_params)
        return tuple(params), tuple(shape)

    def apply(self, params, z):
        self.check(params, z.shape[1:])
        for item, item_params in zip(self.layers, params):
            z = item.apply(item_params, z)
        return z

    def check(self, params, in_shape, path: Path = ()):
        if not isinstance(params, tuple) or len(params) != len(self.layers):
            got = (
                f"a tuple of {len(params)} entries" if isinstance(params, tuple)
                else f"a {type(params).__name__}"
            )
            raise LayerError(
                f"this chain of {len(self.layers)} layers expects params as a tuple of "
                f"{len(self.layers)} entries (one per layer), got {got}. These params "
                f"belong to another network: build them with net.init(key, in_shape).",
                path,
            )
        shape = tuple(in_shape)
        for index, (item, item_params) in enumerate(zip(self.layers, params)):
            shape = item.check(item_params, shape, path + ((index, item.name),))
        return shape


def _split(key, n):
    return jax.random.split(key, n) if n else []


def chain(*layers: Layer, name: str = "chain") -> Chain:
    """The composition of ``layers`` in order, itself a layer (so chains nest).

    Example:
      >>> import jax, funcnet as fnet
      >>> mlp = fnet.chain(fnet.dense(32), fnet.relu, fnet.dense(10))
      >>> params, out_shape = mlp.init(jax.random.key(0), (64,))
      >>> len(params), out_shape
      (3, (10,))
    """
    if len(layers) == 1 and isinstance(layers[0], (list, tuple)):
        layers = tuple(layers[0])
    return Chain(tuple(layers), name)


@dataclasses.dataclass(frozen=True)
class Residual(Layer):
    """``z + inner(w; z)``; params: those of ``inner``.

    Per example, B = I + B_inner and A = A_inner, so the backward step is
    q_i = q_{i+1} + B_inner^T q_{i+1} and p_i = A_inner^T q_{i+1}.
    """

    inner: Layer

    @property
    def name(self) -> str:
        return f"residual({self.inner.name})"

    def init(self, key, in_shape):
        in_shape = tuple(in_shape)
        params, out_shape = self.inner.init(key, in_shape)
        _check_width_kept(self.inner, in_shape, out_shape, ())
        return params, in_shape

    def apply(self, params, z):
        return z + self.inner.apply(params, z)

    def check(self, params, in_shape, path: Path = ()):
        out_shape = self.inner.check(params, in_shape, path + ((0, self.inner.name),))
        _check_width_kept(self.inner, in_shape, out_shape, path)
        return tuple(in_shape)


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
    return Residual(layer)


def top_level(net: Layer, params):
    """The chain's layers and their params, treating a non-chain net as a chain of one."""
    if isinstance(net, Chain):
        return net.layers, params
    return (net,), (params,)
