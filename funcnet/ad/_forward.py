"""Forward mode: per-layer ``jax.jvp`` composed along the chain.

For tangents (dw_1..dw_L) of the params and dz_1 of the input, the tangent of each
layer's output is

    dz_{i+1} = A_i dw_i + B_i dz_i,

one Jacobian-vector product of g_i at (w_i, z_i), carried up the chain alongside the
primal values. A tangent given as ``None`` is zero and skipped (not multiplied through).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from funcnet._arguments import check_array, check_key
from funcnet._caches import bounded_cache
from funcnet._errors import ArgumentError, LayerError, Path, shape_str
from funcnet.ad._compiled import is_concrete
from funcnet.ad._inputs import check_batch
from funcnet.nn._chain import Chain
from funcnet.nn._layer import Layer, apply_with_key, check_tree_like
from funcnet.nn._repeat import Repeat
from funcnet.nn._residual import Residual


def layer_jvp(layer: Layer, params, z, params_dot, z_dot, key=None):
    """``(z_next, z_next_dot)`` with ``z_next_dot = A params_dot + B z_dot``.

    ``params_dot`` or ``z_dot`` may be ``None`` (a zero tangent); the result tangent is
    ``None`` when both are. ``key`` (optional) reaches stochastic layers, split as
    ``layer.apply(params, z, key=key)`` splits it.
    """
    if isinstance(layer, Chain):
        dots = (None,) * len(layer.layers) if params_dot is None else params_dot
        for item, item_params, item_dot, item_key in zip(layer.layers, params, dots,
                                                         layer.item_keys(key)):
            z, z_dot = layer_jvp(item, item_params, z, item_dot, z_dot, item_key)
        return z, z_dot
    if isinstance(layer, Residual):
        out, out_dot = layer_jvp(layer.inner, params, z, params_dot, z_dot, key)
        if z_dot is None or out_dot is None:
            return z + out, z_dot if out_dot is None else out_dot
        return z + out, z_dot + out_dot
    if isinstance(layer, Repeat) and (params_dot is not None or z_dot is not None):
        return _repeat_jvp(layer, params, z, params_dot, z_dot, layer.copy_keys(key))
    if params_dot is None and z_dot is None:
        return apply_with_key(layer, params, z, key), None
    key = key if layer.stochastic else None
    if is_concrete(params, z, params_dot, z_dot, key):  # without jit: compiled per layer
        return _compiled_jvp(layer, params_dot is None, z_dot is None)(
            params, z, params_dot, z_dot, key)
    return _layer_jvp_traced(layer, params, z, params_dot, z_dot, key)


def _layer_jvp_traced(layer, params, z, params_dot, z_dot, key=None):
    def apply(w, z_):
        return apply_with_key(layer, w, z_, key)

    if params_dot is None:
        return jax.jvp(lambda z_: apply(params, z_), (z,), (z_dot,))
    if z_dot is None:
        return jax.jvp(lambda w_: apply(w_, z), (params,), (params_dot,))
    return jax.jvp(apply, (params, z), (params_dot, z_dot))


@bounded_cache(maxsize=1024)
def _compiled_jvp(layer: Layer, no_params_dot: bool, no_z_dot: bool):
    """One compiled jvp per layer and choice of zero tangents (see ``_compiled``)."""
    del no_params_dot, no_z_dot  # part of the cache key: None tangents change the trace
    return jax.jit(functools.partial(_layer_jvp_traced, layer))


def _repeat_jvp(layer, params, z, params_dot, z_dot, keys=None):
    """A scan of per-copy jvps (copy k with ``keys[k]``, or no keys); zero tangents are
    made explicit (scan needs fixed types)."""
    if params_dot is None:
        params_dot = jax.tree.map(jnp.zeros_like, params)
    if z_dot is None:
        z_dot = jnp.zeros_like(z)

    def step(carry, copy):
        z_k, z_k_dot = carry
        w_k, w_k_dot, key_k = copy
        return layer_jvp(layer.layer, w_k, z_k, w_k_dot, z_k_dot, key_k), None

    return jax.lax.scan(step, (z, z_dot), (params, params_dot, keys), length=layer.n)[0]


def jvp(net: Layer, params, x, params_dot=None, x_dot=None, key=None):
    """``(out, out_dot)``: the network's output and its directional derivative.

    ``out_dot = J_w params_dot + J_x x_dot``, computed layer by layer (forward mode),
    never forming a Jacobian.

    Args:
      net: a layer (usually a chain); params: its params; x: inputs (B, *in_shape).
      params_dot: a tangent with the structure, shapes and dtypes of params, or ``None``
        for zero (input sensitivities only).
      x_dot: a tangent shaped like x, or ``None`` for zero (parameter directions only);
        x must be floating point then (integer inputs, such as an embedding's indices,
        have no tangent).
      key: optional PRNG key for stochastic layers (dropout), split as
        ``net.apply(params, x, key=key)`` splits it.

    Returns:
      ``out`` (B, *out_shape) and ``out_dot`` of the same shape.
    """
    check_batch(net, params, x)
    if params_dot is not None:
        check_tangent_params(net, params, params_dot)
    if key is not None:
        check_key("key", key)
    if x_dot is not None:
        check_array("x_dot", x_dot)
        if not jnp.issubdtype(jnp.result_type(x), jnp.inexact):
            raise ArgumentError("x_dot", f"x has dtype {jnp.result_type(x)} (indices), which "
                                         f"has no tangent; pass x_dot=None for directions in "
                                         f"the params only.")
    if x_dot is not None and (jnp.shape(x_dot) != jnp.shape(x)
                              or jnp.result_type(x_dot) != jnp.result_type(x)):
        raise LayerError(
            f"x_dot has shape {shape_str(jnp.shape(x_dot))} and dtype "
            f"{jnp.result_type(x_dot)}, but the tangent of x must match x: shape "
            f"{shape_str(jnp.shape(x))}, dtype {jnp.result_type(x)}."
        )
    out, out_dot = layer_jvp(net, params, x, params_dot, x_dot, key)
    return out, jnp.zeros_like(out) if out_dot is None else out_dot


def check_tangent_params(net: Layer, params, params_dot, path: Path = (),
                         what: str = "params_dot") -> None:
    """Raises LayerError, naming the layer, where the tangent ``what`` (params_dot, or v
    of the curvature products) differs from params."""
    hint = "A tangent must have the structure, shapes and dtypes of the primal params."
    if isinstance(net, Chain):
        if not isinstance(params_dot, tuple) or len(params_dot) != len(net.layers):
            raise LayerError(
                f"{what} must be a tuple of {len(net.layers)} entries like params, got "
                f"{type(params_dot).__name__}"
                + (f" of {len(params_dot)} entries" if isinstance(params_dot, tuple) else "")
                + f". {hint}",
                path,
            )
        for index, (item, p, p_dot) in enumerate(zip(net.layers, params, params_dot)):
            check_tangent_params(item, p, p_dot, path + ((index, item.name),), what)
    elif isinstance(net, Residual):
        check_tangent_params(net.inner, params, params_dot, path + ((0, net.inner.name),),
                             what)
    else:
        check_tree_like(params, params_dot, path, what, hint, check_dtype=True)
