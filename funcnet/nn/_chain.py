"""Composition in sequence: chains of layers, which are layers themselves, so they nest.

A chain of layers g_1, ..., g_L is the layer

    z_{L+1} = g_L(w_L; g_{L-1}(w_{L-1}; ... g_1(w_1; z_1)))

with params ``(w_1, ..., w_L)``: a tuple with one entry per layer. The chain only says
*what* is composed; the machinery that differentiates through it (``funcnet.ad``) walks
``Chain.layers``.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, List, Tuple

import jax

from funcnet._arguments import check_key, check_shape
from funcnet._errors import ArgumentError, LayerError, Path, shape_str
from funcnet.nn._layer import Layer, abstract_init, apply_with_key, check_name


@dataclasses.dataclass(frozen=True, repr=False)
class Chain(Layer):
    """Layers applied in order; params: a tuple with one entry per layer."""

    layers: Tuple[Layer, ...]
    name: str = "chain"

    def __post_init__(self):
        for index, item in enumerate(self.layers):
            if not isinstance(item, Layer):
                raise ArgumentError(
                    "chain(...)", f"takes layers, but argument {index} is {item!r} of type "
                    f"{type(item).__name__}. Wrap a function g(w, z) with fnet.layer(g, "
                    f"init_params) or build a fnet.Layer(init, apply, name).")

    @property
    def in_dtype(self):
        """The dtype its inputs take: that of its first layer (None: the default float)."""
        return self.layers[0].in_dtype if self.layers else None

    @property
    def stochastic(self) -> bool:
        """Whether a layer it holds draws from a key (see :meth:`item_keys`)."""
        return any(item.stochastic for item in self.layers)

    def item_keys(self, key) -> Tuple:
        """Per layer, the key it is applied with: layer i gets ``jax.random.split(key,
        L)[i]`` when it is stochastic, None otherwise (and every layer None without a
        key). The backward walk splits the same way, so a key gives the same masks
        wherever the chain is applied or recorded."""
        if key is None or not self.stochastic:
            return (None,) * len(self.layers)
        keys = jax.random.split(key, len(self.layers))
        return tuple(keys[i] if item.stochastic else None for i, item in enumerate(self.layers))

    def init(self, key, in_shape):
        shape = check_shape("in_shape", in_shape)
        check_key("key", key)
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

    def apply(self, params, z, key=None):
        """The layers in order; ``key`` (optional) is split over the stochastic ones
        (:meth:`item_keys`)."""
        self.check(params, z.shape[1:])
        for item, item_params, item_key in zip(self.layers, params, self.item_keys(key)):
            z = apply_with_key(item, item_params, z, item_key)
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

    def check_input_values(self, z, path: Path = ()) -> None:
        """Its first layer's check (that layer receives the chain's input)."""
        if self.layers:
            self.layers[0].check_input_values(z, path + ((0, self.layers[0].name),))

    def flops(self, in_shape) -> int:
        """The sum of its layers'."""
        return sum(item.flops(shape) for _, item, shape in self.sublayers(in_shape))

    def model_axes(self, params):
        """Each layer's, in order."""
        return tuple(item.model_axes(item_params)
                     for item, item_params in zip(self.layers, params))

    def sublayers(self, in_shape):
        shape, held = tuple(in_shape), []
        for index, item in enumerate(self.layers):
            held.append((index, item, shape))
            shape = abstract_init(item, shape)[1]
        return tuple(held)

    def describe(self) -> str:
        return " -> ".join(item.name for item in self.layers) or "the identity (no layers)"


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
    return Chain(tuple(layers), check_name(name))


def top_level(net: Layer, params):
    """The chain's layers and their params, treating a non-chain net as a chain of one."""
    if isinstance(net, Chain):
        return net.layers, params
    return (net,), (params,)


def flat_layers(layer: Layer) -> Tuple[Layer, ...]:
    """The leaf sequence of ``layer``: nested chains flattened, anything else as it is."""
    if isinstance(layer, Chain):
        return tuple(leaf for item in layer.layers for leaf in flat_layers(item))
    return (layer,)


def top_level_keys(net: Layer, key) -> Tuple:
    """The keys of :func:`top_level`'s layers (None entries where none is drawn)."""
    if isinstance(net, Chain):
        return net.item_keys(key)
    return (key if net.stochastic else None,)


def flat_keys(layer: Layer, key) -> List:
    """The keys of :func:`flat_layers`, in the same order, split as the chains split them."""
    if isinstance(layer, Chain):
        return [k for item, item_key in zip(layer.layers, layer.item_keys(key))
                for k in flat_keys(item, item_key)]
    return [key if layer.stochastic else None]


def flat_params(layer: Layer, params) -> List:
    """The params of :func:`flat_layers`, in the same order."""
    if isinstance(layer, Chain):
        return [w for item, p in zip(layer.layers, params) for w in flat_params(item, p)]
    return [params]


def nest_params(layer: Layer, flat: Iterator):
    """The inverse of :func:`flat_params`: entries of ``flat`` (an iterator) back into
    ``layer``'s params structure."""
    if isinstance(layer, Chain):
        return tuple(nest_params(item, flat) for item in layer.layers)
    return next(flat)
