"""Checks at the public entry points: the input array, params and targets, on static shapes.

Every check here reads only shapes and tree structures, which are static under
``jax.jit``, so a jitted function pays for them once, at trace time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from funcnet._errors import LayerError, shape_str
from funcnet.nn._layer import Layer


def check_layer(net) -> None:
    if not isinstance(net, Layer):
        raise TypeError(
            f"expected a funcnet Layer (for example fnet.chain(...)), got {net!r} of type "
            f"{type(net).__name__}."
        )


def check_batch(net: Layer, params, x, what: str = "x"):
    """Checks a batched input ``x`` (B, *in_shape) and ``params``; returns out_shape."""
    check_layer(net)
    if jnp.ndim(x) < 1:
        raise LayerError(
            f"{what} must carry a leading batch axis, got a scalar. Pass an array of shape "
            f"(batch, *in_shape)."
        )
    return net.check(params, jnp.shape(x)[1:])


def check_example(net: Layer, params, x, what: str = "x"):
    """Checks a single example ``x`` (*in_shape, no batch axis); returns out_shape."""
    check_layer(net)
    return net.check(params, jnp.shape(x))


def check_targets(out: jax.Array, y, loss=None) -> None:
    """The targets' batch must be the outputs' batch (losses check the rest).

    A loss may carry ``loss.check_targets(out, y)`` for checks that need the targets'
    values (label ranges); it runs here while y is concrete, before anything is compiled.
    """
    value_check = getattr(loss, "check_targets", None)
    if value_check is not None and not any(
            isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(y)):
        value_check(out, y)
    if not hasattr(y, "shape") or jnp.ndim(y) == 0:
        return
    if jnp.shape(y)[0] != jnp.shape(out)[0]:
        raise LayerError(
            f"targets y have batch size {jnp.shape(y)[0]} (shape {shape_str(jnp.shape(y))}) "
            f"but the network's outputs have batch size {jnp.shape(out)[0]} (shape "
            f"{shape_str(jnp.shape(out))}). Pass one target per input example."
        )


def check_scalar_loss(value, loss) -> None:
    if jnp.shape(value) != ():
        name = getattr(loss, "__name__", repr(loss))
        raise LayerError(
            f"the loss {name} returned shape {shape_str(jnp.shape(value))}, but a loss "
            f"must return a scalar: the mean over the batch of per-example losses."
        )
