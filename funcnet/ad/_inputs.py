"""Checks at the public entry points: the input array, params and targets, on static shapes.

Every check here reads only shapes, dtypes and tree structures, which are static under
``jax.jit``, so a jitted function pays for them once, at trace time; the value checks of
a loss (label ranges) run only on concrete targets. All of them run before any FLOP.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp

from funcnet._arguments import check_array, check_callable, check_float_leaves, check_key
from funcnet._errors import ArgumentError, LayerError, Path, shape_str
from funcnet.nn._chain import Chain
from funcnet.nn._layer import Layer, abstract_init
from funcnet.nn._repeat import Repeat
from funcnet.nn._residual import Residual


def check_layer(net) -> None:
    if not isinstance(net, Layer):
        raise ArgumentError(
            "net", f"expected a funcnet Layer (for example fnet.chain(...)), got {net!r} of "
                   f"type {type(net).__name__}.")


def check_loss(loss) -> None:
    check_callable("loss", loss, "loss(outputs, targets) -> scalar (e.g. "
                                 "fnet.losses.squared_error)")


def check_batch(net: Layer, params, x, what: str = "x"):
    """Checks a batched input ``x`` (B, *in_shape), B >= 1, and floating-point ``params``;
    returns out_shape."""
    check_layer(net)
    check_array(what, x)
    if jnp.ndim(x) < 1:
        raise LayerError(
            f"{what} must carry a leading batch axis, got a scalar. Pass an array of shape "
            f"(batch, *in_shape)."
        )
    if jnp.shape(x)[0] == 0:
        raise ArgumentError(what, f"holds 0 examples (shape {shape_str(jnp.shape(x))}); pass "
                                  f"at least one.")
    check_float_leaves("params", params)
    out_shape = net.check(params, jnp.shape(x)[1:])
    if not isinstance(x, jax.core.Tracer):
        net.check_input_values(x)
    return out_shape


def check_example(net: Layer, params, x, in_shape=None, what: str = "x"):
    """Checks ONE example ``x`` (*in_shape, no batch axis); returns out_shape.

    A batch given by mistake is caught: when the params pin the input's size (they would
    not fit a wider last axis) and also fit inputs of fewer axes (the trailing axes of x,
    as x[0] of a batch), x is refused unless ``in_shape`` confirms its shape (a sequence
    (T, D) through dense layers, say).
    """
    check_layer(net)
    check_array(what, x)
    check_float_leaves("params", params)
    shape = tuple(jnp.shape(x))
    if in_shape is not None:
        if tuple(in_shape) != shape:
            raise ArgumentError("in_shape", f"is {shape_str(in_shape)} but x has shape "
                                            f"{shape_str(shape)}; they must be equal.")
    elif shape and _params_fit(net, params, shape) and not _params_fit(
            net, params, shape[:-1] + (shape[-1] + 1,)):  # the params pin the input's size
        for axes in range(len(shape)):
            if _params_fit(net, params, shape[len(shape) - axes:]):
                raise ArgumentError(
                    what, f"has shape {shape_str(shape)}, but this takes ONE example, and the "
                          f"params also fit examples of shape "
                          f"{shape_str(shape[len(shape) - axes:])}: x looks like a batch. "
                          f"Pass x[0], or jax.vmap over the batch; if x really is one "
                          f"example, say so with in_shape={shape_str(shape)}.")
    out_shape = net.check(params, shape)
    if not isinstance(x, jax.core.Tracer):
        net.check_input_values(jnp.asarray(x)[None])
    return out_shape


def _params_fit(net: Layer, params, in_shape) -> bool:
    """True when ``net.init`` for ``in_shape`` builds params of the given params' layout."""
    try:
        expected, _ = abstract_init(net, in_shape)
    except LayerError:
        return False
    expected_leaves, expected_tree = jax.tree.flatten(expected)
    leaves, tree = jax.tree.flatten(params)
    return tree == expected_tree and all(
        tuple(jnp.shape(a)) == tuple(b.shape) for a, b in zip(leaves, expected_leaves))


def check_target_arrays(y) -> None:
    """Targets are arrays or pytrees of arrays: no Python lists or numbers."""
    if isinstance(y, list) or any(isinstance(leaf, numbers.Number)
                                  for leaf in jax.tree.leaves(y)):
        raise ArgumentError("y", f"holds Python lists or numbers ({type(y).__name__}); pass "
                                 f"arrays: jnp.asarray(y).")


def check_targets(out: jax.ShapeDtypeStruct, y, loss) -> None:
    """Checks the targets against the outputs' shape, before the forward pass.

    y must not be a Python list or hold Python numbers; its batch must be the outputs'
    (for every leaf with axes); ``loss(out, y)`` is traced abstractly (no FLOPs), so the
    loss's own shape checks run now, and it must return a scalar. A loss may carry
    ``loss.check_targets(out, y)`` for checks that need the targets' values (label
    ranges); it runs here while y is concrete, before anything is compiled.
    """
    check_target_arrays(y)
    for leaf in jax.tree.leaves(y):
        if jnp.ndim(leaf) and jnp.shape(leaf)[0] != out.shape[0]:
            raise LayerError(
                f"targets y have batch size {jnp.shape(leaf)[0]} (shape "
                f"{shape_str(jnp.shape(leaf))}) but the network's outputs have batch size "
                f"{out.shape[0]} (shape {shape_str(out.shape)}). Pass one target per input "
                f"example."
            )
    check_scalar_loss(jax.eval_shape(loss, out, y), loss)
    value_check = getattr(loss, "check_targets", None)
    if value_check is not None and not any(
            isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(y)):
        value_check(out, y)


def output_struct(params, x, out_shape) -> jax.ShapeDtypeStruct:
    """The outputs' shape (B, *out_shape) and a dtype for them (that of params and x)."""
    dtypes = [jnp.result_type(leaf) for leaf in jax.tree.leaves(params)]
    # integer inputs (indices) do not take part: the outputs are float either way
    floats = [x] if jnp.issubdtype(jnp.result_type(x), jnp.inexact) else []
    dtype = jnp.result_type(*dtypes, *floats) if dtypes else jnp.result_type(*floats, float)
    return jax.ShapeDtypeStruct((jnp.shape(x)[0],) + tuple(out_shape), dtype)


def check_scalar_loss(value, loss) -> None:
    if jnp.shape(value) != ():
        name = getattr(loss, "__name__", repr(loss))
        raise LayerError(
            f"the loss {name} returned shape {shape_str(jnp.shape(value))}, but a loss "
            f"must return a scalar: the mean over the batch of per-example losses."
        )


def stochastic_layer(net: Layer, path: Path = ()):
    """``(path, layer)`` of the first leaf layer of ``net`` that draws from a key, or None."""
    if not net.stochastic:
        return None
    if isinstance(net, Chain):
        for index, item in enumerate(net.layers):
            found = stochastic_layer(item, path + ((index, item.name),))
            if found is not None:
                return found
        return None
    if isinstance(net, Residual):
        return stochastic_layer(net.inner, path + ((0, net.inner.name),))
    if isinstance(net, Repeat):
        return stochastic_layer(net.layer, path + ((0, net.layer.name),))
    return path, net


def check_training_key(net: Layer, key) -> None:
    """A given ``key`` must be one PRNG key; without one, a net holding a stochastic
    layer (dropout) is refused, naming the layer: training draws its masks from a key."""
    if key is not None:
        check_key("key", key)
        return
    found = stochastic_layer(net)
    if found is not None:
        path, layer = found
        raise LayerError(
            f"{layer.name} is stochastic (it draws its masks from a PRNG key), but no key "
            f"was given, so training would see no dropout at all. Pass key=jax.random.key(...) "
            f"and a new key every step (fnet.fit derives one per step from its own key); "
            f"to evaluate without dropout, call net.apply(params, x).", path)
