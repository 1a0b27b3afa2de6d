"""One exhaustive check of a network against JAX's own transforms, shared by the tests of
the layers beyond the MLP (conv, pooling, norms, embedding, attention, reshape).

:func:`check_network` compares, in float64 at a relative error of 1e-10 (leaf by leaf,
relative to the reference leaf's largest entry):

- the loss and p_i (``fnet.backprop``) and q_1 (``record.cotangents[0]``) against
  ``jax.value_and_grad`` of ``loss(net.apply(params, x), y)``, jitted under every memory
  policy and eagerly under the first (the eager path differs from the jitted one in its
  per-layer compiled code, not in the policy's walk);
- every extension (batch_grad, batch_l2, second_moment, variance) against
  ``jax.vmap(jax.grad(l_b))`` over the examples, reduced by the definitions;
- forward mode (``fnet.jvp``) against ``jax.jvp`` of apply, for a random tangent of the
  params (and of x when x is floating point).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import funcnet as fnet
from exactness import assert_close

POLICIES = ("keep", "sqrt", "recompute")
EXTENSIONS = (fnet.extensions.batch_grad(), fnet.extensions.batch_l2(),
              fnet.extensions.second_moment(), fnet.extensions.variance())


def _is_float(x) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.floating)


def extension_reference(net, loss, params, x, y):
    """``{name: result}`` of the four extensions from per-example ``jax.grad``."""

    def one(x_b, y_b):
        return jax.grad(lambda p: loss(net.apply(p, x_b[None]), y_b[None]))(params)

    per_example = jax.vmap(one)(x, y)
    batch_l2 = jax.tree.map(lambda g: jnp.sum(jnp.square(g).reshape(g.shape[0], -1), axis=1),
                            per_example)
    second = jax.tree.map(lambda g: jnp.mean(jnp.square(g), axis=0), per_example)
    variance = jax.tree.map(lambda g: jnp.var(g, axis=0), per_example)
    return {"batch_grad": per_example, "batch_l2": batch_l2, "second_moment": second,
            "variance": variance}


def _backprop_fn(net, loss, policy, extensions):
    def fn(params, x, y):
        record = fnet.backprop(net, loss, params, x, y, extensions=extensions, remat=policy)
        return record.value, record.grads, record.cotangents[0], record.extensions

    return fn


def check_network(net, loss, params, x, y, what: str, rng=None, policies=POLICIES,
                  jit_modes=(True, False), extensions=True):
    """Asserts everything in the module docstring for (net, loss, params, x, y)."""
    rng = np.random.default_rng(0) if rng is None else rng

    def total(p, x_):
        return loss(net.apply(p, x_), y)

    if _is_float(x):
        value, (grads, q1) = jax.value_and_grad(total, argnums=(0, 1))(params, x)
    else:
        value, grads = jax.value_and_grad(total)(params, x)
        q1 = None
    ext = jax.jit(extension_reference, static_argnums=(0, 1))(
        net, loss, params, x, y) if extensions else {}
    for policy in policies:
        # eager calls run the same walk through per-layer compiled code: once, under keep
        for jit in [j for j in jit_modes if j or policy == policies[0]]:
            fn = _backprop_fn(net, loss, policy, EXTENSIONS if extensions else ())
            got_value, got_grads, got_q1, got_ext = (jax.jit(fn) if jit else fn)(params, x, y)
            where = f"{what} ({policy}, {'jit' if jit else 'eager'})"
            assert_close(got_value, value, f"loss of {where}")
            assert_close(got_grads, grads, f"grads of {where}")
            if q1 is not None:
                assert_close(got_q1, q1, f"q_1 of {where}")
            for name, expected in ext.items():
                assert_close(got_ext[name], expected, f"{name} of {where}")
    params_dot = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape), a.dtype),
                              params)
    if _is_float(x):
        x_dot = jnp.asarray(rng.standard_normal(x.shape), x.dtype)
        expected = jax.jvp(net.apply, (params, x), (params_dot, x_dot))
    else:
        x_dot = None
        expected = jax.jvp(lambda p: net.apply(p, x), (params,), (params_dot,))
    for jit in jit_modes:
        fn = lambda p, x_, pd, xd: fnet.jvp(net, p, x_, pd, xd)  # noqa: E731
        got = (jax.jit(fn) if jit else fn)(params, x, params_dot, x_dot)
        assert_close(got, expected, f"jvp of {what} ({'jit' if jit else 'eager'})")
