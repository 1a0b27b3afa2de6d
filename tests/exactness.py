"""Exactness helpers shared by the test modules: leafwise relative error against a
reference, and float64 params drawn with NumPy in the shapes ``net.init`` builds."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from funcnet.nn._layer import abstract_init

TOL = 1e-10
TINY = 1e-300


def rel_err(actual, expected) -> float:
    a, e = np.asarray(actual), np.asarray(expected)
    return float(np.max(np.abs(a - e), initial=0.0)) / max(
        float(np.max(np.abs(e), initial=0.0)), TINY)


def assert_close(actual, expected, what: str) -> None:
    """Same tree structure, leaf shapes and dtypes, and rel_err <= TOL leaf by leaf."""
    assert jax.tree.structure(actual) == jax.tree.structure(expected), (
        f"{what}: structure {jax.tree.structure(actual)} != {jax.tree.structure(expected)}")
    paths_and_leaves = jax.tree_util.tree_flatten_with_path(expected)[0]
    for (path, e), a in zip(paths_and_leaves, jax.tree.leaves(actual)):
        where = f"{what} at {jax.tree_util.keystr(path) or 'the leaf'}"
        assert jnp.shape(a) == jnp.shape(e), f"{where}: shape {jnp.shape(a)} != {jnp.shape(e)}"
        assert jnp.result_type(a) == jnp.result_type(e), (
            f"{where}: dtype {jnp.result_type(a)} != {jnp.result_type(e)}")
        err = rel_err(a, e)
        assert err <= TOL, f"{where}: relative error {err:.3e} > {TOL:g}"


def random_params(net, in_shape, rng):
    """Float64 params with the structure and shapes ``net.init`` builds, drawn with NumPy
    (dense kernels N(0, 1/fan_in), everything else N(0, 0.1^2)): no JAX random compiles."""
    structs, out_shape = abstract_init(net, tuple(in_shape))

    def draw(path, struct):
        shape = struct.shape
        if jax.tree_util.keystr(path[-1:]) == "['w']":
            return jnp.asarray(rng.standard_normal(shape) / np.sqrt(shape[-2]))
        return jnp.asarray(0.1 * rng.standard_normal(shape))

    return jax.tree_util.tree_map_with_path(draw, structs), out_shape


def problem(net, in_shape, batch, seed=0):
    """(params, x, y): float64 params drawn like net.init's (:func:`random_params`),
    standard normal inputs (batch, *in_shape) and targets (batch, *out_shape)."""
    rng = np.random.default_rng(seed)
    params, out_shape = random_params(net, in_shape, rng)
    x = jnp.asarray(rng.standard_normal((batch,) + tuple(in_shape)))
    y = jnp.asarray(rng.standard_normal((batch,) + tuple(out_shape)))
    return params, x, y
