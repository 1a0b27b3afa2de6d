"""The convolution layer: forward values against naive numpy loops of DESIGN.md's formula,
derivatives and every extension against JAX's (``check_network``: in chains, a residual
and a repeat), the fast per-example rules against the generic one, and shapes, FLOPs,
summaries, hashing and error messages.

Random configurations (hypothesis) cover 1 to 3 spatial axes, kernels, strides,
dilations, "SAME" / "VALID" / int / per-axis (lo, hi) padding, channels and bias on/off;
sizes stay tiny so the naive loops are cheap.
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
from funcnet.ad.extensions import _base as extensions_base
from funcnet.nn._dense import uses_gram
from funcnet.nn._layer import abstract_init
from exactness import assert_close, problem
from spatial import per_axis, same_pads
from layer_checks import EXTENSIONS, POLICIES, check_network

SE = fnet.losses.squared_error
MAX_EXTENT = {1: 7, 2: 5, 3: 4}  # spatial entries per axis, per spatial rank


# ---------------------------------------------------------------------------------------
# Random configurations and the naive reference.



class ConvCase(NamedTuple):
    layer: fnet.nn.Conv
    in_shape: Tuple[int, ...]
    kernel: Tuple[int, ...]
    stride: Tuple[int, ...]
    dilation: Tuple[int, ...]
    pads: Tuple[Tuple[int, int], ...]  # what DESIGN.md says the padding is, per axis
    batch: int

    def __repr__(self):
        return f"ConvCase({self.layer.name} on {self.in_shape}, batch {self.batch})"




@st.composite
def conv_cases(draw, min_stride=1, padding_kinds=("SAME", "VALID", "int", "pairs"),
               ranks=(1, 2, 3)):
    rank = draw(st.sampled_from(ranks))
    kernel_arg, kernel = per_axis(draw, st.integers(1, 3), rank)
    stride_arg, stride = per_axis(draw, st.integers(min_stride, min_stride + 1), rank)
    dilation_arg, dilation = per_axis(draw, st.integers(1, 2), rank)
    kind = draw(st.sampled_from(padding_kinds))
    if kind == "int":
        padding = draw(st.integers(0, 2))
        pads = ((padding, padding),) * rank
    elif kind == "pairs":  # symmetric or not
        padding = tuple((draw(st.integers(0, 2)), draw(st.integers(0, 2))) for _ in range(rank))
        pads = padding
    else:
        padding, pads = kind, ((0, 0),) * rank
    spatial = []
    for k, d, (lo, hi) in zip(kernel, dilation, pads):
        smallest = max(1, (k - 1) * d + 1 - lo - hi) if kind != "SAME" else 1
        spatial.append(draw(st.integers(smallest, max(smallest, MAX_EXTENT[rank]))))
    if kind == "SAME":
        pads = tuple(same_pads(*axis) for axis in zip(spatial, kernel, stride, dilation))
    channels, features = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    layer = fnet.conv(features, kernel_arg, stride_arg, padding, dilation_arg,
                      bias=draw(st.booleans()))
    return ConvCase(layer, tuple(spatial) + (channels,), kernel, stride, dilation, pads,
                    batch=draw(st.integers(2, 3)))  # variance needs two examples


def naive_conv(case: ConvCase, params, x):
    """out[o, f] = b[f] + sum_{k, c} x_pad[o * stride + k * dilation, c] * w[k, c, f], one
    output position and one kernel tap at a time."""
    x, w = np.asarray(x), np.asarray(params["w"])
    x_pad = np.pad(x, ((0, 0),) + case.pads + ((0, 0),))
    out_sizes = [(x_pad.shape[1 + a] - (k - 1) * d - 1) // s + 1
                 for a, (k, s, d) in enumerate(zip(case.kernel, case.stride, case.dilation))]
    out = np.zeros((x.shape[0], *out_sizes, w.shape[-1]))
    for o in itertools.product(*map(range, out_sizes)):
        for k in itertools.product(*map(range, case.kernel)):
            at = tuple(oi * s + ki * d for oi, ki, s, d in zip(o, k, case.stride, case.dilation))
            out[(slice(None),) + o] += x_pad[(slice(None),) + at] @ w[k]
    if "b" in params:
        out += np.asarray(params["b"])
    return out




# ---------------------------------------------------------------------------------------
# Forward values, shapes and FLOPs.

@settings(max_examples=20, deadline=None)
@given(case=conv_cases())
def test_forward_matches_naive_loops(case):
    layer = case.layer
    params, x, _ = problem(layer, case.in_shape, case.batch)
    expected = naive_conv(case, params, x)
    out_shape = layer.init(jax.random.key(0), case.in_shape)[1]
    assert (case.batch,) + out_shape == expected.shape
    assert_close(layer.apply(params, x), jnp.asarray(expected), f"{case!r} forward")
    # the documented params and the closed-form FLOPs
    channels, features = case.in_shape[-1], layer.features
    assert params["w"].shape == case.kernel + (channels, features)
    assert ("b" in params) == layer.bias
    positions = math.prod(out_shape[:-1])
    assert layer.flops(case.in_shape) == positions * (
        2 * math.prod(case.kernel) * channels * features + (features if layer.bias else 0)) > 0


@settings(max_examples=10, deadline=None)
@given(case=conv_cases(min_stride=2, padding_kinds=("SAME",)))
def test_same_padding_is_lax_same_for_strides_above_one(case):
    layer = case.layer
    params, x, _ = problem(layer, case.in_shape, case.batch)
    spec = {1: ("NWC", "WIO", "NWC"), 2: ("NHWC", "HWIO", "NHWC"),
            3: ("NDHWC", "DHWIO", "NDHWC")}[len(case.kernel)]
    expected = jax.lax.conv_general_dilated(x, params["w"], case.stride, "SAME",
                                            rhs_dilation=case.dilation, dimension_numbers=spec)
    if layer.bias:
        expected = expected + params["b"].reshape((1,) * (expected.ndim - 1) + (-1,))
    assert layer.init(jax.random.key(0), case.in_shape)[1] == expected.shape[1:]
    assert_close(layer.apply(params, x), expected, f"{case!r} vs lax's SAME")


def test_init_infers_shapes_without_data_and_draws_lecun_normal():
    net = fnet.chain(fnet.conv(8, 3, stride=2), fnet.relu, fnet.conv(4, (1, 2), bias=False))
    structs, out_shape = abstract_init(net, (9, 7, 3))  # jax.eval_shape of init: no FLOPs
    assert out_shape == (5, 4, 4)
    assert structs[0]["w"].shape == (3, 3, 3, 8) and structs[0]["b"].shape == (8,)
    assert set(structs[2]) == {"w"} and structs[2]["w"].shape == (1, 2, 8, 4)
    assert structs[0]["w"].dtype == jnp.result_type(float)
    params, _ = fnet.conv(64, (3, 3)).init(jax.random.key(1), (5, 5, 16))
    w, fan_in = np.asarray(params["w"]), 3 * 3 * 16
    assert abs(w.std() * math.sqrt(fan_in) - 1) < 0.05  # 9216 draws of N(0, 1/fan_in)
    np.testing.assert_array_equal(params["b"], np.zeros(64))


def test_summary_of_a_cnn():
    net = fnet.chain(fnet.conv(4, 3), fnet.relu, fnet.max_pool(2), fnet.conv(6, 3, stride=2),
                     fnet.avg_pool(2, padding="SAME"), fnet.flatten, fnet.dense(10))
    summary = fnet.summary(net, (8, 8, 1))
    rows = {row.name: row for row in summary.rows if row.depth == 1}
    conv_row = rows["conv(4, 3)"]
    assert (conv_row.in_shape, conv_row.out_shape) == ((8, 8, 1), (8, 8, 4))
    assert conv_row.params == 3 * 3 * 1 * 4 + 4
    assert conv_row.flops == 64 * (2 * 9 * 4 + 4)
    assert rows["conv(6, 3, stride 2)"].out_shape == (2, 2, 6)
    assert rows["avg_pool(2, padding SAME)"].out_shape == (1, 1, 6)
    assert summary.total_params == sum(row.params for row in rows.values())
    assert summary.total_flops == sum(row.flops for row in rows.values()) > 0
    assert "conv(6, 3, stride 2)" in str(summary)


def test_equal_layers_are_equal_and_hash_alike():
    same = [fnet.conv(4, 3), fnet.conv(np.int64(4), np.int32(3), stride=np.int8(1),
                                       padding="same", dilation=1, bias=np.bool_(True))]
    assert same[0] == same[1] and hash(same[0]) == hash(same[1])
    listed = fnet.conv(4, [3, 2], padding=[[1, 0], (0, 2)])
    assert listed == fnet.conv(4, (3, 2), padding=((1, 0), (0, 2)))
    assert hash(listed) == hash(fnet.conv(4, (3, 2), padding=((1, 0), (0, 2))))
    for other in (fnet.conv(5, 3), fnet.conv(4, 3, stride=2), fnet.conv(4, 3, padding="VALID"),
                  fnet.conv(4, 3, dilation=2), fnet.conv(4, 3, bias=False)):
        assert other != same[0]
    numpy_pads = fnet.conv(4, 3, padding=((np.int64(1), np.int8(0)),))  # shown as ints
    assert numpy_pads.name == "conv(4, 3, padding ((1, 0),))", numpy_pads.name
    assert isinstance(same[0], fnet.Layer) and isinstance(same[0], fnet.nn.Conv)
    assert repr(same[0]).startswith("<layer conv(4, 3): cross-correlation")


# ---------------------------------------------------------------------------------------
# Derivatives and extensions against JAX.

def _check(net, in_shape, what, batch=2, **kwargs):
    params, x, y = problem(net, in_shape, batch)
    check_network(net, SE, params, x, y, what, **kwargs)


@pytest.mark.parametrize("rank", [1, 2, 3])
@settings(max_examples=2, deadline=None)
@given(data=st.data(), policy=st.sampled_from(POLICIES), jit=st.booleans())
def test_derivatives_of_random_convs_in_a_chain(rank, data, policy, jit):
    """One drawn memory policy and mode per example (all of them run in the next test)."""
    case = data.draw(conv_cases(ranks=(rank,)), label="case")
    net = fnet.chain(case.layer, fnet.tanh, fnet.flatten, fnet.dense(2))
    _check(net, case.in_shape, repr(case), case.batch, policies=(policy,), jit_modes=(jit,))


def test_derivatives_in_a_chain_a_residual_and_a_repeat():
    """conv -> relu -> conv -> flatten -> dense, with a residual conv ("SAME", features ==
    C_in) and a repeat of convs in between; every policy, jitted and eager."""
    net = fnet.chain(fnet.conv(3, (2, 3), stride=(1, 2), padding=((1, 0), (2, 1)),
                               dilation=(2, 1)),
                     fnet.relu,
                     fnet.residual(fnet.conv(3, 3, padding="SAME", dilation=(1, 2))),
                     fnet.repeat(fnet.chain(fnet.conv(3, (3, 2), padding="SAME"), fnet.tanh), 2),
                     fnet.conv(2, 2, padding="VALID", bias=False), fnet.flatten, fnet.dense(3))
    _check(net, (6, 7, 2), "conv chain with a residual and a repeat", batch=3)


# ---------------------------------------------------------------------------------------
# The fast rules.

def _rule_inputs(case: ConvCase, seed=1):
    params, z, _ = problem(case.layer, case.in_shape, case.batch, seed)
    out_shape = case.layer.init(jax.random.key(0), case.in_shape)[1]
    q = jnp.asarray(np.random.default_rng(seed).standard_normal((case.batch,) + out_shape))
    return params, z, q


def _assert_rules_equal_generic(layer, params, z, q, what):
    def rules(params, z, q):  # one compile for all three (cheaper than op by op)
        generic = extensions_base.per_example_grads_generic(layer, params, z, q)
        return (generic, layer.rule("per_example_grads")(layer, params, z, q),
                layer.rule("per_example_sq_norms")(layer, params, z, q))

    generic, fast, sq_norms = jax.jit(rules)(params, z, q)
    assert_close(fast, generic, f"per_example_grads rule of {what}")
    norms = jax.tree.map(lambda a: jnp.sum(jnp.square(a).reshape(a.shape[0], -1), axis=1),
                         generic)
    assert_close(sq_norms, norms, f"per_example_sq_norms rule of {what}")


@settings(max_examples=10, deadline=None)
@given(case=conv_cases())
def test_fast_rules_equal_the_generic_rule(case):
    _assert_rules_equal_generic(case.layer, *_rule_inputs(case), repr(case))


@pytest.mark.parametrize("layer, in_shape, gram", [
    # one output position, fan_in 2*2*4 = 16, 8 features: 2 * 1 < 16 * 8
    (fnet.conv(8, 2, padding="VALID"), (2, 2, 4), True),
    (fnet.conv(6, (3, 3, 1), padding="VALID", bias=False), (3, 4, 2, 3), True),
    # 36 positions, fan_in 2, 1 feature: 2 * 36^2 > 2
    (fnet.conv(1, 1), (6, 6, 2), False),
    (fnet.conv(2, 3, stride=1, dilation=2, bias=False), (9, 1), False),
], ids=["gram-2d", "gram-3d", "formed-2d", "formed-1d"])
def test_sq_norms_gram_and_formed_branches(layer, in_shape, gram):
    geo = layer.geometry(in_shape)
    assert uses_gram(math.prod(geo.out), math.prod(geo.window) * in_shape[-1],
                     layer.features) == gram
    case = ConvCase(layer, in_shape, (), (), (), (), batch=3)
    _assert_rules_equal_generic(layer, *_rule_inputs(case), layer.name)


def test_the_fast_rules_are_used(monkeypatch):
    """With the generic per-example pullback refusing to run, every extension still runs on
    a net of convs (and parameterless layers), and batch_grad's batch mean is p_i."""

    def refuse(layer, params, z, q):
        raise AssertionError(f"the generic per-example rule ran for {layer.name}")

    monkeypatch.setattr(extensions_base, "per_example_grads_generic", refuse)
    fnet.clear_caches()  # no compiled per-layer rule from earlier tests
    net = fnet.chain(fnet.conv(3, (2, 3), stride=(2, 1)), fnet.softplus,
                     fnet.conv(2, 2, padding=((0, 1), (1, 0)), bias=False), fnet.flatten)
    params, x, y = problem(net, (5, 4, 2), batch=3)
    record = jax.jit(lambda p, x, y: fnet.backprop(net, SE, p, x, y, extensions=EXTENSIONS))(
        params, x, y)
    assert_close(jax.tree.map(lambda g: jnp.mean(g, axis=0), record.extensions["batch_grad"]),
                 record.grads, "the mean of batch_grad")
    assert set(record.extensions) == {extension.name for extension in EXTENSIONS}


# ---------------------------------------------------------------------------------------
# Errors.

@pytest.mark.parametrize("kwargs, argument, fragment", [
    (dict(features=0, kernel_size=3), "conv(features)", "at least 1"),
    (dict(features=2.0, kernel_size=3), "conv(features)", "must be an int"),
    (dict(features=2, kernel_size=0), "conv(kernel_size)", "must be positive, got 0"),
    (dict(features=2, kernel_size=(3, 3, 3, 3)), "conv(kernel_size)", "1 to 3 positive ints"),
    (dict(features=2, kernel_size=3.0), "conv(kernel_size)", "e.g. 3 or (3, 3)"),
    (dict(features=2, kernel_size=3, stride=(1, 0)), "conv(stride)", "positive ints"),
    (dict(features=2, kernel_size=3, dilation=-1), "conv(dilation)", "must be positive"),
    (dict(features=2, kernel_size=3, padding="FULL"), "conv(padding)", "'FULL'"),
    (dict(features=2, kernel_size=3, padding=-1), "conv(padding)", "must not be negative"),
    (dict(features=2, kernel_size=3, padding=(1, 2)), "conv(padding)", "(lo, hi) pair"),
    (dict(features=2, kernel_size=3, padding=((1, -1),)), "conv(padding)", "not be negative"),
    (dict(features=2, kernel_size=3, bias="yes"), "conv(bias)", "True or False"),
    (dict(features=2, kernel_size=(3, 3), stride=(1, 1, 1)), "conv(stride)",
     "has 3 entries but kernel_size has 2"),
    (dict(features=2, kernel_size=3, stride=(1, 2), padding=((0, 0),)), "conv(padding)",
     "has 1 entries but stride has 2"),
])
def test_bad_arguments_raise_argument_errors_naming_them(kwargs, argument, fragment):
    with pytest.raises(fnet.ArgumentError) as info:
        fnet.conv(**kwargs)
    assert info.value.argument == argument
    assert fragment in info.value.problem, info.value.problem


@pytest.mark.parametrize("layer, in_shape, fragments", [
    (fnet.conv(2, 3), (8,), ["conv(2, 3) needs per-example inputs (*spatial, channels)",
                             "got per-example shape (8,)", "x[..., None]"]),
    (fnet.conv(2, 3), (2, 2, 2, 2, 1), ["1 to 3 spatial axes"]),
    (fnet.conv(2, 3), (4, 0), ["at least one channel"]),
    (fnet.conv(2, (3, 3)), (8, 1), ["kernel_size (3, 3) has 2 entries, but the input has 1 "
                                    "spatial axes", "single value"]),
    (fnet.conv(2, 1, padding=((1, 1), (0, 0))), (4, 4, 4, 1),
     ["padding ((1, 1), (0, 0)) has 2 entries", "3 spatial axes"]),
    (fnet.conv(2, 5, padding="VALID"), (5, 3, 1),
     ["along spatial axis 1 the window spans 5 entries", "only 3 entries there",
      "padding=\"SAME\""]),
    (fnet.conv(2, 3, dilation=3, padding=1), (3, 1),
     ["the window spans 7 entries ((k - 1) * dilation + 1 with k = 3, dilation 3)",
      "5 with padding (1, 1)"]),
])
def test_shapes_that_do_not_fit_raise_layer_errors_at_init(layer, in_shape, fragments):
    with pytest.raises(fnet.LayerError) as info:
        layer.init(jax.random.key(0), in_shape)
    for fragment in fragments:
        assert fragment in info.value.problem, info.value.problem


def test_errors_inside_a_network_name_the_layer():
    net = fnet.chain(fnet.conv(4, 3), fnet.relu, fnet.conv(2, 5, padding="VALID"))
    with pytest.raises(fnet.LayerError) as info:
        fnet.summary(net, (4, 4, 1))
    assert info.value.path == ((2, "conv(2, 5, padding VALID)"),), str(info.value)
    params, _ = fnet.conv(4, 3).init(jax.random.key(0), (6, 6, 3))
    with pytest.raises(fnet.LayerError) as info:  # params for 3 channels, inputs with 2
        fnet.value_and_grad(fnet.chain(fnet.conv(4, 3), fnet.flatten), SE)(
            (params, ()), jnp.ones((2, 6, 6, 2)), jnp.ones((2, 144)))
    assert "conv(4, 3)" in str(info.value) and "(3, 3, 2, 4)" in str(info.value)
