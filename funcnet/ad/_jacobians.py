"""Materialised Jacobians of ONE example, built from funcnet's own vjp and jvp.

A Jacobian is never needed for training (see ``_walk``); these functions exist to look
at one, as in the lecture notes. They return *generalized* Jacobians: for a map from an
array of shape S_in to one of shape S_out the Jacobian has shape S_out + S_in, and for a
pytree of params, a pytree of the same structure whose leaf for a parameter of shape S_w
has shape S_out + S_w (what ``jax.jacfwd`` returns).

Forward mode builds the Jacobian column by column (one jvp per input coordinate: cost
proportional to the input size), reverse mode row by row (one vjp per output coordinate:
cost proportional to the output size); both batch the basis vectors with ``jax.vmap``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from funcnet._arguments import check_shape
from funcnet._errors import ArgumentError
from funcnet.ad._accumulation import JacobianPlan, optimal_input_jacobian, plan
from funcnet.ad._forward import layer_jvp
from funcnet.ad._inputs import check_example
from funcnet.ad._reverse import layer_vjp
from funcnet.nn._chain import top_level
from funcnet.nn._layer import Layer

WRT = ("input", "params")
MODES = ("forward", "reverse", "optimal")


def _reverse_jacobian(layer, params, z, wrt_params: bool):
    """Rows J^T e_k for every output coordinate k, by one batched pullback."""
    out, pullback = layer_vjp(layer, params, z[None])
    out_shape = out.shape[1:]
    n_out = math.prod(out_shape)
    basis = jnp.eye(n_out, dtype=out.dtype).reshape((n_out, 1) + out_shape)
    rows = jax.vmap(lambda ct: pullback(ct)[0 if wrt_params else 1])(basis)
    if wrt_params:
        return jax.tree.map(lambda r: r.reshape(out_shape + r.shape[1:]), rows)
    return rows.reshape(out_shape + z.shape)


def _forward_jacobian(layer, params, z, wrt_params: bool):
    """Columns J e_j for every input coordinate j, by one batched pushforward."""
    primal = params if wrt_params else z
    flat, unravel = ravel_pytree(primal)
    n_in = flat.shape[0]
    if n_in == 0:  # no parameters: the Jacobian is as empty as they are
        out_shape = jax.eval_shape(layer.apply, params, z[None]).shape[1:]
        return jax.tree.map(lambda leaf: jnp.zeros(out_shape + jnp.shape(leaf), jnp.result_type(leaf)),
                            primal)
    basis = jnp.eye(n_in, dtype=flat.dtype)

    def column(v):
        if wrt_params:
            _, out_dot = layer_jvp(layer, params, z[None], unravel(v), None)
        else:
            _, out_dot = layer_jvp(layer, params, z[None], None, unravel(v)[None])
        return out_dot[0]

    columns = jax.vmap(column)(basis)  # (n_in, *out_shape)
    out_shape = columns.shape[1:]
    matrix = jnp.moveaxis(columns.reshape((n_in, -1)), 0, 1).reshape(out_shape + (n_in,))
    if not wrt_params:
        return matrix.reshape(out_shape + z.shape)
    leaves, treedef = jax.tree.flatten(params)
    blocks, start = [], 0
    for leaf in leaves:
        size = math.prod(jnp.shape(leaf))
        block = matrix[..., start:start + size].reshape(out_shape + jnp.shape(leaf))
        blocks.append(block.astype(jnp.result_type(leaf)))
        start += size
    return jax.tree.unflatten(treedef, blocks)


def _check_choice(wrt: str, mode: str) -> None:
    if wrt not in WRT:
        raise ArgumentError("wrt", f"must be one of {WRT}, got {wrt!r}.")
    if mode not in MODES:
        raise ArgumentError("mode", f"must be one of {MODES}, got {mode!r}.")


def jacobian(net: Layer, params, x, wrt: str = "input", mode: str = "reverse", *,
             in_shape=None):
    """The Jacobian of the network's output for ONE example ``x`` (no batch axis).

    Args:
      net: a layer; params: its params; x: one example, shape in_shape.
      wrt: ``"input"`` for d out / d x, shape out_shape + in_shape; ``"params"`` for
        d out / d w, a pytree like params with leaves of shape out_shape + leaf shape.
      mode: ``"forward"`` (jvp per input coordinate), ``"reverse"`` (vjp per output
        coordinate), or ``"optimal"``: the cheapest accumulation order for this chain's
        shapes (see :func:`funcnet.jacobian_plan`); same values, different cost.
      in_shape: optional, x's shape, to confirm that x is one example where the params
        also fit fewer axes (a sequence (T, D) through dense layers); without it such an
        x is refused as a likely batch.

    For a batch, ``jax.vmap(lambda xi: fnet.jacobian(net, params, xi))(xs)``.
    """
    _check_choice(wrt, mode)
    check_example(net, params, x, in_shape)
    if wrt == "input":
        _check_float_input(jnp.result_type(x))
    if mode == "optimal":
        if wrt == "input":
            return optimal_input_jacobian(net, params, x, _forward_jacobian, _reverse_jacobian)
        mode = plan(net, tuple(jnp.shape(x)), "params").root.mode
    build = _forward_jacobian if mode == "forward" else _reverse_jacobian
    return build(net, params, x, wrt == "params")


def jacobian_plan(net: Layer, in_shape, wrt: str = "input") -> JacobianPlan:
    """The plan ``jacobian(..., mode="optimal")`` follows for per-example ``in_shape``:
    segments, the mode of each, the multiplication order and the predicted FLOPs (beside
    those of plain forward and reverse mode). ``print`` it for a summary."""
    _check_choice(wrt, "optimal")
    if wrt == "input" and net.in_dtype is not None:
        _check_float_input(net.in_dtype)
    return plan(net, check_shape("in_shape", in_shape), wrt)


def _check_float_input(dtype) -> None:
    """A Jacobian with respect to the input needs a floating-point input."""
    if not jnp.issubdtype(dtype, jnp.inexact):
        raise ArgumentError("wrt", f"the network's input has dtype {np.dtype(dtype).name} "
                                   f"(indices, as an embedding takes), which has no "
                                   f"derivative: ask for wrt=\"params\" instead.")


def layer_jacobians(net: Layer, params, x, *, in_shape=None):
    """Each top-level layer's (A_i, B_i) at ONE example ``x`` (no batch axis).

    A_i = d g_i / d w_i (a pytree like the layer's params, leaves of shape
    out_shape_i + leaf shape; ``()`` for a parameterless layer) and B_i = d g_i / d z_i
    (shape out_shape_i + in_shape_i), evaluated at the activations z_i of the forward pass.
    Each block is built in the cheaper mode for its shape (forward when its input is the
    smaller side). Returns a tuple of L pairs. ``in_shape``: as for :func:`jacobian`.
    B_1 is None when x is an integer array (an embedding's indices have no derivative).
    """
    check_example(net, params, x, in_shape)
    layers, layer_params = top_level(net, params)
    z, pairs = x, []
    for layer, w in zip(layers, layer_params):
        out = layer.apply(w, z[None])[0]
        n_out = out.size
        n_w = sum(jnp.size(leaf) for leaf in jax.tree.leaves(w))
        if not jax.tree.leaves(w):
            a = w  # a parameterless layer: A_i is empty, like its params
        else:
            a = (_forward_jacobian if n_w <= n_out else _reverse_jacobian)(layer, w, z, True)
        if jnp.issubdtype(z.dtype, jnp.inexact):
            b = (_forward_jacobian if z.size <= n_out else _reverse_jacobian)(layer, w, z, False)
        else:
            b = None
        pairs.append((a, b))
        z = out
    return tuple(pairs)
