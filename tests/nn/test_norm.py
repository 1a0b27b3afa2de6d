"""layer_norm: values against a plain per-row formula, derivatives and every extension
against JAX in float64 (inside chains, transformer-style residual blocks and repeats),
its fast rules against the generic ones, arguments, shapes, FLOPs and equality."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import Phase, example, given, settings
from hypothesis import strategies as st

import funcnet as fnet
from exactness import assert_close, random_params
from layer_checks import POLICIES, check_network
from rule_checks import assert_rules_used, check_rules

EPS = st.sampled_from([1e-5, 1e-3, 0.5])
FEATURES = st.integers(1, 5)
ROWS = st.lists(st.integers(1, 3), max_size=2).map(tuple)  # per-example axes before C
# Each example of the whole-network checks compiles several programs: a failure is
# reported as drawn rather than shrunk for minutes. Batches of at least 2 examples: with
# one, the variance is exactly 0 and its rounding (an FMA in m - p * p) has no scale.
NO_SHRINK = (Phase.explicit, Phase.reuse, Phase.generate)


def reference(z, scale, offset, eps):
    """DESIGN.md's formula, one row of the last axis at a time."""
    out = np.empty_like(z)
    for index in np.ndindex(z.shape[:-1]):
        row = z[index]
        mean = row.sum() / row.size
        var = ((row - mean) ** 2).sum() / row.size
        out[index] = (row - mean) / math.sqrt(var + eps) * scale + offset
    return out


@settings(max_examples=15)
@given(rows=ROWS, features=FEATURES, eps=EPS, batch=st.integers(1, 3), seed=st.integers(0, 99))
def test_values_match_the_formula(rows, features, eps, batch, seed):
    rng = np.random.default_rng(seed)
    layer = fnet.layer_norm(eps)
    params = {"scale": rng.standard_normal(features), "offset": rng.standard_normal(features)}
    z = 3.0 * rng.standard_normal((batch,) + rows + (features,)) + rng.standard_normal()
    out = jax.jit(layer.apply)(jax.tree.map(jnp.asarray, params), jnp.asarray(z))
    assert_close(out, reference(z, params["scale"], params["offset"], eps), "layer_norm")


def test_init_gives_ones_and_zeros_and_keeps_the_shape(key):
    params, out_shape = fnet.layer_norm().init(key, (3, 4))
    assert out_shape == (3, 4)
    assert set(params) == {"scale", "offset"}
    np.testing.assert_array_equal(params["scale"], np.ones(4))
    np.testing.assert_array_equal(params["offset"], np.zeros(4))


def test_constant_rows_give_the_offset():
    params = {"scale": jnp.full((3,), 2.0), "offset": jnp.array([1.0, -1.0, 0.5])}
    out = fnet.layer_norm().apply(params, jnp.full((2, 3), 7.0))
    np.testing.assert_array_equal(out, np.tile([1.0, -1.0, 0.5], (2, 1)))


# --- derivatives and extensions against JAX ---------------------------------------------

def norm_net(kind, width, eps):
    """layer_norm inside a chain, a residual MLP block or a repeat of blocks, on
    sequences of ``width`` features; a dense read-out of 2."""
    norm = fnet.layer_norm(eps)
    mlp = fnet.residual(fnet.chain(norm, fnet.dense(4 * width), fnet.gelu, fnet.dense(width)))
    body = {"chain": fnet.chain(fnet.dense(width), norm, fnet.tanh), "residual": mlp,
            "repeat": fnet.repeat(fnet.chain(mlp, norm), 2)}[kind]
    return fnet.chain(body, fnet.flatten, fnet.dense(2))


@settings(max_examples=2, phases=NO_SHRINK)
@given(kind=st.sampled_from(["chain", "residual", "repeat"]), steps=st.integers(1, 3),
       width=st.integers(1, 4), eps=EPS, batch=st.integers(2, 3), seed=st.integers(0, 99),
       policy=st.sampled_from(POLICIES), jit=st.booleans())
@example(kind="repeat", steps=3, width=4, eps=1e-5, batch=2, seed=0, policy="keep", jit=True)
def test_derivatives_and_extensions_equal_jax(kind, steps, width, eps, batch, seed, policy,
                                              jit):
    net = norm_net(kind, width, eps)
    rng = np.random.default_rng(seed)
    params, _ = random_params(net, (steps, width), rng)
    x = jnp.asarray(rng.standard_normal((batch, steps, width)))
    y = jnp.asarray(rng.standard_normal((batch, 2)))
    check_network(net, fnet.losses.squared_error, params, x, y, net.describe(), rng,
                  policies=(policy,), jit_modes=(jit,))


# --- fast rules ---------------------------------------------------------------------------

@settings(max_examples=6)
@given(rows=ROWS, features=FEATURES, eps=EPS, batch=st.integers(1, 3), seed=st.integers(0, 99))
def test_fast_rules_equal_the_generic_rule(rows, features, eps, batch, seed):
    rng = np.random.default_rng(seed)
    layer = fnet.layer_norm(eps)
    shape = (batch,) + rows + (features,)
    params = {"scale": jnp.asarray(rng.standard_normal(features)),
              "offset": jnp.asarray(rng.standard_normal(features))}
    z, q = (jnp.asarray(rng.standard_normal(shape)) for _ in range(2))
    check_rules(layer, params, z, q, layer.name)


def test_fast_rules_are_used(monkeypatch):
    net = fnet.chain(fnet.dense(4), fnet.layer_norm(), fnet.flatten, fnet.dense(2))
    rng = np.random.default_rng(2)
    params, _ = random_params(net, (3, 5), rng)
    x, y = jnp.asarray(rng.standard_normal((2, 3, 5))), jnp.asarray(rng.standard_normal((2, 2)))
    assert_rules_used(net, fnet.losses.squared_error, params, x, y, monkeypatch)


# --- arguments, shapes, FLOPs, equality ----------------------------------------------------

@pytest.mark.parametrize("eps, problem", [
    (0.0, "positive"), (-1e-5, "positive"), (float("nan"), "finite"), (float("inf"), "finite"),
    ("1e-5", "real number"), (True, "real number"), (None, "real number"),
])
def test_bad_eps_is_refused_naming_the_argument(eps, problem):
    with pytest.raises(fnet.ArgumentError, match=problem) as info:
        fnet.layer_norm(eps)
    assert info.value.argument == "layer_norm(eps)"


def test_a_shape_without_a_feature_axis_is_refused_naming_the_layer(key):
    net = fnet.chain(fnet.flatten, fnet.layer_norm())
    with pytest.raises(fnet.LayerError, match="last axis") as info:
        fnet.layer_norm().init(key, ())
    assert "()" in str(info.value) and "layer_norm" in str(info.value)
    with pytest.raises(fnet.LayerError) as info:
        net.init(key, (0,))
    assert info.value.path == ((1, "layer_norm"),)


def test_mismatched_params_are_refused_naming_the_layer(key):
    net = fnet.chain(fnet.dense(4), fnet.layer_norm())
    params, _ = net.init(key, (3,))
    wrong = (params[0], {"scale": jnp.ones(5), "offset": jnp.zeros(5)})
    with pytest.raises(fnet.LayerError, match=r"has shape \(5,\), expected \(4,\)") as info:
        fnet.value_and_grad(net, fnet.losses.squared_error)(wrong, jnp.ones((2, 3)),
                                                             jnp.ones((2, 4)))
    assert info.value.path == ((1, "layer_norm"),)


@pytest.mark.parametrize("in_shape, rows", [((7,), 1), ((3, 5), 3), ((2, 3, 4), 6)])
def test_flops_are_the_closed_form(in_shape, rows):
    flops = fnet.layer_norm().flops(in_shape)
    assert flops == rows * (7 * in_shape[-1] + 3) > 0


def test_equal_layers_are_equal_and_hash_alike():
    assert fnet.layer_norm() == fnet.layer_norm(1e-5) == fnet.nn.LayerNorm(np.float64(1e-5))
    assert hash(fnet.layer_norm()) == hash(fnet.nn.LayerNorm(np.float64(1e-5)))
    assert fnet.layer_norm(1) == fnet.layer_norm(1.0)
    assert fnet.layer_norm() != fnet.layer_norm(1e-3)
    assert {fnet.layer_norm(): 1}[fnet.layer_norm(1e-5)] == 1
    assert fnet.layer_norm().name == "layer_norm"
    assert fnet.layer_norm(0.01).name == "layer_norm(eps=0.01)"
    assert fnet.layer_norm().repeat_keeps == "input"
