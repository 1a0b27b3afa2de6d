"""Max and average pooling: forward values against naive numpy loops of DESIGN.md's
definitions (padding never chosen by the max, never counted by the mean), lax's "SAME",
derivatives and every extension against JAX's (``check_network``: in chains, a residual
and a repeat), and shapes, FLOPs, hashing and error messages.

Random configurations (hypothesis) cover 1 to 3 spatial axes, windows, strides (None:
the window), "SAME" / "VALID" / int / per-axis (lo, hi) padding, and channels.
"""

from __future__ import annotations

import itertools
import math
from typing import NamedTuple, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import funcnet as fnet
from exactness import assert_close, problem
from spatial import per_axis, same_pads
from layer_checks import POLICIES, check_network

SE = fnet.losses.squared_error
MAX_EXTENT = {1: 8, 2: 5, 3: 4}  # spatial entries per axis, per spatial rank
POOLS = {"max": fnet.max_pool, "avg": fnet.avg_pool}


# ---------------------------------------------------------------------------------------
# Random configurations and the naive reference.



class PoolCase(NamedTuple):
    layer: fnet.Layer
    kind: str  # "max" or "avg"
    in_shape: Tuple[int, ...]
    window: Tuple[int, ...]
    stride: Tuple[int, ...]
    pads: Tuple[Tuple[int, int], ...]  # what DESIGN.md says the padding is, per axis
    batch: int

    def __repr__(self):
        return f"PoolCase({self.layer.name} on {self.in_shape}, batch {self.batch})"




@st.composite
def pool_cases(draw, kinds=("max", "avg"), ranks=(1, 2, 3), min_stride=1,
               padding_kinds=("SAME", "VALID", "int", "pairs")):
    """Padding of at most window - 1 per side (wider would leave windows of padding only,
    which init refuses)."""
    kind, rank = draw(st.sampled_from(kinds)), draw(st.sampled_from(ranks))
    window_arg, window = per_axis(draw, st.integers(1, 3), rank)
    if min_stride == 1 and draw(st.booleans()):
        stride_arg, stride = None, window
    else:
        stride_arg, stride = per_axis(draw, st.integers(min_stride, 3), rank)
    padding_kind = draw(st.sampled_from(padding_kinds))
    if padding_kind == "int":
        padding = draw(st.integers(0, min(window) - 1))
        pads = ((padding, padding),) * rank
    elif padding_kind == "pairs":  # symmetric or not
        padding = tuple((draw(st.integers(0, k - 1)), draw(st.integers(0, k - 1)))
                        for k in window)
        pads = padding
    else:
        padding, pads = padding_kind, ((0, 0),) * rank
    spatial = []
    for k, (lo, hi) in zip(window, pads):
        smallest = max(1, k - lo - hi) if padding_kind != "SAME" else 1
        spatial.append(draw(st.integers(smallest, max(smallest, MAX_EXTENT[rank]))))
    if padding_kind == "SAME":
        pads = tuple(same_pads(*axis) for axis in zip(spatial, window, stride))
    layer = POOLS[kind](window_arg, stride_arg, padding)
    in_shape = tuple(spatial) + (draw(st.integers(1, 3)),)
    return PoolCase(layer, kind, in_shape, window, stride, pads, draw(st.integers(2, 3)))


def naive_pool(case: PoolCase, x):
    """The max, or the mean, of the window entries INSIDE the input, one output position
    at a time (the padding is skipped: never the max, never counted by the mean)."""
    x = np.asarray(x)
    spatial = x.shape[1:-1]
    out_sizes = [(n + lo + hi - k) // s + 1
                 for n, k, s, (lo, hi) in zip(spatial, case.window, case.stride, case.pads)]
    out = np.zeros((x.shape[0], *out_sizes, x.shape[-1]))
    for o in itertools.product(*map(range, out_sizes)):
        entries = []
        for k in itertools.product(*map(range, case.window)):
            at = tuple(oi * s + ki - lo
                       for oi, ki, s, (lo, _) in zip(o, k, case.stride, case.pads))
            if all(0 <= a < n for a, n in zip(at, spatial)):
                entries.append(x[(slice(None),) + at])
        entries = np.stack(entries)
        out[(slice(None),) + o] = entries.max(0) if case.kind == "max" else entries.mean(0)
    return out




# ---------------------------------------------------------------------------------------
# Forward values, shapes and FLOPs.

@settings(max_examples=20, deadline=None)
@given(case=pool_cases())
def test_forward_matches_naive_loops(case):
    layer = case.layer
    x = jnp.asarray(np.random.default_rng(0).standard_normal((case.batch,) + case.in_shape))
    expected = naive_pool(case, x)
    params, out_shape = layer.init(jax.random.key(0), case.in_shape)
    assert params == () and (case.batch,) + out_shape == expected.shape
    assert_close(layer.apply(params, x), jnp.asarray(expected), f"{case!r} forward")
    entries, window = math.prod(out_shape), math.prod(case.window)
    expected_flops = entries * (window - 1 if case.kind == "max" else window)
    assert layer.flops(case.in_shape) == expected_flops >= 0


@settings(max_examples=10, deadline=None)
@given(case=pool_cases(min_stride=2, padding_kinds=("SAME",)))
def test_same_padding_is_lax_same_for_strides_above_one(case):
    """The output shape is lax's; so are the values of max_pool (-inf padding)."""
    layer = case.layer
    x = jnp.asarray(np.random.default_rng(1).standard_normal((case.batch,) + case.in_shape))
    dims, strides = (1,) + case.window + (1,), (1,) + case.stride + (1,)
    lax_max = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, dims, strides, "SAME")
    assert layer.init(jax.random.key(0), case.in_shape)[1] == lax_max.shape[1:]
    if case.kind == "max":
        assert_close(layer.apply((), x), lax_max, f"{case!r} vs lax's SAME")


def test_avg_pool_divides_by_the_entries_inside_the_input():
    x = jnp.asarray([[1.0, 2.0, 3.0]])[..., None]  # one example, 3 entries, 1 channel
    out = fnet.avg_pool(2, stride=1, padding=1).apply((), x)
    np.testing.assert_array_equal(out[0, :, 0], [1.0, 1.5, 2.5, 3.0])
    # a constant input stays constant whatever the padding
    ones = jnp.ones((2, 5, 4, 3))
    for layer in (fnet.avg_pool(3, stride=2, padding="SAME"),
                  fnet.avg_pool((3, 2), padding=((2, 0), (1, 1)))):
        np.testing.assert_array_equal(layer.apply((), ones),
                                      jnp.ones((2,) + layer.init(jax.random.key(0),
                                                                 (5, 4, 3))[1]))


def test_max_pool_never_picks_the_padding():
    x = -jnp.asarray([[1.0, 2.0, 3.0]])[..., None]  # all negative: a zero pad would win
    out = fnet.max_pool(2, stride=1, padding=1).apply((), x)
    np.testing.assert_array_equal(out[0, :, 0], [-1.0, -1.0, -2.0, -3.0])
    negative = jnp.asarray(-1.0 - np.random.default_rng(0).random((2, 5, 4, 3)))
    out = fnet.max_pool(3, stride=2, padding="SAME").apply((), negative)
    assert bool(jnp.all(jnp.isfinite(out))) and bool(jnp.all(out <= -1.0))


def test_equal_layers_are_equal_and_hash_alike():
    for kind, make in POOLS.items():
        same = [make(2), make(2, 2), make(np.int64(2), None, "valid")]
        assert all(layer == same[0] and hash(layer) == hash(same[0]) for layer in same)
        assert make([2, 3], padding=[[1, 0], [0, 2]]) == make((2, 3), (2, 3), ((1, 0), (0, 2)))
        assert hash(make([2, 3])) == hash(make((2, 3)))
        for other in (make(3), make(2, 1), make(2, padding="SAME"), make((2, 2))):
            assert other != same[0]
        assert same[0].name == f"{kind}_pool(2)"
        assert make(3, 1, "SAME").name == f"{kind}_pool(3, stride 1, padding SAME)"
    assert fnet.max_pool(2) != fnet.avg_pool(2)
    assert isinstance(fnet.max_pool(2), fnet.nn.MaxPool)
    assert isinstance(fnet.avg_pool(2), fnet.nn.AvgPool)
    assert repr(fnet.avg_pool(2)).startswith("<layer avg_pool(2): the mean over windows")


# ---------------------------------------------------------------------------------------
# Derivatives and extensions against JAX.

def _check(net, in_shape, what, batch=2, **kwargs):
    params, x, y = problem(net, in_shape, batch)
    check_network(net, SE, params, x, y, what, **kwargs)


@pytest.mark.parametrize("rank", [1, 2, 3])
@settings(max_examples=2, deadline=None)
@given(data=st.data(), policy=st.sampled_from(POLICIES), jit=st.booleans())
def test_derivatives_of_random_pools_in_a_chain(rank, data, policy, jit):
    """pool -> tanh -> flatten -> dense (q_1 crosses the pool), one drawn memory policy and
    mode per example (all of them run in the next test)."""
    case = data.draw(pool_cases(ranks=(rank,)), label="case")
    net = fnet.chain(case.layer, fnet.tanh, fnet.flatten, fnet.dense(2))
    _check(net, case.in_shape, repr(case), case.batch, policies=(policy,), jit_modes=(jit,))


def test_derivatives_in_a_chain_a_residual_and_a_repeat():
    """Both pools with padding after a conv and relu (ties at 0 for the max), a residual
    avg_pool and a repeated max_pool; every policy, jitted and eager."""
    net = fnet.chain(fnet.conv(3, 2), fnet.relu, fnet.max_pool(2, stride=1, padding=1),
                     fnet.residual(fnet.avg_pool(3, stride=1, padding="SAME")),
                     fnet.repeat(fnet.chain(fnet.max_pool((3, 2), 1, "SAME"), fnet.tanh), 2),
                     fnet.avg_pool((2, 3), stride=(2, 1), padding=((1, 0), (0, 2))),
                     fnet.flatten, fnet.dense(2))
    _check(net, (5, 4, 2), "pools in a chain, a residual and a repeat", batch=3)


# ---------------------------------------------------------------------------------------
# Errors.

@pytest.mark.parametrize("kind", sorted(POOLS))
@pytest.mark.parametrize("args, kwargs, argument, fragment", [
    ((0,), {}, "window", "must be positive, got 0"),
    ((2.0,), {}, "window", "e.g. 3 or (3, 3)"),
    ((2,), dict(stride=(1, 0)), "stride", "positive ints"),
    ((2,), dict(padding="FULL"), "padding", "'FULL'"),
    ((2,), dict(padding=-1), "padding", "must not be negative"),
    (((2, 2),), dict(stride=(1, 1, 1)), "stride", "has 3 entries but window has 2"),
])
def test_bad_arguments_raise_argument_errors_naming_them(kind, args, kwargs, argument,
                                                          fragment):
    with pytest.raises(fnet.ArgumentError) as info:
        POOLS[kind](*args, **kwargs)
    assert info.value.argument == f"{kind}_pool({argument})"
    assert fragment in info.value.problem, info.value.problem


@pytest.mark.parametrize("kind", sorted(POOLS))
@pytest.mark.parametrize("args, in_shape, fragments", [
    ((2,), (8,), ["_pool(2) needs per-example inputs (*spatial, channels)", "x[..., None]"]),
    (((2, 2),), (8, 1), ["window (2, 2) has 2 entries, but the input has 1 spatial axes"]),
    ((5,), (4, 4, 1), ["along spatial axis 0 the window spans 5 entries",
                       "only 4 entries there"]),
    ((2, 1, ((0, 0), (2, 0))), (4, 4, 1),
     ["padding (2, 0) along spatial axis 1 leaves windows of 2 entries over padding only",
      "Pad at most window - 1 = 1 on each side"]),
    ((2, 1, ((0, 2),)), (3, 1), ["padding (0, 2) along spatial axis 0 leaves windows"]),
])
def test_shapes_that_do_not_fit_raise_layer_errors_at_init(kind, args, in_shape, fragments):
    with pytest.raises(fnet.LayerError) as info:
        POOLS[kind](*args).init(jax.random.key(0), in_shape)
    for fragment in fragments:
        assert fragment in info.value.problem, info.value.problem
