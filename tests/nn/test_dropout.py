"""Dropout and explicit randomness: ``fnet.dropout(rate)`` and the keys that reach it.

DESIGN.md's contract: a stochastic layer acts only when given a key (no key: the
identity); containers split the key over the layers that take one (a user layer with a
two-argument apply is never passed one); with ``key=k`` every training entry point
computes exactly the gradient of ``loss(net.apply(params, x, key=k), y)``, the same
masks eager or jitted and under every memory policy (the recomputing ones, ``sqrt`` and
``recompute``, must redraw the SAME masks); the training entry points refuse a net with
dropout and no key, naming the layer; fit derives one key per step from its own key.

Checked here, in float64 at a relative error of 1e-10 (``exactness.assert_close``):

1. the layer: identity without a key or at rate 0, entries 0 or z / (1 - rate), the
   dropped fraction (binomial), one mask per example, the same key eager and jitted,
   argument errors, equality and hashing, summary, repr;
2. keys through chains, nested chains, residuals and repeats (copy k of a repeat gets
   ``jax.random.split(key, n)[k]``), and user layers beside dropout;
3. value_and_grad / grad / backprop (p_i and q_1), every policy, jitted and eager, against
   ``jax.value_and_grad`` of ``net.apply(..., key=k)``; jvp and vjp with a key;
4. the extensions and the per-example entry points with a key, against a reference that
   keeps the BATCH's masks (example b's loss taken on row b of the whole batch's forward
   pass: a one-example apply would draw another mask);
5. the refusals (no key: a LayerError locating the dropout; a bad key: an ArgumentError
   naming ``key``), and the evaluation paths that need no key;
6. training: fit (deterministic in its key, steps_per_call, resumption, the documented
   per-step keys), train_step, DP-SGD, and the data-parallel mesh.
"""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import funcnet as fnet
from funcnet.ad import _reverse as reverse_module
from funcnet.train import _step as step_module

# pytest runs with --import-mode=importlib, which puts no test directory on sys.path.
from exactness import assert_close, random_params  # noqa: E402

LOSS = fnet.losses.squared_error
CE = fnet.losses.softmax_cross_entropy
POLICIES = ("keep", "sqrt", "recompute")
KEY = jax.random.key(7)


def _data(net, in_width, batch, seed=0):
    """Float64 params (NumPy-drawn), inputs without zeros, and targets for ``net``."""
    rng = np.random.default_rng(seed)
    params, out_shape = random_params(net, (in_width,), rng)
    x = jnp.asarray(rng.standard_normal((batch, in_width)))
    y = jnp.asarray(rng.standard_normal((batch,) + tuple(out_shape)))
    return params, x, y


def _max_diff(a, b):
    return max(float(jnp.max(jnp.abs(u - v))) for u, v in zip(jax.tree.leaves(a),
                                                                jax.tree.leaves(b)))


# ---------------------------------------------------------------------------------------
# 1. The layer.

def test_without_a_key_dropout_is_exactly_the_identity():
    z = jnp.asarray(np.random.default_rng(0).standard_normal((6, 3, 4)))
    layer = fnet.dropout(0.5)
    assert layer.apply((), z) is z
    assert layer.apply((), z, key=None) is z
    net = fnet.chain(fnet.dense(4), fnet.dropout(0.9), fnet.tanh, fnet.dropout(0.5))
    twin = fnet.chain(fnet.dense(4), fnet.tanh)
    params, x, _ = _data(net, 3, 5)
    np.testing.assert_array_equal(net.apply(params, x), twin.apply((params[0], ()), x))


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_rate_zero_is_the_identity_even_with_a_key(dtype):
    z = jnp.asarray(np.random.default_rng(1).standard_normal((8, 5)), dtype)
    out = fnet.dropout(0).apply((), z, key=KEY)
    np.testing.assert_array_equal(out, z)
    assert out.dtype == z.dtype
    net = fnet.chain(fnet.dense(3), fnet.dropout(0.0), fnet.dense(2))
    params, x, _ = _data(net, 5, 4)
    np.testing.assert_array_equal(net.apply(params, x, key=KEY), net.apply(params, x))


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_with_a_key_every_entry_is_zero_or_scaled(rate, dtype):
    """No entry of z is 0, so out == 0 marks a dropped entry; the others are
    z / (1 - rate) up to the rounding of the division in the input's dtype (XLA divides
    by way of a reciprocal, so allow 4 units in the last place, not bit equality)."""
    z = jnp.asarray(np.random.default_rng(2).standard_normal((64, 50)) + 0.01, dtype)
    assert bool(jnp.all(z != 0))
    out = fnet.dropout(rate).apply((), z, key=KEY)
    assert out.dtype == z.dtype and out.shape == z.shape
    scaled = np.asarray(z, np.float64) / (1 - rate)
    out = np.asarray(out)
    kept = out != 0
    assert 0 < kept.sum() < kept.size  # both kinds occur
    np.testing.assert_allclose(out[kept], scaled[kept], rtol=4 * np.finfo(np.dtype(dtype)).eps,
                               atol=0)
    # and not merely masked: the kept entries are scaled, not equal to z
    assert np.all(np.abs(out[kept]) > np.abs(np.asarray(z)[kept]))


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.8])
def test_dropped_fraction_is_binomial_around_the_rate(rate):
    """N = 200,000 entries, each dropped independently with probability ``rate``: the
    dropped count is Binomial(N, rate), so its fraction has standard deviation
    sqrt(rate (1 - rate) / N) (at most 1.1e-3 here); it must lie within 5 of them (a
    false alarm about once in 3.5 million; the key is fixed, so the test is
    deterministic). A mask drawn with the keep probability swapped for the drop
    probability (0.1 vs 0.9, 0.8 vs 0.2) would be hundreds of deviations off."""
    n_entries = 400 * 500
    out = fnet.dropout(rate).apply((), jnp.ones((400, 500)), key=jax.random.key(11))
    fraction = float(jnp.mean(out == 0))
    assert abs(fraction - rate) <= 5 * math.sqrt(rate * (1 - rate) / n_entries), fraction


def test_each_example_gets_its_own_mask():
    """Sixteen equal examples of 64 entries each, rate 0.5: two rows with the same mask
    have probability 2^-64 per pair, so all 16 masks must differ (also through a chain:
    the mask covers the batch axis)."""
    ones = jnp.ones((16, 64))
    masks = np.asarray(fnet.dropout(0.5).apply((), ones, key=KEY) != 0)
    assert len({row.tobytes() for row in masks}) == 16
    net = fnet.chain(fnet.dense(64), fnet.dropout(0.5))
    params, _, _ = _data(net, 3, 1)
    x = jnp.ones((16, 3))  # equal examples: equal outputs but for the masks
    out = np.asarray(net.apply(params, x, key=KEY))
    assert len({row.tobytes() for row in (out != 0)}) == 16
    without_key = np.asarray(net.apply(params, x))
    np.testing.assert_array_equal(without_key[0], without_key[15])


def test_the_same_key_gives_the_same_output_eager_and_jitted():
    z = jnp.asarray(np.random.default_rng(3).standard_normal((12, 7)))
    layer = fnet.dropout(0.4)
    eager = layer.apply((), z, key=KEY)
    jitted = jax.jit(lambda z_, k: layer.apply((), z_, key=k))(z, KEY)
    np.testing.assert_array_equal(eager, jitted)
    np.testing.assert_array_equal(eager, layer.apply((), z, key=jax.random.key(7)))
    net = fnet.chain(fnet.dense(6), fnet.dropout(0.4), fnet.dense(6), fnet.dropout(0.3))
    params, x, _ = _data(net, 7, 12)
    eager = net.apply(params, x, key=KEY)
    jitted = jax.jit(lambda p, x_, k: net.apply(p, x_, key=k))(params, x, KEY)
    np.testing.assert_array_equal(np.asarray(eager) == 0, np.asarray(jitted) == 0)
    assert_close(jitted, eager, "chain with dropout, jitted vs eager")


def test_different_keys_give_different_masks():
    ones = jnp.ones((8, 32))
    layer = fnet.dropout(0.5)
    masks = [np.asarray(layer.apply((), ones, key=jax.random.key(seed)) != 0)
             for seed in range(4)]
    for i in range(4):
        for j in range(i):
            assert not np.array_equal(masks[i], masks[j]), (i, j)


@pytest.mark.parametrize("rate", [-0.1, -1e-300, 1, 1.0, 1.5, float("nan"), float("inf"),
                                  float("-inf"), "0.5", None, True, [0.5], 0.3j],
                         ids=repr)
def test_a_bad_rate_is_an_argument_error(rate):
    with pytest.raises(fnet.ArgumentError) as info:
        fnet.dropout(rate)
    assert info.value.argument == "dropout(rate)"
    assert str(info.value).startswith("dropout(rate): ")


def test_rates_in_range_are_accepted_as_floats():
    assert fnet.dropout(0).rate == 0.0 and isinstance(fnet.dropout(0).rate, float)
    assert fnet.dropout(np.float32(0.5)).rate == 0.5
    assert fnet.dropout(0.999).name == "dropout(0.999)"


def test_equal_layers_are_equal_and_hash_alike():
    assert fnet.dropout(0.5) == fnet.dropout(0.5)
    assert hash(fnet.dropout(0.5)) == hash(fnet.dropout(0.5))
    assert fnet.dropout(0) == fnet.dropout(0.0) and hash(fnet.dropout(0)) == hash(fnet.dropout(0.0))
    assert fnet.dropout(0.5) != fnet.dropout(0.25)
    assert fnet.dropout(0.5) != fnet.tanh
    build = lambda: fnet.chain(fnet.dense(3), fnet.dropout(0.5), fnet.residual(  # noqa: E731
        fnet.chain(fnet.dense(3), fnet.dropout(0.2))), fnet.repeat(fnet.dropout(0.1), 2))
    assert build() == build() and hash(build()) == hash(build())
    assert {build(): 1}[build()] == 1
    # A rebuilt network is the same jit static value: no retrace.
    apply = jax.jit(lambda net, p, x, k: net.apply(p, x, key=k), static_argnums=0)
    params, x, _ = _data(build(), 3, 2)
    apply(build(), params, x, KEY)
    apply(build(), params, x, KEY)
    assert apply._cache_size() == 1


def test_summary_shows_dropout_with_no_params():
    net = fnet.chain(fnet.dense(4), fnet.dropout(0.5), fnet.dense(2))
    summary = fnet.summary(net, (3,))
    row = summary.rows[2]
    assert (row.depth, row.index, row.name) == (1, 1, "dropout(0.5)")
    assert (row.in_shape, row.out_shape, row.params) == ((4,), (4,), 0)
    assert row.flops == 4  # one multiply per entry
    assert summary.total_params == 3 * 4 + 4 + 4 * 2 + 2
    assert "dropout(0.5)" in str(summary)


def test_repr_describe_init_and_stochastic():
    layer = fnet.dropout(0.25)
    assert layer.name == "dropout(0.25)"
    assert repr(layer).startswith("<layer dropout(0.25): ")
    assert layer.describe() in repr(layer)
    assert "0.25" in layer.describe() and "0.75" in layer.describe()
    assert "no params" in layer.describe()
    params, out_shape = layer.init(KEY, (2, 3, 4))
    assert params == () and out_shape == (2, 3, 4)
    assert layer.stochastic
    assert fnet.chain(fnet.dense(2), layer).stochastic
    assert fnet.residual(fnet.chain(fnet.dense(2), layer)).stochastic
    assert fnet.repeat(fnet.chain(fnet.dense(2), layer), 3).stochastic
    assert not fnet.chain(fnet.dense(2), fnet.tanh).stochastic
    assert not fnet.dense(2).stochastic


# ---------------------------------------------------------------------------------------
# 2. Keys through containers.

def _drop(rate, z, key):
    return fnet.dropout(rate).apply((), z, key=key)


def test_a_chain_splits_its_key_over_its_layers_and_nested_chains_split_again():
    inner = fnet.chain(fnet.dropout(0.5), fnet.dense(4))
    net = fnet.chain(fnet.dense(4), fnet.dropout(0.3), inner, fnet.tanh, fnet.dropout(0.2))
    params, x, _ = _data(net, 3, 6)
    keys = jax.random.split(KEY, 5)
    z = fnet.dense(4).apply(params[0], x)
    z = _drop(0.3, z, keys[1])
    z = _drop(0.5, z, jax.random.split(keys[2], 2)[0])
    z = fnet.dense(4).apply(params[2][1], z)
    z = _drop(0.2, jnp.tanh(z), keys[4])
    out = net.apply(params, x, key=KEY)
    np.testing.assert_array_equal(np.asarray(out) == 0, np.asarray(z) == 0)
    assert_close(out, z, "chain with nested chain, keys split per level")


def test_a_residual_passes_its_key_to_its_inner_layer():
    block = fnet.chain(fnet.dense(4), fnet.dropout(0.5))
    net = fnet.residual(block)
    params, x, _ = _data(net, 4, 6)
    expected = x + block.apply(params, x, key=KEY)
    assert_close(net.apply(params, x, key=KEY), expected, "residual with a key")
    assert not np.allclose(net.apply(params, x, key=KEY), net.apply(params, x))


def test_copy_k_of_a_repeat_uses_row_k_of_the_split_key():
    block = fnet.chain(fnet.dense(5), fnet.tanh, fnet.dropout(0.5))
    net = fnet.repeat(block, 3)
    params, x, _ = _data(net, 5, 4)
    keys = jax.random.split(KEY, 3)
    z = x
    for k in range(3):
        z = block.apply(jax.tree.map(lambda a: a[k], params), z, key=keys[k])
    out = net.apply(params, x, key=KEY)
    np.testing.assert_array_equal(np.asarray(out) == 0, np.asarray(z) == 0)
    assert_close(out, z, "repeat copies with split keys")


def test_the_copies_of_a_repeat_get_different_masks():
    """repeat(dropout(0.5), 3) on ones: the output is 8 where all three copies kept an
    entry and 0 elsewhere; it equals the three masks of split(key, 3) composed, which
    differ pairwise (one mask reused for every copy would give 8 at half the entries)."""
    net = fnet.repeat(fnet.dropout(0.5), 3)
    ones = jnp.ones((16, 32))
    out = np.asarray(net.apply((), ones, key=KEY))
    masks = [np.asarray(_drop(0.5, ones, k) != 0) for k in jax.random.split(KEY, 3)]
    np.testing.assert_array_equal(out, 8.0 * (masks[0] & masks[1] & masks[2]))
    assert not np.array_equal(masks[0], masks[1])
    assert not np.array_equal(masks[1], masks[2])
    assert not np.array_equal(masks[0], masks[2])
    assert abs(float(np.mean(out != 0)) - 1 / 8) < 0.06  # 512 entries: sd 0.015


def _scale_init(key, in_shape):
    return {"s": jnp.ones(in_shape) * 1.5}, in_shape


def _scale_apply(params, z):  # two arguments only: passing key= would raise TypeError
    return params["s"][None] * z


SCALE = fnet.Layer(_scale_init, _scale_apply, name="scale")
SHIFT = fnet.layer(lambda w, z: z + w[None], lambda key, shape: jnp.zeros(shape), name="shift")


def test_user_layers_beside_dropout_are_never_passed_a_key():
    net = fnet.chain(fnet.dense(4), SCALE, fnet.dropout(0.5),
                     fnet.repeat(fnet.chain(SHIFT, fnet.dropout(0.3)), 2),
                     fnet.residual(fnet.chain(SCALE, fnet.dropout(0.3))), fnet.dense(2))
    params, x, y = _data(net, 3, 5)
    assert not SCALE.stochastic and not SHIFT.stochastic
    out = net.apply(params, x, key=KEY)  # would raise if a user apply were passed key=
    assert out.shape == (5, 2)
    assert not np.allclose(out, net.apply(params, x))

    @jax.jit
    def run(params, key):
        reference = jax.value_and_grad(lambda p: LOSS(net.apply(p, x, key=key), y))(params)
        return reference, {policy: fnet.value_and_grad(net, LOSS, remat=policy)(
            params, x, y, key=key) for policy in POLICIES}, fnet.grad(net, LOSS)(
            params, x, y, key=key)

    reference, ours, grads = run(params, KEY)
    for policy in POLICIES:
        assert_close(ours[policy], reference,
                     f"value_and_grad with user layers beside dropout, {policy}, jit")
    assert_close(grads, reference[1], "grad with user layers beside dropout, keep, jit")


# ---------------------------------------------------------------------------------------
# 3. Exactness with a key: every policy, jitted and eager.

# Top-level dropout (on the input too, so q_1 sees a mask), nested chains and a residual:
# 7 top-level layers, so sqrt keeps 3 segments (sizes 3, 3, 1).
NESTED = fnet.chain(
    fnet.dropout(0.25), fnet.dense(5), fnet.tanh, fnet.dropout(0.5),
    fnet.chain(fnet.dense(5), fnet.dropout(0.4), fnet.relu),
    fnet.residual(fnet.chain(fnet.dense(5), fnet.dropout(0.3), fnet.gelu)), fnet.dense(2))
# A repeat of 4 copies inside a chain (sqrt: 2 segments of 2), its dropout after an
# output-form activation (so the forward scan keeps the dropout's input).
REPEATS = fnet.chain(
    fnet.dense(4), fnet.repeat(fnet.chain(fnet.dense(4), fnet.tanh, fnet.dropout(0.3)), 4),
    fnet.dense(2))
# A repeat of 6 copies as the whole network (sqrt: 3 segments of 2). Each copy holds a
# residual with a dropout, and a nested chain (the repeat's plan flattens it, so its keys
# must be split as the nested chain splits them) ending in a dropout, before an
# output-form activation (whose step the backward scan defers to the next copy).
WHOLE = fnet.repeat(fnet.chain(
    fnet.residual(fnet.chain(fnet.dense(3), fnet.dropout(0.5))),
    fnet.chain(fnet.dense(3), fnet.dropout(0.3)), fnet.tanh), 6)
# name: (net, key, policies also checked eagerly: eager repeats are compiled scan by scan,
# call by call, so only one repeat net is, under sqrt, whose segments carry their keys). The whole repeat takes a raw uint32 key
# (jax.random.PRNGKey), which the chain and the repeat split as they split a typed one.
NETS = {"nested": (NESTED, KEY, POLICIES),
        "repeat of 4": (REPEATS, KEY, ("sqrt",)),
        "whole repeat of 6, raw key": (WHOLE, jax.random.PRNGKey(5), ())}


@functools.partial(jax.jit, static_argnums=0)
def _every_policy(net, params, x, y, key):
    """One compilation: the reference (jax.value_and_grad of net.apply with the key, in
    params and x), funcnet's backprop under every policy, and the gradient without a key."""
    reference = jax.value_and_grad(lambda p, x_: LOSS(net.apply(p, x_, key=key), y),
                                   argnums=(0, 1))(params, x)
    ours = {}
    for policy in POLICIES:
        record = fnet.backprop(net, LOSS, params, x, y, remat=policy, key=key)
        ours[policy] = (record.value, (record.grads, record.cotangents[0]))
    no_dropout = jax.grad(lambda p: LOSS(net.apply(p, x), y))(params)
    return reference, ours, no_dropout


@pytest.mark.parametrize("name", list(NETS))
def test_every_policy_is_the_gradient_with_the_same_masks(name):
    """p_i and q_1 (backprop) under keep, sqrt and recompute, jitted, and value_and_grad
    (and on NESTED backprop and grad) eagerly where listed, equal those of
    loss(net.apply(params, x, key=k), y): the recomputing policies redraw the masks the
    forward pass drew. The masks matter: without the key the gradient differs."""
    net, key, eager_policies = NETS[name]
    params, x, y = _data(net, 3, 4)
    reference, ours, no_dropout = _every_policy(net, params, x, y, key)
    value, (grads, q1) = reference
    for policy in POLICIES:
        assert_close(ours[policy], reference, f"value, grads and q_1 of {name}, {policy}, jit")
    for policy in eager_policies:
        what = f"{name}, {policy}, eager"
        got = fnet.value_and_grad(net, LOSS, remat=policy)(params, x, y, key=key)
        assert_close(got, (value, grads), f"value_and_grad, {what}")
        if net is NESTED:  # (compiled per layer: further eager calls are cheap)
            record = fnet.backprop(net, LOSS, params, x, y, remat=policy, key=key)
            assert_close(record.cotangents[0], q1, f"backprop q_1, {what}")
            assert_close(fnet.grad(net, LOSS, remat=policy)(params, x, y, key=key), grads,
                         f"grad, {what}")
    assert _max_diff(no_dropout, grads) > 1e-3


SMALL = fnet.chain(fnet.dropout(0.5), fnet.dense(3),
                   fnet.residual(fnet.chain(fnet.dense(3), fnet.dropout(0.3))))
JVP_NET = fnet.chain(
    fnet.dropout(0.25), fnet.chain(fnet.dense(4), fnet.dropout(0.5)),
    fnet.residual(fnet.chain(fnet.dense(4), fnet.dropout(0.3))),
    fnet.repeat(fnet.chain(fnet.dense(4), fnet.dropout(0.3), fnet.tanh), 3), fnet.dense(2))


def _jvp_vjp_reference(net, params, x, params_dot, x_dot, ct, key):
    def apply(p, x_):
        return net.apply(p, x_, key=key)

    out, pullback = jax.vjp(apply, params, x)
    return jax.jvp(apply, (params, x), (params_dot, x_dot)), out, pullback(ct)


def _tangents(params, x, y):
    rng = np.random.default_rng(9)
    params_dot = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape)), params)
    return (params_dot, jnp.asarray(rng.standard_normal(x.shape)),
            jnp.asarray(rng.standard_normal(y.shape)))


def test_jvp_and_vjp_with_a_key_equal_jax_transforms_of_apply():
    """Jitted on a net with dropout at the top level, in a nested chain, a residual and a
    repeat; eagerly (compiled layer by layer, the key passed in) on a small net."""
    net = JVP_NET
    params, x, y = _data(net, 3, 4)
    params_dot, x_dot, ct = _tangents(params, x, y)

    @jax.jit
    def jitted(params, x, params_dot, x_dot, ct, key):
        out, pullback = fnet.vjp(net, params, x, key=key)
        return fnet.jvp(net, params, x, params_dot, x_dot, key=key), out, pullback(ct)

    expected = jax.jit(_jvp_vjp_reference, static_argnums=0)(net, params, x, params_dot, x_dot,
                                                             ct, KEY)
    got = jitted(params, x, params_dot, x_dot, ct, KEY)
    for what, a, e in zip(("jvp", "vjp out", "vjp pullback"), got, expected):
        assert_close(a, e, f"{what}, jit")
    net = SMALL
    params, x, y = _data(net, 3, 4)
    params_dot, x_dot, ct = _tangents(params, x, y)
    expected = jax.jit(_jvp_vjp_reference, static_argnums=0)(net, params, x, params_dot, x_dot,
                                                             ct, KEY)
    out, pullback = fnet.vjp(net, params, x, key=KEY)
    got = fnet.jvp(net, params, x, params_dot, x_dot, key=KEY), out, pullback(ct)
    for what, a, e in zip(("jvp", "vjp out", "vjp pullback"), got, expected):
        assert_close(a, e, f"{what}, eager")


# ---------------------------------------------------------------------------------------
# 4. Extensions and per-example quantities with a key: the batch's masks.

EXT_NET = fnet.chain(
    fnet.dropout(0.2), fnet.dense(3), fnet.tanh,
    fnet.residual(fnet.chain(fnet.dense(3), fnet.dropout(0.3))),
    fnet.repeat(fnet.chain(fnet.dense(3), fnet.tanh, fnet.dropout(0.3)), 4), fnet.dense(2))
EXTENSIONS = (fnet.extensions.batch_grad(), fnet.extensions.batch_l2(),
              fnet.extensions.second_moment(), fnet.extensions.variance())


def _per_example_reference(net, params, x, y, key):
    """g_b = grad of l_b(w) = 0.5 ||net.apply(w, x, key=key)[b] - y[b]||^2: row b of the
    WHOLE batch's forward pass, so every example keeps the mask the batch drew for it."""
    def own_loss(p, b):
        return 0.5 * jnp.sum(jnp.square(net.apply(p, x, key=key)[b] - y[b]))

    return jax.vmap(jax.grad(own_loss), in_axes=(None, 0))(params, jnp.arange(x.shape[0]))


@functools.partial(jax.jit, static_argnums=0)
def _extension_reference(net, params, x, y, key):
    """g_b, ||g_b||^2 per leaf, ||g_b||, and the batch loss."""
    g = _per_example_reference(net, params, x, y, key)
    sq = jax.tree.map(lambda a: jnp.sum(jnp.square(a).reshape(a.shape[0], -1), axis=1), g)
    return g, sq, jnp.sqrt(sum(jax.tree.leaves(sq))), LOSS(net.apply(params, x, key=key), y)


@functools.partial(jax.jit, static_argnums=(0, 5))
def _extensions_with_a_key(net, params, x, y, key, max_norm):
    """The four extensions under every policy, and clipped_value_and_grad (keep: its
    clipped pullbacks draw the masks again, through the top-level residual and repeat)."""
    extensions = {policy: fnet.backprop(net, LOSS, params, x, y, extensions=EXTENSIONS,
                                        remat=policy, key=key).extensions
                  for policy in POLICIES}
    clipped = fnet.clipped_value_and_grad(net, LOSS, max_norm)(params, x, y, key=key)
    return extensions, clipped


def test_extensions_and_per_example_grads_keep_the_batch_masks():
    net = EXT_NET
    params, x, y = _data(net, 3, 5, seed=4)
    max_norm = 2.0
    g, sq, norms, value = _extension_reference(net, params, x, y, KEY)
    extensions, (got_value, got_clipped) = _extensions_with_a_key(net, params, x, y, KEY,
                                                                  max_norm)
    assert 0 < int(np.sum(np.asarray(norms) > max_norm)) < 5  # some clipped, some not
    expected = {"batch_grad": g, "batch_l2": sq,
                "second_moment": jax.tree.map(lambda a: jnp.mean(jnp.square(a), axis=0), g),
                "variance": jax.tree.map(lambda a: jnp.var(a, axis=0), g)}
    for policy in POLICIES:
        for name, reference in expected.items():
            assert_close(extensions[policy][name], reference, f"{name}, {policy}, jit")
    factors = jnp.minimum(1.0, max_norm / norms)
    clipped = jax.tree.map(lambda a: jnp.tensordot(factors, a, axes=1) / 5, g)
    assert_close(got_value, value, "clipped_value_and_grad value, jit")
    assert_close(got_clipped, clipped, "clipped_value_and_grad grads, jit")


def test_eager_per_example_quantities_with_a_key():
    """Without jit the walk runs compiled layer by layer, and clipped_value_and_grad pulls
    the reweighted cotangents back through each top-level layer again (here a residual
    holding a dropout), drawing its mask again from the same key."""
    net = SMALL
    params, x, y = _data(net, 3, 5, seed=6)
    g, sq, norms, value = _extension_reference(net, params, x, y, KEY)
    max_norm = float(np.median(np.asarray(norms)))
    factors = jnp.minimum(1.0, max_norm / norms)
    clipped = jax.tree.map(lambda a: jnp.tensordot(factors, a, axes=1) / 5, g)
    assert_close(fnet.per_example_grads(net, LOSS)(params, x, y, key=KEY), g,
                 "per_example_grads, eager")
    assert_close(fnet.per_example_grad_norms(net, LOSS)(params, x, y, key=KEY), norms,
                 "per_example_grad_norms, eager")
    assert_close(fnet.clipped_value_and_grad(net, LOSS, max_norm)(params, x, y, key=KEY),
                 (value, clipped), "clipped_value_and_grad, eager")


# ---------------------------------------------------------------------------------------
# 5. Refusals, and the evaluation paths that need no key.

# The dropout inside a residual inside a chain, and inside a repeat.
IN_RESIDUAL = fnet.chain(fnet.dense(4),
                         fnet.residual(fnet.chain(fnet.dense(4), fnet.dropout(0.5))),
                         fnet.dense(1))
IN_RESIDUAL_PATH = ((1, "residual(chain)"), (0, "chain"), (1, "dropout(0.5)"))
IN_REPEAT = fnet.chain(fnet.dense(4), fnet.tanh,
                       fnet.repeat(fnet.chain(fnet.dense(4), fnet.relu, fnet.dropout(0.2)), 3))
IN_REPEAT_PATH = ((2, "repeat(chain, 3)"), (0, "chain"), (2, "dropout(0.2)"))


def _training_calls(net, params, x, y):
    optimizer = optax.sgd(0.1)
    state = fnet.init_train_state(params, optimizer)
    return {
        "value_and_grad": lambda: fnet.value_and_grad(net, LOSS)(params, x, y),
        "value_and_grad jitted": lambda: jax.jit(fnet.value_and_grad(net, LOSS))(params, x, y),
        "value_and_grad sqrt": lambda: fnet.value_and_grad(net, LOSS, remat="sqrt")(params, x, y),
        "grad": lambda: fnet.grad(net, LOSS, remat="recompute")(params, x, y),
        "backprop": lambda: fnet.backprop(net, LOSS, params, x, y),
        "backprop with extensions": lambda: fnet.backprop(
            net, LOSS, params, x, y, extensions=(fnet.extensions.batch_l2(),)),
        "per_example_grads": lambda: fnet.per_example_grads(net, LOSS)(params, x, y),
        "per_example_grad_norms": lambda: fnet.per_example_grad_norms(net, LOSS)(params, x, y),
        "clipped_value_and_grad": lambda: fnet.clipped_value_and_grad(net, LOSS, 1.0)(
            params, x, y),
        "train_step": lambda: fnet.train_step(net, LOSS, optimizer)(state, x, y),
        "train_step key=None": lambda: fnet.train_step(net, LOSS, optimizer)(state, x, y, None),
    }


@pytest.mark.standard_promotion
@pytest.mark.parametrize("net, path", [(IN_RESIDUAL, IN_RESIDUAL_PATH),
                                       (IN_REPEAT, IN_REPEAT_PATH),
                                       (fnet.dropout(0.5), ())],
                         ids=["in a residual", "in a repeat", "the whole net"])
def test_training_without_a_key_names_the_dropout_before_any_work(net, path, monkeypatch):
    in_width = 4 if path == () else 3
    params, x, y = _data(net, in_width, 3)

    def forbidden(*args, **kwargs):
        raise AssertionError("the forward pass ran before the missing key was refused")

    monkeypatch.setattr(reverse_module, "record_layers", forbidden)
    for what, call in _training_calls(net, params, x, y).items():
        with pytest.raises(fnet.LayerError) as info:
            call()
        error = info.value
        assert error.path == path, f"{what}: {error.path}"
        layer_name = path[-1][1] if path else "dropout(0.5)"
        assert layer_name in error.problem and "key" in error.problem, f"{what}: {error}"
        assert "stochastic" in error.problem, what
        if path:
            assert str(error).startswith("layer "), what


@pytest.mark.standard_promotion
def test_train_step_refuses_before_compiling():
    optimizer = optax.sgd(0.1)
    params, x, y = _data(IN_RESIDUAL, 3, 3)
    step = fnet.train_step(IN_RESIDUAL, LOSS, optimizer)
    compiled = step_module._compiled_train_step(IN_RESIDUAL, LOSS, optimizer, None, "keep")
    with pytest.raises(fnet.LayerError) as info:
        step(fnet.init_train_state(params, optimizer), x, y)
    assert info.value.path == IN_RESIDUAL_PATH
    assert compiled._cache_size() == 0
    step(fnet.init_train_state(params, optimizer), x, y, KEY)  # with a key it runs
    assert compiled._cache_size() == 1


BAD_KEYS = {"an int": 0, "a float array": jnp.ones(3), "int32 pair": jnp.zeros((2,), jnp.int32),
            "two keys": jax.random.split(jax.random.key(0), 2), "a str": "key"}


@pytest.mark.standard_promotion
@pytest.mark.parametrize("bad", list(BAD_KEYS))
def test_a_key_that_is_not_a_prng_key_is_an_argument_error_naming_key(bad):
    key = BAD_KEYS[bad]
    optimizer = optax.sgd(0.1)
    for net in (IN_RESIDUAL, fnet.chain(fnet.dense(4), fnet.dense(1))):
        params, x, y = _data(net, 3, 3)
        state = fnet.init_train_state(params, optimizer)
        calls = {
            "value_and_grad": lambda: fnet.value_and_grad(net, LOSS)(params, x, y, key=key),
            "grad": lambda: fnet.grad(net, LOSS)(params, x, y, key=key),
            "backprop": lambda: fnet.backprop(net, LOSS, params, x, y, key=key),
            "per_example_grads": lambda: fnet.per_example_grads(net, LOSS)(params, x, y, key=key),
            "train_step": lambda: fnet.train_step(net, LOSS, optimizer)(state, x, y, key),
            "vjp": lambda: fnet.vjp(net, params, x, key=key),
            "jvp": lambda: fnet.jvp(net, params, x, None, x, key=key),
        }
        for what, call in calls.items():
            with pytest.raises(fnet.ArgumentError) as info:
                call()
            assert info.value.argument == "key", f"{what}: {info.value}"


@pytest.mark.standard_promotion
def test_evaluation_paths_need_no_key_and_see_no_dropout():
    """Without a key a dropout net is its rate-0 twin (the same params): apply, vjp,
    jvp, evaluate, accuracy and jacobian all run and agree with the twin's."""
    net = fnet.chain(fnet.dense(4), fnet.tanh, fnet.dropout(0.5),
                     fnet.residual(fnet.chain(fnet.dense(4), fnet.dropout(0.3))), fnet.dense(3))
    twin = fnet.chain(fnet.dense(4), fnet.tanh, fnet.dropout(0.0),
                      fnet.residual(fnet.chain(fnet.dense(4), fnet.dropout(0.0))), fnet.dense(3))
    params, x, _ = _data(net, 3, 6)
    labels = jnp.asarray(np.arange(6) % 3, jnp.int32)

    @jax.jit
    def reference(params, x):
        out, pullback = jax.vjp(twin.apply, params, x)
        return (out, pullback(jnp.ones_like(out)), jax.jvp(twin.apply, (params, x), (params, x)),
                CE(out, labels), fnet.accuracy(out, labels),
                jax.jacrev(lambda x0: twin.apply(params, x0[None])[0])(x[0]))

    (twin_out, twin_pullback, twin_jvp, twin_loss, twin_accuracy,
     twin_jacobian) = reference(params, x)
    np.testing.assert_array_equal(net.apply(params, x), twin.apply(params, x))
    out, pullback = fnet.vjp(net, params, x)
    assert_close(out, twin_out, "vjp out without a key")
    assert_close(pullback(jnp.ones_like(out)), twin_pullback, "vjp pullback without a key")
    assert_close(fnet.jvp(net, params, x, params, x), twin_jvp, "jvp without a key")
    metrics = fnet.evaluate(net, CE, params, x, labels)
    assert metrics["loss"] == pytest.approx(float(twin_loss), rel=1e-12)
    assert metrics["accuracy"] == float(twin_accuracy)
    assert_close(fnet.jacobian(net, params, x[0]), twin_jacobian, "jacobian without a key")


# ---------------------------------------------------------------------------------------
# 6. Training.

FIT_NET = fnet.chain(fnet.dense(8), fnet.tanh, fnet.dropout(0.3), fnet.dense(3))
FIT_TWIN = fnet.chain(fnet.dense(8), fnet.tanh, fnet.dropout(0.0), fnet.dense(3))
ADAM = optax.adam(1e-2)
_DROPOUT_STREAM = 0x64726F70  # the fold_in data of fit's dropout keys (fit's docstring)


def _fit_problem(n=24, width=4, classes=3):
    params, _ = FIT_NET.init(jax.random.key(0), (width,))
    x = jax.random.normal(jax.random.key(1), (n, width))
    y = jnp.argmax(x[:, :classes], axis=1).astype(jnp.int32)
    return params, x, y


@pytest.mark.standard_promotion
def test_fit_with_dropout_is_deterministic_in_its_key_and_applies_the_masks():
    params, x, y = _fit_problem()

    def run(net, seed, **kwargs):
        return fnet.fit(net, CE, ADAM, params, x, y, key=jax.random.key(seed), epochs=2,
                        batch_size=8, progress=False, **kwargs)

    a, b, c = run(FIT_NET, 0), run(FIT_NET, 0), run(FIT_NET, 1)
    np.testing.assert_array_equal(a.history.step_loss, b.history.step_loss)
    assert _max_diff(a.params, b.params) == 0.0
    assert not np.array_equal(a.history.step_loss, c.history.step_loss)
    twin = run(FIT_TWIN, 0)  # the same batches, no masks
    assert _max_diff(a.params, twin.params) > 1e-4
    assert not np.array_equal(a.history.step_loss, twin.history.step_loss)
    # steps_per_call > 1 (a scan) takes the same steps with the same masks
    scanned = run(FIT_NET, 0, steps_per_call=2)  # calls of 2 steps, then 1
    np.testing.assert_allclose(scanned.history.step_loss, a.history.step_loss, rtol=1e-12)
    assert _max_diff(scanned.params, a.params) <= 1e-12


@pytest.mark.standard_promotion
def test_fit_draws_step_s_masks_from_the_documented_key():
    """fit's docstring: epoch e shuffles with fold_in(key, e), and global step s draws
    its masks from fold_in(fold_in(key, 0x64726F70), s). A manual loop with those keys
    and optax gives the same params."""
    params, x, y = _fit_problem(n=16)
    key, lr, batch_size = jax.random.key(4), 0.3, 8
    result = fnet.fit(FIT_NET, CE, optax.sgd(lr), params, x, y, key=key, epochs=2,
                      batch_size=batch_size, progress=False)
    root = jax.random.fold_in(key, _DROPOUT_STREAM)

    @jax.jit
    def manual_step(params, idx, step_key):
        value, grads = jax.value_and_grad(
            lambda p: CE(FIT_NET.apply(p, x[idx], key=step_key), y[idx]))(params)
        return jax.tree.map(lambda w, g: w - lr * g, params, grads), value

    reference, step, losses = params, 0, []
    for epoch in range(2):
        order = jax.random.permutation(jax.random.fold_in(key, epoch), 16)
        for t in range(2):
            idx = order[t * batch_size:(t + 1) * batch_size]
            reference, value = manual_step(reference, idx, jax.random.fold_in(root, step))
            losses.append(float(value))
            step += 1
    assert_close(result.params, reference, "fit vs manual steps with the documented keys")
    np.testing.assert_allclose(result.history.step_loss, losses, rtol=1e-10)


@pytest.mark.standard_promotion
def test_fit_with_dropout_resumes_from_its_checkpoint_bit_identically(tmp_path):
    params, x, y = _fit_problem()
    kwargs = dict(key=jax.random.key(5), batch_size=8, progress=False, epochs=4)
    whole = fnet.fit(FIT_NET, CE, ADAM, params, x, y, **kwargs)

    class Crash(Exception):
        pass

    def crash_after_epoch_1(epoch, state):
        if epoch == 1:
            raise Crash  # the checkpoint of epoch 1 is on disk already

    path = str(tmp_path / "dropout.npz")
    with pytest.raises(Crash):
        fnet.fit(FIT_NET, CE, ADAM, params, x, y, checkpoint_path=path,
                 on_epoch_end=crash_after_epoch_1, **kwargs)
    assert fnet.checkpoint.info(path)["step"] == 2 * 3
    resumed = fnet.fit(FIT_NET, CE, ADAM, params, x, y, checkpoint_path=path, **kwargs)
    assert [row["epoch"] for row in resumed.history.epochs] == [2, 3]
    assert int(resumed.state.step) == int(whole.state.step) == 12
    assert _max_diff(whole.params, resumed.params) == 0.0
    assert _max_diff(whole.state.opt_state, resumed.state.opt_state) == 0.0
    np.testing.assert_array_equal(whole.history.step_loss[6:], resumed.history.step_loss)
    # Continued from a state (first_epoch) instead of a checkpoint: global step s still
    # draws the masks of fold_in(..., s), so the two halves are the whole run.
    kwargs["epochs"] = 2
    first = fnet.fit(FIT_NET, CE, ADAM, params, x, y, **kwargs)
    second = fnet.fit(FIT_NET, CE, ADAM, None, x, y, state=first.state, first_epoch=2, **kwargs)
    assert _max_diff(whole.params, second.params) == 0.0
    np.testing.assert_array_equal(
        whole.history.step_loss,
        np.concatenate([first.history.step_loss, second.history.step_loss]))


@pytest.mark.standard_promotion
def test_train_step_with_a_key_equals_an_optax_step_with_the_reference_gradient():
    params, x, y = _fit_problem(n=6)
    optimizer = optax.adam(1e-2)
    step = fnet.train_step(FIT_NET, CE, optimizer)
    state = fnet.init_train_state(params, optimizer)
    opt_state, reference = optimizer.init(params), params
    reference_grad = jax.jit(jax.value_and_grad(
        lambda p, key: CE(FIT_NET.apply(p, x, key=key), y)))
    for k in range(2):
        key = jax.random.fold_in(KEY, k)
        state, value = step(state, x, y, key)
        ref_value, grads = reference_grad(reference, key)
        updates, opt_state = optimizer.update(grads, opt_state, reference)
        reference = optax.apply_updates(reference, updates)
        assert_close(value, ref_value, f"train_step loss, step {k}")
    assert_close(state.params, reference, "train_step params")
    assert int(state.step) == 2


def _ce_per_example_reference(net, params, x, y, key):
    def own_loss(p, b):
        return CE(net.apply(p, x, key=key)[b][None], y[b][None])

    return jax.vmap(jax.grad(own_loss), in_axes=(None, 0))(params, jnp.arange(x.shape[0]))


@pytest.mark.standard_promotion
def test_private_train_step_clips_gradients_of_the_batch_masks():
    """train_step with privacy: the noise from split(key)[0], the masks from split(key)[1]
    (its docstring); without noise the step is w - lr * sum_b c_b g_b / B with g_b the
    gradients of the examples' losses under the batch's masks."""
    params, x, y = _fit_problem(n=12)
    key, lr = jax.random.key(8), 0.3
    dropout_key = jax.random.split(key)[1]
    g = jax.jit(_ce_per_example_reference, static_argnums=0)(FIT_NET, params, x, y, dropout_key)
    norms = jnp.sqrt(sum(jnp.sum(a.reshape(12, -1) ** 2, axis=1) for a in jax.tree.leaves(g)))
    max_norm = float(np.median(np.asarray(norms)))  # about half the examples clipped
    assert 0 < int(jnp.sum(norms > max_norm)) < 12
    optimizer = optax.sgd(lr)
    step = fnet.train_step(FIT_NET, CE, optimizer, privacy=fnet.dp_sgd(max_norm, 0.0))
    state, value = step(fnet.init_train_state(params, optimizer), x, y, key)
    factors = jnp.minimum(1.0, max_norm / norms)
    expected = jax.tree.map(lambda w, a: w - lr * jnp.tensordot(factors, a, axes=1) / 12,
                            params, g)
    assert _max_diff(state.params, expected) <= 1e-12
    assert abs(float(value) - float(jax.jit(lambda p, k: CE(FIT_NET.apply(p, x, key=k), y))(
        params, dropout_key))) <= 1e-12


@pytest.mark.standard_promotion
def test_private_fit_with_dropout_runs_and_is_deterministic_in_its_key():
    params, x, y = _fit_problem()
    optimizer = optax.sgd(0.2)

    def run(net):
        return fnet.fit(net, CE, optimizer, params, x, y, key=jax.random.key(3), epochs=1,
                        batch_size=6, privacy=fnet.dp_sgd(1.0, 0.5), progress=False)

    a, b = run(FIT_NET), run(FIT_NET)
    assert a.history.step_loss.shape == (4,)
    assert np.all(np.isfinite(a.history.step_loss))
    np.testing.assert_array_equal(a.history.step_loss, b.history.step_loss)
    assert _max_diff(a.params, b.params) == 0.0
    assert a.history.epochs[-1]["epsilon"] > 0
    twin = run(FIT_TWIN)  # the same samples and noise, no masks
    assert _max_diff(a.params, twin.params) > 1e-6


MESH_SCRIPT = textwrap.dedent(
    """
    import json
    import jax, jax.numpy as jnp, numpy as np, optax
    import funcnet as fnet

    assert jax.device_count() == 8, jax.devices()
    net = fnet.chain(fnet.dense(16), fnet.tanh, fnet.dropout(0.3), fnet.dense(3))
    params, _ = net.init(jax.random.key(0), (6,))
    x = np.asarray(jax.random.normal(jax.random.key(1), (64, 6)), np.float32)
    y = np.asarray(jnp.argmax(x[:, :3], axis=1), np.int32)
    loss = fnet.losses.softmax_cross_entropy
    kwargs = dict(key=jax.random.key(2), epochs=1, batch_size=16, progress=False)
    single = fnet.fit(net, loss, optax.adam(1e-2), params, x, y, **kwargs)
    mesh = fnet.data_parallel_mesh()
    multi = fnet.fit(net, loss, optax.adam(1e-2), params, x, y, mesh=mesh, **kwargs)

    def rel(a, b):
        return max(float(np.max(np.abs(np.asarray(u) - np.asarray(v))
                                / (1e-6 + np.abs(np.asarray(v)))))
                   for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

    print(json.dumps({
        "single_loss": single.history.step_loss.tolist(),
        "multi_loss": multi.history.step_loss.tolist(),
        "max_param_rel_diff": rel(multi.params, single.params),
    }))
    """
)


def test_data_parallel_fit_with_dropout_matches_the_single_device_run():
    """8 host CPU devices (a subprocess: the device count is fixed when JAX starts), in
    float32: the mesh run draws the single-device run's masks (the losses agree to
    float32 reassociation; other masks would change them by far more)."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", MESH_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(result["single_loss"]) == 64 // 16
    assert result["multi_loss"] == pytest.approx(result["single_loss"], rel=1e-5, abs=1e-6)
    assert result["max_param_rel_diff"] < 1e-4


def test_check_grads_checks_a_dropout_net_on_one_draw_of_its_masks():
    """check_grads needs no key of its own for masks: it draws them from its ``key`` (the
    same draw on both sides), so a dropout net passes, with finite differences too, and a
    wrong gradient rule in the same net is still caught."""
    params, _ = random_params(SMALL, (4,), np.random.default_rng(3))
    x = jnp.asarray(np.random.default_rng(4).standard_normal((5, 4)))
    y = jnp.asarray(np.random.default_rng(5).standard_normal((5, 3)))
    report = fnet.check_grads(SMALL, LOSS, params, x, y, finite_differences=True)
    assert report.ok and len(report.layers) == len(SMALL.layers)

    @jax.custom_vjp
    def wrong_tanh(z):
        return jnp.tanh(z)

    wrong_tanh.defvjp(lambda z: (jnp.tanh(z), z), lambda z, q: (2 * q,))
    broken = fnet.chain(*SMALL.layers[:-1], fnet.layer(lambda w, z: wrong_tanh(z), name="bad"))
    with pytest.raises(fnet.GradientCheckError, match="bad"):
        fnet.check_grads(broken, LOSS, params[:-1] + ((),), x, y, finite_differences=True)
