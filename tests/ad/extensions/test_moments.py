"""The ``batch_l2``, ``second_moment`` and ``variance`` extensions of the one backward walk.

For a batch of B examples, l_b = loss(net.apply(params, x[b:b+1]), y[b:b+1]) and
g_b = grad_params l_b. Leaf by leaf of params:

- ``batch_l2``:      (B,), sum over the leaf's entries of g_b**2 (a repeat's stacked leaf
                     sums its copies too);
- ``second_moment``: like the leaf, mean_b g_b**2;
- ``variance``:      like the leaf, mean_b g_b**2 - (mean_b g_b)**2, i.e. ``jnp.var`` of
                     the g_b over the batch axis.

The reference everywhere is ``jax.vmap(jax.grad(l_b))`` over the examples, reduced in
plain ``jax.numpy``, to a relative error of 1e-10 in float64 (leaf by leaf, relative to
the reference leaf's largest entry).

Targeted cases: dense chains, nested chains, residuals, repeats (of a chain of a dense
layer and an activation, of a user layer with a rule; nested repeats of a residual; a
repeat as the whole net) under every memory policy, user layers with and without their
own rules (and a user layer's own rules being the ones used), parameterless layers
(share ``()``), dense layers on sequence inputs (B, T, D) through both the Gram form and
the materialised form of ``per_example_sq_norms`` (and ``uses_gram``'s choice for those
shapes), the dense rules called directly against the generic per-example pullback, every
subset of the four extensions in one call against each alone, ``jax.vmap`` over
(parameter set, batch) pairs, ``jax.jit`` and eager calls (``chex.variants``), float32
and bfloat16.
"""

from __future__ import annotations

import functools
import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import funcnet as fnet
from funcnet.ad.extensions._base import per_example_grads_generic
from funcnet.nn._dense import uses_gram

# pytest runs with --import-mode=importlib; conftest puts tests/ on sys.path.
from exactness import TOL, assert_close, problem, random_params, rel_err  # noqa: E402

LOSS = fnet.losses.squared_error
POLICIES = ("keep", "sqrt", "recompute")
MODES = {"jit": jax.jit, "eager": lambda fn: fn}
NAMES = ("batch_grad", "batch_l2", "second_moment", "variance")
MAKERS = {
    "batch_grad": fnet.extensions.batch_grad,
    "batch_l2": fnet.extensions.batch_l2,
    "second_moment": fnet.extensions.second_moment,
    "variance": fnet.extensions.variance,
}
MOMENTS = ("batch_l2", "second_moment", "variance")


# ---------------------------------------------------------------------------------------
# Helpers.

def moments_fn(net, names=NAMES, loss=LOSS, remat="keep"):
    """(params, x, y) -> ({name: record.extensions[name]}, record.grads), ONE backprop
    with the extensions ``names`` (in that order)."""
    def fn(params, x, y):
        record = fnet.backprop(net, loss, params, x, y,
                               extensions=tuple(MAKERS[name]() for name in names),
                               remat=remat)
        return {name: record.extensions[name] for name in names}, record.grads

    return fn


def one_example_grad(net, loss=LOSS):
    """(params, x_b, y_b) -> g_b = grad of example b's own loss, by jax.grad."""
    def fn(params, xb, yb):
        return jax.grad(lambda p: loss(net.apply(p, xb[None]), yb[None]))(params)

    return fn


def sq_norm_per_example(g):
    """(B, ...) -> (B,): the sum of squares over every axis but the batch axis."""
    return jnp.sum(jnp.square(g).reshape(g.shape[0], -1), axis=1)


def moments_from_grads(per_example):
    """Every extension's result from the per-example gradients, leaves (B, *leaf shape),
    in plain jax.numpy (the definitions)."""
    return {
        "batch_grad": per_example,
        "batch_l2": jax.tree.map(sq_norm_per_example, per_example),
        "second_moment": jax.tree.map(lambda g: jnp.mean(jnp.square(g), axis=0), per_example),
        "variance": jax.tree.map(lambda g: jnp.var(g, axis=0), per_example),
    }


def unjitted_reference(net, loss=LOSS):
    def fn(params, x, y):
        per_example = jax.vmap(one_example_grad(net, loss), in_axes=(None, 0, 0))(params, x, y)
        return moments_from_grads(per_example)

    return fn


@functools.lru_cache(maxsize=None)
def reference(net, loss=LOSS):
    """jax.vmap(jax.grad(l_b)) reduced by the definitions, jitted once per net."""
    return jax.jit(unjitted_reference(net, loss))




def expected_shape(name, batch, leaf_shape):
    if name == "batch_grad":
        return (batch,) + leaf_shape
    if name == "batch_l2":
        return (batch,)
    return leaf_shape


def assert_moments(got, params, x, y, net, what, loss=LOSS, expected=None):
    """Every result has params' structure and the documented leaf shapes, and equals the
    reference."""
    batch = x.shape[0]
    expected = reference(net, loss)(params, x, y) if expected is None else expected
    assert got, what
    for name, tree in got.items():
        assert jax.tree.structure(tree) == jax.tree.structure(params), (what, name)
        for leaf, p in zip(jax.tree.leaves(tree), jax.tree.leaves(params)):
            assert leaf.shape == expected_shape(name, batch, p.shape), (
                what, name, leaf.shape, p.shape)
        assert_close(tree, expected[name], f"{name} of {what}")
    return expected


# User layers: a scale (params {"scale": (width,)}) without rules, with the
# per_example_grads rule, and with all three rules; an affine map with sin (params "w" and
# "b"), and the parameterless sin.

def _scale(w, z):
    return w["scale"][None] * z


def _init_scale(key, in_shape):
    return {"scale": 1.0 + 0.5 * jax.random.normal(key, in_shape[-1:])}


def _scale_rule(layer, params, z, q):
    del layer, params
    return {"scale": z * q}


def _scale_sq_norms(layer, params, z, q):
    del layer, params
    return {"scale": jnp.sum(jnp.square(z * q), axis=1)}


def _scale_sum_of_squares(layer, params, z, q):
    del layer, params
    return {"scale": jnp.sum(jnp.square(z * q), axis=0)}


def _affine_sin(w, z):
    return jnp.sin(z @ w["w"] + w["b"][None])


def _init_affine_sin(key, in_shape):
    width = in_shape[-1]
    return {"w": jax.random.normal(key, (width, width)) / jnp.sqrt(width),
            "b": jnp.zeros((width,))}


def _sine(w, z):
    del w
    return jnp.sin(z)


SCALE = fnet.layer(_scale, _init_scale, name="scale")
SCALE_WITH_RULE = fnet.layer(_scale, _init_scale, name="scale with rule",
                             rules={"per_example_grads": _scale_rule})
SCALE_WITH_ALL_RULES = fnet.layer(_scale, _init_scale, name="scale with all rules",
                                  rules={"per_example_grads": _scale_rule,
                                         "per_example_sq_norms": _scale_sq_norms,
                                         "sum_of_squares": _scale_sum_of_squares})
AFFINE_SIN = fnet.layer(_affine_sin, _init_affine_sin, name="affine sin")
SINE = fnet.layer(_sine, name="sin")


def repeat_net():
    return fnet.chain(
        fnet.dense(4),
        fnet.repeat(fnet.chain(fnet.dense(4), fnet.tanh), 4),  # dense + activation
        fnet.repeat(SCALE_WITH_RULE, 2),                        # a user layer
        fnet.dense(2))


def chains_net():
    """Dense layers (one without bias), activations, nested chains and residuals."""
    return fnet.chain(
        fnet.dense(5), fnet.tanh,
        fnet.residual(fnet.chain(fnet.dense(3), fnet.gelu, fnet.dense(5, bias=False))),
        fnet.chain(fnet.chain(fnet.dense(3), fnet.softplus), fnet.residual(fnet.dense(3))),
        fnet.dense(2))


def check(variant, net, in_shape, batch=4, remat="keep", names=NAMES, seed=0):
    """Runs ``variant`` (jax.jit or not) of one backprop with ``names``; asserts every
    result against the reference, and backprop's grads against the batch mean of the
    per-example gradients."""
    params, x, y = problem(net, in_shape, batch, seed)
    got, grads = variant(moments_fn(net, names, remat=remat))(params, x, y)
    what = f"{net.name} on {in_shape}, remat={remat}"
    expected = assert_moments(got, params, x, y, net, what)
    assert_close(jax.tree.map(lambda g: jnp.asarray(np.mean(np.asarray(g), axis=0)),
                              expected["batch_grad"]), grads, f"grads of {what}")
    return params, got, expected


# ---------------------------------------------------------------------------------------
# Networks of every composition, all four extensions in one call, jitted and eager.

class MomentVariants(chex.TestCase):
    """The same assertions under ``jax.jit`` and without it."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_dense_nested_chains_and_residuals(self):
        net = chains_net()
        params, got, _ = check(self.variant, net, (6,), batch=5)
        assert got["batch_l2"][0]["w"].shape == (5,)
        assert got["batch_l2"][0]["b"].shape == (5,)
        assert got["second_moment"][0]["w"].shape == (6, 5)
        assert got["variance"][2][2]["w"].shape == (3, 5)
        assert "b" not in got["variance"][2][2]
        assert got["batch_l2"][3][0][0]["w"].shape == (5,)
        assert got["second_moment"][3][1]["w"].shape == (3, 3)
        for name in NAMES:  # parameterless layers: share ()
            assert got[name][1] == () and got[name][2][1] == () and got[name][3][0][1] == ()
        # the variance is the biased one, m - p^2 <= m
        for v, m in zip(jax.tree.leaves(got["variance"]), jax.tree.leaves(got["second_moment"])):
            assert np.all(np.asarray(v) <= np.asarray(m) * (1 + 1e-12))

    @chex.variants(with_jit=True, without_jit=True)
    def test_user_and_parameterless_layers(self):
        """User layers without rules (the generic per-example pullbacks: affine sin;
        the per_example_grads rule alone is in repeat_net) and with all three rules;
        parameterless user and built-in layers, repeated too (share ())."""
        net = fnet.chain(fnet.dense(3), SINE, SCALE_WITH_ALL_RULES, AFFINE_SIN,
                         fnet.repeat(fnet.tanh, 2), fnet.repeat(AFFINE_SIN, 2), fnet.dense(2))
        params, got, _ = check(self.variant, net, (2,), batch=4, names=MOMENTS)
        for name in MOMENTS:
            assert got[name][1] == () and got[name][4] == (), name
        assert got["batch_l2"][2]["scale"].shape == (4,)
        assert got["batch_l2"][3]["w"].shape == (4,)
        assert got["batch_l2"][5]["w"].shape == (4,)
        assert got["second_moment"][5]["w"].shape == (2, 3, 3)


@pytest.mark.parametrize("mode, remat",
                         [("jit", remat) for remat in POLICIES] + [("eager", "keep")])
def test_repeats(mode, remat):
    """Repeats of a chain (dense, tanh) of 4 copies (under sqrt: two segments of two) and
    of a user layer: batch_l2 (B,) sums the copies; the moments are stacked like params.
    (A repeat's body is traced inside its scan whether or not the call is jitted, so the
    eager call is checked under one policy.)"""
    params, got, expected = check(MODES[mode], repeat_net(), (3,), batch=3, remat=remat)
    assert got["batch_l2"][1][0]["w"].shape == (3,)
    assert got["second_moment"][1][0]["w"].shape == (4, 4, 4)
    assert got["variance"][2]["scale"].shape == (2, 4)
    # the repeat's leaf is the sum over copies of each copy's squared norm
    per_example = expected["batch_grad"]
    for index, key in ((1, 0), (2, None)):
        stacked = per_example[index] if key is None else per_example[index][key]
        leaf_got = got["batch_l2"][index] if key is None else got["batch_l2"][index][key]
        for name in stacked:
            g = np.asarray(stacked[name])  # (B, n, ...)
            per_copy = np.sum(np.square(g).reshape(g.shape[0], g.shape[1], -1), axis=2)
            assert per_copy.shape == (3, g.shape[1]) and np.all(per_copy > 0), (index, name)
            assert rel_err(leaf_got[name], per_copy.sum(axis=1)) <= TOL, (index, name)
            # not one copy's alone: every copy contributes
            assert rel_err(leaf_got[name], per_copy[:, 0]) > 1e-3, (index, name)


@pytest.mark.parametrize("remat", POLICIES)
def test_nested_repeat_as_the_net(remat):
    """A repeat (4 copies) of a chain holding a repeat (2 copies) of a residual, as the
    whole net: results have the block's structure (not wrapped in a tuple of one layer);
    batch_l2 (B,) sums all 4 * 2 copies; second_moment and variance (4, 2, *S)."""
    inner = fnet.repeat(fnet.residual(fnet.chain(fnet.dense(3), fnet.tanh)), 2)
    net = fnet.repeat(fnet.chain(inner, SCALE), 4)
    params, got, _ = check(jax.jit, net, (3,), batch=3, remat=remat)
    assert isinstance(got["batch_l2"], tuple) and len(got["batch_l2"]) == 2
    assert got["batch_l2"][0][0]["w"].shape == (3,)
    assert got["variance"][0][0]["w"].shape == (4, 2, 3, 3)
    assert got["second_moment"][1]["scale"].shape == (4, 3)


@pytest.mark.parametrize("steps, fan_in, out, gram", [(2, 8, 8, True), (16, 3, 3, False)])
def test_dense_on_sequence_inputs(steps, fan_in, out, gram):
    """Per-example shape (T, D): batch_l2 through the Gram form (2 T^2 < D O) and
    through the materialised per-example gradient, both equal to the reference."""
    assert uses_gram(steps, fan_in, out) is gram
    assert uses_gram(steps, out, out) is gram  # the second layer decides alike
    net = fnet.chain(fnet.dense(out), fnet.tanh, fnet.dense(out, bias=False))
    params, got, _ = check(jax.jit, net, (steps, fan_in), batch=3)
    assert got["batch_l2"][0]["w"].shape == (3,)
    assert got["second_moment"][2]["w"].shape == (out, out)


def test_a_user_layers_own_rules_are_the_ones_used():
    """Deliberately scaled rules (per_example_sq_norms doubled, sum_of_squares tripled):
    batch_l2 is twice the reference at that layer, second_moment three times, and the
    variance 3 m - p^2; the other layers are right. In a chain and inside a repeat."""
    def doubled_sq_norms(layer, params, z, q):
        return {"scale": 2.0 * _scale_sq_norms(layer, params, z, q)["scale"]}

    def tripled_sum_of_squares(layer, params, z, q):
        return {"scale": 3.0 * _scale_sum_of_squares(layer, params, z, q)["scale"]}

    scaled = fnet.layer(_scale, _init_scale, name="scale with scaled rules",
                        rules={"per_example_sq_norms": doubled_sq_norms,
                               "sum_of_squares": tripled_sum_of_squares})
    net = fnet.chain(fnet.dense(3), scaled, fnet.repeat(scaled, 2), fnet.dense(2))
    params, x, y = problem(net, (2,), batch=3)
    got, _ = jax.jit(moments_fn(net, MOMENTS))(params, x, y)
    expected = reference(net)(params, x, y)
    mean = jax.tree.map(lambda g: jnp.mean(g, axis=0), expected["batch_grad"])
    for i in (1, 2):
        assert_close(got["batch_l2"][i], jax.tree.map(lambda a: 2.0 * a, expected["batch_l2"][i]),
                     f"doubled batch_l2 at layer {i}")
        assert_close(got["second_moment"][i],
                     jax.tree.map(lambda a: 3.0 * a, expected["second_moment"][i]),
                     f"tripled second_moment at layer {i}")
        assert_close(got["variance"][i],
                     jax.tree.map(lambda m, p: 3.0 * m - p * p, expected["second_moment"][i],
                                  mean[i]), f"variance from the tripled rule at layer {i}")
    for name in MOMENTS:
        assert_close((got[name][0], got[name][3]), (expected[name][0], expected[name][3]),
                     f"{name} of the dense layers")


# ---------------------------------------------------------------------------------------
# The dense rules against the generic per-example pullback, called directly.

@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("example_shape, out", [((5,), 4), ((2, 8), 8), ((16, 3), 3),
                                                ((2, 3, 5), 4)])
def test_dense_rules_equal_squared_generic_pullbacks(bias, example_shape, out):
    """per_example_sq_norms (Goodfellow for vectors, Gram for (2, 8) -> 8, materialised
    for (16, 3) -> 3 and (2, 3, 5) -> 4, T = 6) and sum_of_squares equal the squares of
    the generic per-example pullbacks."""
    layer = fnet.dense(out, bias=bias)
    sq_norms = layer.rule("per_example_sq_norms")
    sum_sq = layer.rule("sum_of_squares")
    assert sq_norms is not None and sum_sq is not None
    rng = np.random.default_rng(1)
    params, out_shape = random_params(layer, example_shape, rng)
    z = jnp.asarray(rng.standard_normal((5,) + example_shape))
    q = jnp.asarray(rng.standard_normal((5,) + out_shape))

    @jax.jit
    def both(params, z, q):
        generic = per_example_grads_generic(layer, params, z, q)
        return ((sq_norms(layer, params, z, q), sum_sq(layer, params, z, q)),
                (jax.tree.map(sq_norm_per_example, generic),
                 jax.tree.map(lambda a: jnp.sum(jnp.square(a), axis=0), generic)))

    fast, slow = both(params, z, q)
    assert_close(fast[0], slow[0], f"dense per_example_sq_norms on {example_shape}")
    assert_close(fast[1], slow[1], f"dense sum_of_squares on {example_shape}")


# ---------------------------------------------------------------------------------------
# Any subset of the extensions in one call: each result as when asked alone.

def test_any_subset_in_one_call_equals_each_alone_eager():
    """Every subset of two or more of the four (and all four in reverse order), eagerly
    (per-layer compiled code, reused across the calls and with the eager variant above)."""
    net = chains_net()
    params, x, y = problem(net, (6,), batch=5)
    alone = {name: moments_fn(net, (name,))(params, x, y)[0][name] for name in NAMES}
    assert_moments(alone, params, x, y, net, "each alone")
    subsets = [s for r in range(2, len(NAMES) + 1) for s in itertools.combinations(NAMES, r)]
    assert len(subsets) == 11
    for subset in subsets + [NAMES[::-1]]:
        got, _ = moments_fn(net, subset)(params, x, y)
        assert sorted(got) == sorted(subset)
        for name in subset:
            assert_close(got[name], alone[name], f"{name} with {subset} vs alone")


def test_all_four_in_one_call_equal_each_alone_jitted():
    """Inside a repeat (under sqrt: two segments of two copies) the batched and stacked
    batch_grad, the summed batch_l2 and the stacked moments ride one scan."""
    remat = "sqrt"
    net = repeat_net()
    params, x, y = problem(net, (3,), batch=3)  # (the reference of test_repeats)

    @jax.jit  # five backprops, one compilation
    def together_and_alone(params, x, y):
        together = moments_fn(net, NAMES[::-1], remat=remat)(params, x, y)[0]
        alone = {name: moments_fn(net, (name,), remat=remat)(params, x, y)[0][name]
                 for name in NAMES}
        return together, alone

    together, alone = together_and_alone(params, x, y)
    for name in NAMES:
        assert_close(together[name], alone[name], f"{name} together vs alone, {remat}")
    assert_moments(together, params, x, y, net, f"together, {remat}")


# ---------------------------------------------------------------------------------------
# jax.vmap over parameter sets and over batches.

def test_vmap_over_parameter_sets_and_batches():
    """jax.vmap over 3 (parameter set, batch) pairs (remat="sqrt", a repeat of 4 copies
    inside): each result is its own pair's, of the inner batch's size B = 4."""
    remat = "sqrt"
    net = fnet.chain(fnet.dense(3),
                     fnet.repeat(fnet.chain(fnet.dense(3), fnet.sigmoid), 4), fnet.dense(2))
    sets = [problem(net, (3,), batch=4, seed=seed) for seed in range(3)]
    params, x, y = (jax.tree.map(lambda *leaves: jnp.stack(leaves), *parts)
                    for parts in zip(*sets))
    assert x.shape == (3, 4, 3)
    got, _ = jax.jit(jax.vmap(moments_fn(net, remat=remat)))(params, x, y)
    expected = jax.jit(jax.vmap(unjitted_reference(net)))(params, x, y)
    for name in NAMES:
        for g, p in zip(jax.tree.leaves(got[name]), jax.tree.leaves(params)):
            assert g.shape == (3,) + expected_shape(name, 4, p.shape[1:]), (name, g.shape)
        assert_close(got[name], expected[name], f"{name}, vmap over 3 pairs")
    # the pairs differ: a vmap that reused one pair would not pass the above
    assert rel_err(got["batch_l2"][0]["w"][0], got["batch_l2"][0]["w"][1]) > 1e-3
    assert rel_err(got["variance"][1][0]["w"][0], got["variance"][1][0]["w"][2]) > 1e-3


# ---------------------------------------------------------------------------------------
# Lower precision.
#
# The reference is the float64 computation on the SAME (rounded) params and data, so only
# the arithmetic's rounding is measured. Per-example gradients through a few layers carry
# a relative error of a few tens of units of the rounding (eps = 2^-24 for float32, 2^-8
# for bfloat16; test_batch_grad allows 1e-5 and 5e-2 for them); squaring doubles a
# relative error and the sums of squares add positive terms (no cancellation), so
# batch_l2 and second_moment get twice that. The variance is computed as the difference
# m - p^2 it is defined by, whose rounding error is relative to m (not to the variance):
# its error is measured against max |m| of the leaf. Measured on this net: float32 at most
# 8e-7 (tolerance 2e-5), bfloat16 at most 2.6e-2 (tolerance 1e-1, about 25 units of 2^-8).

LOW_PRECISION = {jnp.float32: 2e-5, jnp.bfloat16: 1e-1}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_low_precision(dtype):
    tolerance = LOW_PRECISION[dtype]
    net = repeat_net()  # repeats in low precision; the float64 reference of test_repeats
    params, x, y = problem(net, (3,), batch=3)
    cast = jax.tree.map(lambda a: a.astype(dtype), (params, x, y))
    got, grads = jax.jit(moments_fn(net, MOMENTS))(*cast)
    exact = reference(net)(*jax.tree.map(lambda a: a.astype(jnp.float64), cast))
    for name in MOMENTS:
        paths = jax.tree_util.tree_flatten_with_path(exact[name])[0]
        for (path, e), g, m in zip(paths, jax.tree.leaves(got[name]),
                                   jax.tree.leaves(exact["second_moment"])):
            where = f"{jnp.dtype(dtype).name} {name} at {jax.tree_util.keystr(path)}"
            assert g.dtype == dtype, (where, g.dtype)
            assert g.shape == e.shape, where
            g64 = np.asarray(g.astype(jnp.float32), np.float64)
            assert np.all(np.isfinite(g64)), where
            if name == "variance":
                err = np.max(np.abs(g64 - np.asarray(e))) / np.max(np.abs(np.asarray(m)))
            else:
                err = rel_err(g64, e)
            assert err <= tolerance, f"{where}: {err:.2e} > {tolerance:g}"
    for g in jax.tree.leaves(grads):
        assert g.dtype == dtype
