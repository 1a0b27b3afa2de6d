"""Property tests: ``batch_l2``, ``second_moment``, ``variance``, the per-example gradient
norms and the clipped mean gradient equal their definitions on
``jax.vmap(jax.grad(l_b))``, in float64, over random networks (tests/strategies.py:
dense layers, every activation, nested chains, residuals, user layers with and without
rules, repeats), random losses and targets, a drawn memory policy, with and without
``jax.jit``.

batch_l2, second_moment, the norms and the clipped mean are compared at a relative error
of 1e-10 leaf by leaf (relative to the reference leaf's largest entry). The variance is
computed as the difference m - p^2 it is defined by (m = mean_b g_b^2, p = mean_b g_b),
whose rounding error is relative to m, not to the variance: where the examples' gradients
(nearly) agree -- a batch of one, a leaf all examples share -- the variance is 0 (or
tiny) while m is not. Its error is bounded by 1e-10 max |m| of the leaf.

Examples are few and networks small: each example compiles a fresh network and its
reference (see test_properties.py); the file runs in about 10-15 s on 2 cores.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import funcnet as fnet

# pytest runs with --import-mode=importlib; conftest puts tests/ on sys.path.
from exactness import TOL, assert_close  # noqa: E402
from strategies import cases  # noqa: E402

JIT = st.booleans()
REMAT = st.sampled_from(["keep", "sqrt", "recompute"])
MOMENTS = ("batch_l2", "second_moment", "variance")
# smaller than the defaults: every example compiles its own network (and its reference)
SIZES = dict(max_depth=5, max_width=12, max_batch=5)


def maybe_jit(fn, jit: bool):
    return jax.jit(fn) if jit else fn


def per_example_grads(net, loss, params, x, y):
    def one(params, xb, yb):
        return jax.grad(lambda p: loss(net.apply(p, xb[None]), yb[None]))(params)

    return jax.vmap(one, in_axes=(None, 0, 0))(params, x, y)


@functools.lru_cache(maxsize=64)
def reference(net, loss):
    """Every quantity by its definition from jax.vmap(jax.grad(l_b)), jitted."""
    @jax.jit
    def fn(params, x, y, max_norm):
        batch = x.shape[0]
        g = per_example_grads(net, loss, params, x, y)
        batch_l2 = jax.tree.map(lambda a: jnp.sum(jnp.square(a).reshape(batch, -1), axis=1), g)
        squares = jax.tree.leaves(batch_l2)
        norms = jnp.sqrt(sum(squares[1:], squares[0]) if squares else jnp.zeros((batch,)))
        factors = jnp.where(norms > 0,
                            jnp.minimum(1.0, max_norm / jnp.where(norms > 0, norms, 1.0)), 1.0)
        clipped = jax.tree.map(
            lambda a: jnp.mean(a * factors.reshape((batch,) + (1,) * (a.ndim - 1)), axis=0), g)
        return {
            "batch_l2": batch_l2,
            "second_moment": jax.tree.map(lambda a: jnp.mean(jnp.square(a), axis=0), g),
            "variance": jax.tree.map(lambda a: jnp.var(a, axis=0), g),
            "norms": norms,
            "clipped": clipped,
            "value": loss(net.apply(params, x), y),
        }

    return fn


def assert_variance_close(got, expected, second_moment, what):
    assert jax.tree.structure(got) == jax.tree.structure(expected), what
    for v, e, m in zip(jax.tree.leaves(got), jax.tree.leaves(expected),
                       jax.tree.leaves(second_moment)):
        assert v.shape == e.shape and v.dtype == e.dtype, what
        err = float(np.max(np.abs(np.asarray(v) - np.asarray(e)), initial=0.0))
        scale = float(np.max(np.abs(np.asarray(m)), initial=0.0))
        assert err <= TOL * scale or err == 0.0, f"{what}: error {err:.3e}, max |m| {scale:.3e}"


@settings(max_examples=6)
@given(case=cases(**SIZES), jit=JIT, remat=REMAT)
def test_moments_norms_and_clipping_match_vmapped_grads(case, jit, remat):
    """batch_l2, second_moment and variance (one backprop), per_example_grad_norms, and
    clipped_value_and_grad at max_norm = the median norm (1 when every norm is 0), all
    under the drawn policy, in one program when jitted."""
    net, loss = case.net, case.loss
    norms_ref = reference(net, loss)(case.params, case.x, case.y, 1.0)["norms"]
    median = float(np.median(np.asarray(norms_ref)))
    max_norm = median if median > 0 else 1.0
    extensions = (fnet.extensions.batch_l2(), fnet.extensions.second_moment(),
                  fnet.extensions.variance())
    norms_fn = fnet.per_example_grad_norms(net, loss, remat=remat)
    clipped_fn = fnet.clipped_value_and_grad(net, loss, max_norm, remat=remat)

    def ours(params, x, y):
        record = fnet.backprop(net, loss, params, x, y, extensions=extensions, remat=remat)
        return record.extensions, norms_fn(params, x, y), clipped_fn(params, x, y)

    got, norms, (value, clipped) = maybe_jit(ours, jit)(case.params, case.x, case.y)
    expected = reference(net, loss)(case.params, case.x, case.y, max_norm)
    batch = case.x.shape[0]
    what = f"remat={remat}, {'jit' if jit else 'eager'} ({case.description})"

    for name in MOMENTS:
        assert jax.tree.structure(got[name]) == jax.tree.structure(case.params), (name, what)
    for leaf, m, v, p in zip(jax.tree.leaves(got["batch_l2"]),
                             jax.tree.leaves(got["second_moment"]),
                             jax.tree.leaves(got["variance"]), jax.tree.leaves(case.params)):
        assert leaf.shape == (batch,), what
        assert m.shape == p.shape and v.shape == p.shape, what
    assert_close(got["batch_l2"], expected["batch_l2"], f"batch_l2, {what}")
    assert_close(got["second_moment"], expected["second_moment"], f"second_moment, {what}")
    assert_variance_close(got["variance"], expected["variance"], expected["second_moment"],
                          f"variance, {what}")

    assert norms.shape == (batch,), what
    assert_close(norms, expected["norms"], f"per_example_grad_norms, {what}")
    assert jax.tree.structure(clipped) == jax.tree.structure(case.params), what
    assert_close(value, expected["value"], f"value, {what}")
    assert_close(clipped, expected["clipped"], f"clipped mean, {what}")
