"""Per-example gradient norms and the clipped mean gradient of DP-SGD.

For a batch of B examples, l_b = loss(net.apply(params, x[b:b+1]), y[b:b+1]) and
g_b = grad_params l_b; the batch loss is the mean of the l_b.

- ``fnet.per_example_grad_norms(net, loss, remat)(params, x, y)`` is (B,) = ||g_b||, the
  norm over every params leaf;
- ``fnet.clipped_value_and_grad(net, loss, max_norm, remat)(params, x, y)`` is
  (batch loss, mean_b c_b g_b) with c_b = min(1, max_norm / ||g_b||), c_b = 1 when
  g_b = 0.

The reference is ``jax.vmap(jax.grad(l_b))`` over the examples, reduced in plain
``jax.numpy``, to a relative error of 1e-10 in float64. Cases: a net whose top-level
layers include a nested chain, a residual and a repeat, under every memory policy, jitted
and eager (``chex.variants``); a net that is not a chain; max_norm at the median norm
(some examples clipped, some not), huge (the plain gradient) and tiny (every example
clipped: max_norm times the mean of the unit directions); an example whose gradient is
exactly zero; and the argument errors.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import funcnet as fnet

# pytest runs with --import-mode=importlib; conftest puts tests/ on sys.path.
from exactness import assert_close, problem, rel_err  # noqa: E402

LOSS = fnet.losses.squared_error
POLICIES = ("keep", "sqrt", "recompute")
MODES = {"jit": jax.jit, "eager": lambda fn: fn}


# ---------------------------------------------------------------------------------------
# Helpers and references.

def container_net():
    """Top-level layers: dense, a residual, a repeat, a nested chain, a parameterless
    layer and dense."""
    return fnet.chain(
        fnet.dense(4),
        fnet.residual(fnet.dense(4)),
        fnet.repeat(fnet.chain(fnet.dense(4), fnet.sigmoid), 4),
        fnet.chain(fnet.dense(3), fnet.relu),
        fnet.tanh,
        fnet.dense(2))




def per_example_grads(net, loss, params, x, y):
    def one(params, xb, yb):
        return jax.grad(lambda p: loss(net.apply(p, xb[None]), yb[None]))(params)

    return jax.vmap(one, in_axes=(None, 0, 0))(params, x, y)


def norms_of(per_example, batch):
    """||g_b|| over every leaf, (B,)."""
    squares = [jnp.sum(jnp.square(g).reshape(batch, -1), axis=1)
               for g in jax.tree.leaves(per_example)]
    return jnp.sqrt(sum(squares[1:], squares[0]) if squares else jnp.zeros((batch,)))


@functools.lru_cache(maxsize=None)
def reference(net, loss=LOSS):
    """(params, x, y, max_norm) -> (value, per-example grads, norms, clipped mean):
    the definitions on jax.vmap(jax.grad(l_b)), jitted once per net (max_norm traced)."""
    @jax.jit
    def fn(params, x, y, max_norm):
        batch = x.shape[0]
        value = loss(net.apply(params, x), y)
        per_example = per_example_grads(net, loss, params, x, y)
        norms = norms_of(per_example, batch)
        safe = jnp.where(norms > 0, norms, 1.0)
        factors = jnp.where(norms > 0, jnp.minimum(1.0, max_norm / safe), 1.0)
        clipped = jax.tree.map(
            lambda g: jnp.mean(g * factors.reshape((batch,) + (1,) * (g.ndim - 1)), axis=0),
            per_example)
        return value, per_example, norms, clipped

    return fn


# ---------------------------------------------------------------------------------------
# Norms and the clipped mean, jitted and eager, under every memory policy.

def norms_and_clipped(net, max_norms, remat="keep"):
    """(params, x, y) -> (norms, [(value, clipped grads) per max_norm]), by
    per_example_grad_norms and clipped_value_and_grad (one jitted program when jitted)."""
    norms_fn = fnet.per_example_grad_norms(net, LOSS, remat=remat)
    clipped_fns = [fnet.clipped_value_and_grad(net, LOSS, c, remat=remat) for c in max_norms]

    def fn(params, x, y):
        return norms_fn(params, x, y), [clipped(params, x, y) for clipped in clipped_fns]

    return fn


@pytest.mark.parametrize("mode, remat",
                         [("jit", remat) for remat in POLICIES] + [("eager", "keep")])
def test_norms_and_clipped_at_the_median_norm(mode, remat):
    """Top-level layers: dense, a residual, a repeat of 4 copies (under sqrt two segments of
    two), a nested chain, a parameterless layer. The norms; and at C = the median norm
    half the examples are clipped, half not: mean_b min(1, C/||g_b||) g_b, and the value
    is the plain batch loss."""
    net = container_net()
    params, x, y = problem(net, (3,), batch=6, seed=1)
    _, _, norms, _ = reference(net)(params, x, y, 1.0)
    norms = np.asarray(norms)
    max_norm = float(np.median(norms))
    assert np.sum(norms > max_norm) == 3 and np.sum(norms < max_norm) == 3
    got_norms, [(value, grads)] = MODES[mode](norms_and_clipped(net, [max_norm], remat))(
        params, x, y)
    ref_value, per_example, _, clipped = reference(net)(params, x, y, max_norm)
    what = f"{mode}, remat={remat}"
    assert got_norms.shape == (6,) and got_norms.dtype == jnp.float64
    assert_close(got_norms, norms, f"per_example_grad_norms, {what}")
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    assert_close(value, ref_value, f"value, {what}")
    assert_close(grads, clipped, f"clipped mean at the median norm, {what}")
    # clipping changed the result: it is not the plain mean gradient
    plain = jax.tree.map(lambda g: jnp.mean(g, axis=0), per_example)
    assert rel_err(grads[0]["w"], plain[0]["w"]) > 1e-3


class ClippingVariants(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_huge_and_tiny_max_norms(self):
        """C = 1e30 clips nothing: the plain gradient (fnet.value_and_grad). C below every
        norm clips every example: C times the mean of the unit directions g_b/||g_b||."""
        net = container_net()
        params, x, y = problem(net, (3,), batch=6, seed=1)  # the reference compiled above
        _, per_example, norms, _ = reference(net)(params, x, y, 1.0)
        norms = np.asarray(norms)
        tiny = 1e-3 * float(norms.min())
        clipped_fn = norms_and_clipped(net, [1e30, tiny])
        plain_fn = fnet.value_and_grad(net, LOSS)
        (_, [(value, huge_grads), (_, tiny_grads)]), (plain_value, plain) = self.variant(
            lambda p, x, y: (clipped_fn(p, x, y), plain_fn(p, x, y)))(params, x, y)
        ref_value = reference(net)(params, x, y, 1e30)[0]
        assert_close(huge_grads, plain, "max_norm 1e30 vs fnet.value_and_grad")
        assert_close(huge_grads, jax.tree.map(lambda g: jnp.mean(g, axis=0), per_example),
                     "max_norm 1e30 vs the mean of the per-example gradients")
        assert_close(value, plain_value, "value vs fnet.value_and_grad")
        assert_close(value, ref_value, "value vs the loss")

        directions = jax.tree.map(
            lambda g: jnp.mean(g / jnp.asarray(norms).reshape((6,) + (1,) * (g.ndim - 1)),
                               axis=0), per_example)
        assert_close(tiny_grads, jax.tree.map(lambda d: tiny * d, directions),
                     "max_norm below every norm: C times the mean unit direction")
        # every clipped example has norm C: the result's norm is at most C
        total = np.sqrt(sum(float(np.sum(np.square(np.asarray(g))))
                            for g in jax.tree.leaves(tiny_grads)))
        assert 0 < total <= tiny * (1 + 1e-12)

    @chex.variants(with_jit=True, without_jit=True)
    def test_an_example_with_a_zero_gradient(self):
        """Example 0 has input 0, zero biases and target 0 = its output: its cotangent is
        exactly 0, so g_0 = 0 and ||g_0|| = 0. Its weight is 1 (no 0/0): the result is
        finite and equals the reference at a C that clips the other examples."""
        net = fnet.chain(fnet.dense(3), fnet.tanh, fnet.dense(2))
        params, x, y = problem(net, (3,), batch=4, seed=4)
        params = tuple(dict(w, b=jnp.zeros_like(w["b"])) if w else w for w in params)
        x = x.at[0].set(0.0)
        y = y.at[0].set(0.0)
        assert np.all(np.asarray(net.apply(params, x[:1])) == 0.0)
        _, per_example, ref_norms, _ = reference(net)(params, x, y, 1.0)
        assert all(np.all(np.asarray(g)[0] == 0.0) for g in jax.tree.leaves(per_example))
        max_norm = 0.5 * float(np.min(np.asarray(ref_norms[1:])))  # clips examples 1..3
        norms, [(value, grads)] = self.variant(norms_and_clipped(net, [max_norm]))(
            params, x, y)
        assert float(norms[0]) == 0.0
        assert np.all(np.asarray(norms[1:]) > 0)
        assert_close(norms, ref_norms, "norms with a zero-gradient example")
        ref_value, _, _, clipped = reference(net)(params, x, y, max_norm)
        for g in jax.tree.leaves((value, grads)):
            assert np.all(np.isfinite(np.asarray(g)))
        assert_close(value, ref_value, "value with a zero-gradient example")
        assert_close(grads, clipped, "clipped mean with a zero-gradient example")

    @chex.variants(with_jit=True, without_jit=True)
    def test_a_net_that_is_not_a_chain(self):
        """A residual as the whole net: grads have its params' structure (the inner
        chain's tuple), not wrapped in a tuple of one layer."""
        net = fnet.residual(fnet.chain(fnet.dense(3), fnet.tanh, fnet.dense(3)))
        params, x, y = problem(net, (3,), batch=4, seed=5)
        _, _, norms, _ = reference(net)(params, x, y, 1.0)
        max_norm = float(np.median(np.asarray(norms)))
        got_norms, [(value, grads)] = self.variant(norms_and_clipped(net, [max_norm]))(
            params, x, y)
        ref_value, _, _, clipped = reference(net)(params, x, y, max_norm)
        assert jax.tree.structure(grads) == jax.tree.structure(params)
        assert_close(got_norms, norms, "norms of a residual net")
        assert_close(value, ref_value, "value of a residual net")
        assert_close(grads, clipped, "clipped mean of a residual net")


# ---------------------------------------------------------------------------------------
# Errors.

@pytest.mark.parametrize("max_norm", [0, 0.0, -1, -1e-3, float("nan"), float("inf"), "1",
                                      True, None],
                         ids=["0", "0.0", "-1", "-1e-3", "nan", "inf", "str", "True", "None"])
def test_a_bad_max_norm_raises(max_norm):
    net = fnet.chain(fnet.dense(2))
    with pytest.raises(fnet.ArgumentError) as error:
        fnet.clipped_value_and_grad(net, LOSS, max_norm)
    assert error.value.argument == "max_norm"
    assert str(error.value).startswith("max_norm: ")


@pytest.mark.parametrize("make", [
    lambda net, loss: fnet.per_example_grad_norms(net, loss),
    lambda net, loss: fnet.clipped_value_and_grad(net, loss, 1.0),
], ids=["per_example_grad_norms", "clipped_value_and_grad"])
@pytest.mark.parametrize("loss", ["squared_error", None, 3.0])
def test_a_non_callable_loss_raises(make, loss):
    with pytest.raises(fnet.ArgumentError) as error:
        make(fnet.chain(fnet.dense(2)), loss)
    assert error.value.argument == "loss"


def test_bad_remat_and_targets_raise():
    net = fnet.chain(fnet.dense(2))
    with pytest.raises(fnet.ArgumentError) as error:
        fnet.per_example_grad_norms(net, LOSS, remat="everything")
    assert error.value.argument == "remat"
    with pytest.raises(fnet.ArgumentError) as error:
        fnet.clipped_value_and_grad(net, LOSS, 1.0, remat="everything")
    assert error.value.argument == "remat"
    params, x, y = problem(net, (3,), batch=2)
    with pytest.raises(fnet.LayerError, match="one target per example"):
        fnet.per_example_grad_norms(net, LOSS)(params, x, y[:1])
    with pytest.raises(fnet.LayerError, match="one target per example"):
        fnet.clipped_value_and_grad(net, LOSS, 1.0)(params, x, y[:1])
