"""reshape: values against numpy's per-example reshape for random targets (one -1
inferred), derivatives and every extension against JAX in float64 through a chain,
size mismatches at init naming the layer, arguments, FLOPs and equality."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import funcnet as fnet
from exactness import assert_close, random_params
from layer_checks import check_network

SHAPES = st.lists(st.integers(1, 4), min_size=1, max_size=3).map(tuple)


@st.composite
def reshapes(draw):
    """(per-example in_shape, a target of the same size with maybe one -1, the resolved
    target)."""
    in_shape = draw(SHAPES)
    factors = [p for d in in_shape for p in _prime_factors(d)]
    factors = draw(st.permutations(factors))
    cuts = sorted(draw(st.lists(st.integers(0, len(factors)), max_size=3)))
    bounds = [0] + cuts + [len(factors)]
    target = tuple(math.prod(factors[a:b]) for a, b in zip(bounds, bounds[1:]))
    target = target if target else (1,)
    inferred = draw(st.one_of(st.none(), st.integers(0, len(target) - 1)))
    given_shape = target if inferred is None else tuple(
        -1 if i == inferred else d for i, d in enumerate(target))
    return in_shape, given_shape, target


def _prime_factors(n):
    factors, p = [], 2
    while n > 1:
        while n % p == 0:
            factors.append(p)
            n //= p
        p += 1
    return factors


@settings(max_examples=20)
@given(case=reshapes(), batch=st.integers(1, 3), seed=st.integers(0, 99))
def test_values_and_shapes_are_numpys_per_example_reshape(case, batch, seed):
    in_shape, shape, target = case
    layer = fnet.reshape(shape)
    params, out_shape = layer.init(jax.random.key(0), in_shape)
    assert params == () and out_shape == target
    z = np.random.default_rng(seed).standard_normal((batch,) + in_shape)
    out = layer.apply(params, jnp.asarray(z))
    np.testing.assert_array_equal(out, z.reshape((batch,) + target))
    assert layer.flops(in_shape) == 0


@settings(max_examples=4)
@given(case=reshapes(), seed=st.integers(0, 99))
def test_input_cotangent_and_grads_equal_jax(case, seed):
    in_shape, shape, target = case
    net = fnet.chain(fnet.reshape(shape), fnet.dense(3), fnet.tanh, fnet.flatten,
                     fnet.dense(2))
    rng = np.random.default_rng(seed)
    params, _ = random_params(net, in_shape, rng)
    x, y = (jnp.asarray(rng.standard_normal(s)) for s in ((2,) + in_shape, (2, 2)))
    record = jax.jit(lambda p, x_: fnet.backprop(net, fnet.losses.squared_error, p, x_, y))(
        params, x)
    grads, q1 = jax.grad(lambda p, x_: fnet.losses.squared_error(net.apply(p, x_), y),
                         argnums=(0, 1))(params, x)
    assert_close(record.grads, grads, "grads")
    assert_close(record.cotangents[0], q1, "q_1")
    assert record.activations[1].shape == (2,) + target


def test_every_policy_extension_and_jvp_through_a_reshape():
    net = fnet.chain(fnet.dense(4), fnet.reshape((2, -1)), fnet.layer_norm(), fnet.tanh,
                     fnet.reshape((-1,)), fnet.dense(2))
    rng = np.random.default_rng(7)
    params, _ = random_params(net, (3,), rng)
    x, y = jnp.asarray(rng.standard_normal((3, 3))), jnp.asarray(rng.standard_normal((3, 2)))
    check_network(net, fnet.losses.squared_error, params, x, y, "reshape chain", rng)


@pytest.mark.parametrize("shape, in_shape, needs", [
    ((4, 2), (3, 3), "exactly 8"),
    ((-1, 4), (3, 3), "a multiple of 4"),
    ((5,), (6,), "exactly 5"),
])
def test_a_size_mismatch_is_refused_at_init_naming_the_layer(key, shape, in_shape, needs):
    net = fnet.chain(fnet.identity, fnet.reshape(shape))
    with pytest.raises(fnet.LayerError, match=needs) as info:
        net.init(key, in_shape)
    assert info.value.path == ((1, f"reshape({shape})"),)
    assert f"{in_shape} holds {math.prod(in_shape)}" in info.value.problem


@pytest.mark.parametrize("shape, problem", [
    ((-1, -1), "at most one -1"),
    ((0, 3), "positive sizes"),
    ((-2, 3), "positive sizes"),
    ((2.0, 3), "must be an int"),
    (6, r"pass \(6,\)"),
    ("2, 3", "shape tuple"),
    (None, "shape tuple"),
])
def test_bad_shapes_are_refused_naming_the_argument(shape, problem):
    with pytest.raises(fnet.ArgumentError, match=problem) as info:
        fnet.reshape(shape)
    assert info.value.argument.startswith("reshape(shape)")


def test_equal_layers_are_equal_and_hash_alike():
    layer = fnet.reshape((2, -1))
    assert layer == fnet.reshape([2, -1]) == fnet.reshape((np.int64(2), np.int32(-1)))
    assert hash(layer) == hash(fnet.nn.Reshape((2, -1)))
    assert all(type(d) is int for d in fnet.reshape((np.int64(2), -1)).shape)
    assert layer != fnet.reshape((-1, 2))
    assert layer.name == "reshape((2, -1))"
    assert fnet.reshape(()).init(jax.random.key(0), (1, 1))[1] == ()
