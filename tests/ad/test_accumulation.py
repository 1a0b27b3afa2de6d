"""Optimal Jacobian accumulation: ``fnet.jacobian(..., mode="optimal")`` and its plan.

The plan (``fnet.jacobian_plan``) cuts the chain into segments, takes each segment's
Jacobian in forward or reverse mode, and multiplies the blocks in the cheapest order, by a
dynamic program over the layer widths n_i and per-example forward FLOPs F(i, j):

    cost(i, j) = min(n_i F(i, j), n_j F(i, j), min_k cost(i, k) + cost(k, j) + 2 n_i n_k n_j)

Checked here: the optimal Jacobian equals ``jax.jacfwd`` (float64, relative error 1e-10)
for both ``wrt``, under jit and under ``jax.vmap``; the plan's shape on bottleneck,
widening and narrowing chains; that it never costs more than plain forward or reverse
mode; that its segments tile the chain; that the DP finds the brute-force minimum over
every segmentation, mode choice and multiplication order; ``forward_flops``; errors.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import funcnet as fnet
from funcnet.ad._accumulation import Product, Segment
from funcnet.nn._layer import abstract_init

# pytest runs with --import-mode=importlib, which puts no test directory on sys.path.
from exactness import assert_close, random_params  # noqa: E402
from strategies import Net, activations, layers  # noqa: E402

MAX_WIDTH = 40


# ---------------------------------------------------------------------------------------
# Helpers.

def dense_chain(widths, activation=fnet.tanh):
    """dense(widths[1]), activation, ..., dense(widths[-1]) on inputs of width widths[0]."""
    parts = []
    for width in widths[1:]:
        parts += [fnet.dense(width), activation]
    return fnet.chain(*parts[:-1])


def top_level_shapes(net, in_shape):
    layers_ = net.layers if isinstance(net, fnet.Chain) else (net,)
    shapes = [tuple(in_shape)]
    for layer in layers_:
        shapes.append(abstract_init(layer, shapes[-1])[1])
    return layers_, shapes


# ---------------------------------------------------------------------------------------
# Random chains: dense layers of widths 1..40 (bottlenecks included), activations,
# nested chains and residuals.

@st.composite
def widths(draw):
    """Often a bottleneck: narrow widths (1..3) among wide ones, else anything in 1..40."""
    return draw(st.one_of(st.integers(1, 3), st.integers(20, MAX_WIDTH),
                          st.integers(1, MAX_WIDTH)))


@st.composite
def accumulation_nets(draw, max_depth=7, max_width=MAX_WIDTH):
    """``(net, in_width, description)``: a chain of 1..max_depth top-level layers."""
    in_width = draw(widths())
    depth = draw(st.integers(1, max_depth))
    parts, width = [], in_width
    for _ in range(depth):
        kind = draw(st.sampled_from(["dense", "dense", "activation", "nested"]))
        if kind == "dense":
            out = draw(widths())
            part = Net(fnet.dense(out, bias=draw(st.booleans())), out, f"dense({out})")
        elif kind == "activation":
            layer = draw(activations())
            part = Net(layer, width, layer.name)
        else:  # a nested chain or a residual, from the shared strategies
            part = draw(layers(width, max_width=max_width, nesting=1))
        parts.append(part)
        width = part.out_width
    net = fnet.chain(*(p.layer for p in parts))
    return net, in_width, f"{'chain(' + ', '.join(p.description for p in parts) + ')'}"


@st.composite
def hourglass_nets(draw, max_width=MAX_WIDTH):
    """``(net, in_width, description)``: wide (15..40) -> narrow (1..3) -> wide, with
    activations, nested chains and residuals on the way: plans of several segments."""
    in_width = draw(st.integers(15, max_width))
    parts, width = [], in_width
    for target in (draw(st.integers(1, 3)), draw(st.integers(15, max_width))):
        for _ in range(draw(st.integers(0, 2))):  # some layers at the current width
            kind = draw(st.sampled_from(["dense", "activation", "nested"]))
            if kind == "dense":
                part = Net(fnet.dense(width), width, f"dense({width})")
            elif kind == "activation":
                layer = draw(activations())
                part = Net(layer, width, layer.name)
            else:
                part = draw(layers(width, max_width=max_width, nesting=1))
            parts.append(part)
            width = part.out_width
        parts.append(Net(fnet.dense(target, bias=draw(st.booleans())), target,
                         f"dense({target})"))
        width = target
    net = fnet.chain(*(p.layer for p in parts))
    return net, in_width, f"{'chain(' + ', '.join(p.description for p in parts) + ')'}"


@functools.partial(jax.jit, static_argnums=0)
def optimal_and_reference(net, params, xs):
    """Under jit: the optimal Jacobians of one example and of a batch (jax.vmap), and
    jax.jacfwd per example (vmapped)."""
    one = {wrt: fnet.jacobian(net, params, xs[0], wrt=wrt, mode="optimal")
           for wrt in ("input", "params")}
    batch = {wrt: jax.vmap(lambda x: fnet.jacobian(net, params, x, wrt=wrt, mode="optimal"))(xs)
             for wrt in ("input", "params")}
    reference = {"input": jax.vmap(jax.jacfwd(lambda x: net.apply(params, x[None])[0]))(xs)}
    if jax.tree.leaves(params):  # (jax.jacfwd needs at least one leaf)
        reference["params"] = jax.vmap(
            lambda x: jax.jacfwd(lambda p: net.apply(p, x[None])[0])(params))(xs)
    return one, batch, reference


def check_optimal_jacobians(net, params, xs, description):
    one, batch, reference = optimal_and_reference(net, params, xs)
    if "params" not in reference:  # a parameterless net: the jacobian is params itself, ()s
        assert jax.tree.structure(one["params"]) == jax.tree.structure(params)
        assert not jax.tree.leaves((one["params"], batch["params"]))
    for wrt in reference:
        first = jax.tree.map(lambda leaf: leaf[0], reference[wrt])
        assert_close(one[wrt], first, f"optimal {wrt} jacobian, jit ({description})")
        assert_close(batch[wrt], reference[wrt],
                     f"optimal {wrt} jacobian, vmap over the batch ({description})")


# ---------------------------------------------------------------------------------------
# The optimal Jacobian is the Jacobian.

@settings(max_examples=8)
@given(case=st.one_of(accumulation_nets(), hourglass_nets()), batch=st.integers(1, 3),
       seed=st.integers(0, 2**32 - 1))
def test_optimal_jacobian_equals_jacfwd(case, batch, seed):
    net, in_width, description = case
    rng = np.random.default_rng(seed)
    params, _ = random_params(net, (in_width,), rng)
    xs = jnp.asarray(rng.standard_normal((batch, in_width)))
    plan = fnet.jacobian_plan(net, (in_width,))
    check_optimal_jacobians(net, params, xs, f"{description}; plan {plan.order}")


def test_optimal_jacobian_of_a_bottleneck_chain_follows_a_multi_segment_plan():
    """The plan has several segments and a product here, so the blocks and their product
    (not one plain mode) are what is checked against jax.jacfwd."""
    net = fnet.chain(fnet.dense(30), fnet.tanh, fnet.dense(2), fnet.gelu,
                     fnet.residual(fnet.chain(fnet.dense(5), fnet.sigmoid, fnet.dense(2))),
                     fnet.dense(30), fnet.tanh, fnet.dense(40))
    plan = fnet.jacobian_plan(net, (36,))
    assert len(plan.segments) >= 2 and isinstance(plan.root, Product), str(plan)
    rng = np.random.default_rng(3)
    params, _ = random_params(net, (36,), rng)
    check_optimal_jacobians(net, params, jnp.asarray(rng.standard_normal((2, 36))),
                            "bottleneck chain 36 -> 30 -> 2 -> 30 -> 40")


def all_plan_trees(i, j):
    """Every plan tree of layers [i, j): segments (both modes) and products, all orders."""
    for mode in ("forward", "reverse"):
        yield Segment(i, j, mode, 0)
    for k in range(i + 1, j):
        for earlier in all_plan_trees(i, k):
            for later in all_plan_trees(k, j):
                yield Product(later, earlier, 0)


def test_any_plan_tree_evaluates_to_the_jacobian(monkeypatch):
    """The cost model rarely makes more than two segments optimal, so the evaluation of
    deeper trees (3 and 4 segments, every bracketing, mixed modes) is checked by handing
    ``jacobian(mode="optimal")`` such plans in place of the planner's own."""
    import funcnet.ad._accumulation as accumulation

    net = fnet.chain(fnet.dense(3), fnet.tanh,
                     fnet.residual(fnet.chain(fnet.dense(3), fnet.gelu)), fnet.dense(5))
    real = fnet.jacobian_plan(net, (4,))
    trees = [tree for tree in all_plan_trees(0, 4)
             if len(dataclasses.replace(real, root=tree).segments) >= 3]
    assert len(trees) == 6 * 2**3 + 5 * 2**4  # 3 segments: 3 cuts x 2 orders; 4: 5 orders
    trees = trees[::7]
    modes = {tuple(s.mode for s in dataclasses.replace(real, root=t).segments) for t in trees}
    assert len(modes) >= 8  # a mix of forward and reverse blocks
    rng = np.random.default_rng(11)
    params, _ = random_params(net, (4,), rng)
    x = jnp.asarray(rng.standard_normal((4,)))

    used = []

    def fake_planner(fake):
        def plan(*args):
            used.append(fake.root)
            return fake
        return plan

    @jax.jit
    def every_tree(params, x):
        jacobians = []
        for tree in trees:
            monkeypatch.setattr(accumulation, "plan",
                                fake_planner(dataclasses.replace(real, root=tree)))
            jacobians.append(fnet.jacobian(net, params, x, mode="optimal"))
        return jacobians

    results = every_tree(params, x)
    assert used == trees  # the optimal path followed each handed-in plan
    reference = jax.jacfwd(lambda xx: net.apply(params, xx[None])[0])(x)
    for tree, jacobian in zip(trees, results):
        assert_close(jacobian, reference, f"plan {tree.describe()}")


# ---------------------------------------------------------------------------------------
# The plan's shape.

def test_bottleneck_plan_is_reverse_before_the_bottleneck_forward_after_it():
    net = dense_chain((100, 50, 10, 2, 50, 100))
    plan = fnet.jacobian_plan(net, (100,))
    assert plan.widths == (100, 50, 50, 10, 10, 2, 2, 50, 50, 100)
    segments = plan.segments
    assert len(segments) >= 2, str(plan)
    narrow = [i for i, width in enumerate(plan.widths) if width == 2]  # boundaries 5 and 6
    for segment in segments:
        if segment.stop <= narrow[-1] and segment.start < narrow[0]:
            assert segment.mode == "reverse", str(plan)
        if segment.start >= narrow[0] and segment.stop > narrow[-1]:
            assert segment.mode == "forward", str(plan)
    assert segments[0].mode == "reverse" and plan.widths[segments[0].stop] == 2, str(plan)
    assert segments[-1].mode == "forward" and plan.widths[segments[-1].start] == 2, str(plan)
    assert plan.predicted_flops < min(plan.forward_flops, plan.reverse_flops) / 5, str(plan)


def test_a_widening_chain_is_one_forward_segment_a_narrowing_one_one_reverse_segment():
    up = fnet.jacobian_plan(dense_chain((8, 16, 64)), (8,))
    assert len(up.segments) == 1 and up.segments[0].mode == "forward", str(up)
    assert (up.segments[0].start, up.segments[0].stop) == (0, 3)
    assert up.predicted_flops == up.forward_flops < up.reverse_flops
    down = fnet.jacobian_plan(dense_chain((64, 16, 8)), (64,))
    assert len(down.segments) == 1 and down.segments[0].mode == "reverse", str(down)
    assert (down.segments[0].start, down.segments[0].stop) == (0, 3)
    assert down.predicted_flops == down.reverse_flops < down.forward_flops


def test_params_plan_is_one_whole_chain_segment_in_the_cheaper_mode():
    few_params = fnet.chain(fnet.dense(1, bias=False), fnet.tanh, fnet.dense(64, bias=False))
    plan = fnet.jacobian_plan(few_params, (1,), wrt="params")  # 65 params, 64 outputs
    assert len(plan.segments) == 1 and plan.segments[0].mode == "forward", str(plan)
    many_params = dense_chain((64, 32, 2))
    plan = fnet.jacobian_plan(many_params, (64,), wrt="params")
    assert len(plan.segments) == 1 and plan.segments[0].mode == "reverse", str(plan)
    assert plan.predicted_flops == min(plan.forward_flops, plan.reverse_flops)


@settings(max_examples=60)
@given(case=accumulation_nets(max_depth=10), wrt=st.sampled_from(["input", "params"]))
def test_plan_never_costs_more_than_plain_modes_and_tiles_the_chain(case, wrt):
    net, in_width, description = case
    plan = fnet.jacobian_plan(net, (in_width,), wrt=wrt)
    layers_, shapes = top_level_shapes(net, (in_width,))
    assert plan.wrt == wrt
    assert plan.widths == tuple(math.prod(shape) for shape in shapes)
    assert plan.layer_flops == tuple(layer.flops(shape)
                                     for layer, shape in zip(layers_, shapes))
    assert plan.predicted_flops <= min(plan.forward_flops, plan.reverse_flops), str(plan)
    # the segments tile 0..L: contiguous, in order, nonempty
    segments = plan.segments
    assert segments[0].start == 0 and segments[-1].stop == len(layers_), str(plan)
    for before, after in zip(segments, segments[1:]):
        assert before.stop == after.start, str(plan)
    assert all(s.start < s.stop and s.mode in ("forward", "reverse") for s in segments)
    # str(plan) mentions every segment, its mode and the multiplication order
    text = str(plan)
    for segment in segments:
        assert segment.describe() in text and f"J[{segment.start}:{segment.stop}]" in text
        line = next(line for line in text.splitlines()
                    if line.strip().startswith(segment.describe()))
        assert segment.mode in line, (segment, text)
    assert f"order: {plan.order}" in text, text
    for segment in segments:
        assert segment.describe() in plan.order
    assert plan.order.count("@") == len(segments) - 1


def test_str_of_the_bottleneck_plan():
    plan = fnet.jacobian_plan(dense_chain((100, 50, 10, 2, 50, 100)), (100,))
    text = str(plan)
    assert "100 -> 50 -> 50 -> 10 -> 10 -> 2 -> 2 -> 50 -> 50 -> 100" in text, text
    assert "order: (J[5:9] @ J[0:5])" in text, text
    assert "J[0:5]" in text and "J[5:9]" in text
    assert "reverse" in text.splitlines()[1] and "forward" in text.splitlines()[2], text


# ---------------------------------------------------------------------------------------
# The DP against brute force.

def brute_force_costs(widths_, layer_flops, i, j):
    """The cost of every plan of layers [i, j): each way to split them into segments,
    each segment in forward or reverse mode, and each order of multiplying the blocks
    (all binary trees over the segments). Enumerated, not minimised on the way."""
    segment_flops = sum(layer_flops[i:j])
    costs = [widths_[i] * segment_flops, widths_[j] * segment_flops]  # forward, reverse
    for k in range(i + 1, j):
        multiply = 2 * widths_[j] * widths_[k] * widths_[i]
        for left in brute_force_costs(widths_, layer_flops, i, k):
            for right in brute_force_costs(widths_, layer_flops, k, j):
                costs.append(left + right + multiply)
    return costs


def tree_cost(node, widths_, layer_flops):
    """The cost of the plan's own tree, recomputed from the widths and layer FLOPs."""
    if isinstance(node, Segment):
        segment_flops = sum(layer_flops[node.start:node.stop])
        side = widths_[node.start] if node.mode == "forward" else widths_[node.stop]
        assert node.flops == side * segment_flops, node
        return node.flops
    later, earlier = node.later, node.earlier
    start, middle = _leftmost(earlier).start, _leftmost(later).start
    assert _rightmost(earlier).stop == middle  # the two factors are adjacent
    stop = _rightmost(later).stop
    assert node.flops == 2 * widths_[stop] * widths_[middle] * widths_[start], node
    return node.flops + tree_cost(later, widths_, layer_flops) + tree_cost(
        earlier, widths_, layer_flops)


def _leftmost(node):
    return node if isinstance(node, Segment) else _leftmost(node.earlier)


def _rightmost(node):
    return node if isinstance(node, Segment) else _rightmost(node.later)


def test_brute_force_enumerates_every_plan():
    """The enumeration's count: 2 modes per segment, all segmentations, all bracketings."""
    counts = [len(brute_force_costs((1,) * 7, (1,) * 6, 0, length)) for length in range(1, 6)]
    # m segments: C(L-1, m-1) segmentations x 2^m modes x Catalan(m-1) bracketings
    expected = [sum(math.comb(length - 1, m - 1) * 2**m * math.comb(2 * m - 2, m - 1) // m
                    for m in range(1, length + 1)) for length in range(1, 6)]
    assert counts == expected == [2, 6, 26, 142, 882]


@settings(max_examples=60)
@given(case=accumulation_nets(max_depth=5))
def test_dp_cost_equals_the_brute_force_minimum(case):
    net, in_width, description = case
    plan = fnet.jacobian_plan(net, (in_width,))
    n_layers = len(plan.layer_flops)
    assert 1 <= n_layers <= 5
    total = sum(plan.layer_flops)
    best = min(brute_force_costs(plan.widths, plan.layer_flops, 0, n_layers))
    assert plan.predicted_flops == total + best, (description, str(plan))
    assert tree_cost(plan.root, plan.widths, plan.layer_flops) == best, str(plan)
    assert plan.forward_flops == total + plan.widths[0] * total
    assert plan.reverse_flops == total + plan.widths[-1] * total


@pytest.mark.parametrize("chain_widths", [(100, 50, 10, 2, 50, 100), (3, 40, 1, 40, 3),
                                          (5, 5, 5, 5, 5, 5), (1, 40, 40, 40, 40, 1),
                                          (40, 1, 1, 1, 1, 40)])
def test_dp_cost_equals_the_brute_force_minimum_on_fixed_chains(chain_widths):
    """Chains of dense layers only (at most 5 top-level layers)."""
    net = fnet.chain(*(fnet.dense(width) for width in chain_widths[1:]))
    plan = fnet.jacobian_plan(net, chain_widths[:1])
    n_layers = len(plan.layer_flops)
    assert n_layers == len(chain_widths) - 1 <= 5
    best = min(brute_force_costs(plan.widths, plan.layer_flops, 0, n_layers))
    assert plan.predicted_flops == sum(plan.layer_flops) + best, str(plan)
    assert tree_cost(plan.root, plan.widths, plan.layer_flops) == best, str(plan)


# ---------------------------------------------------------------------------------------
# forward_flops.

@pytest.mark.parametrize("fan_in,out", [(1, 1), (3, 7), (64, 10)])
def test_forward_flops_of_a_dense_layer(fan_in, out):
    assert fnet.dense(out).flops((fan_in,)) == 2 * fan_in * out + out
    assert fnet.dense(out, bias=False).flops((fan_in,)) == 2 * fan_in * out
    # over the last axis of a (rows, fan_in) example: once per row
    assert fnet.dense(out).flops((4, fan_in)) == 4 * (2 * fan_in * out + out)


def test_forward_flops_of_activations_chains_residuals_and_repeats():
    for activation in (fnet.relu, fnet.tanh, fnet.sigmoid, fnet.softplus, fnet.gelu,
                       fnet.identity, fnet.leaky_relu(0.1)):
        assert activation.flops((6,)) == 6
    assert fnet.flatten.flops((2, 3)) == 0
    net = fnet.chain(fnet.dense(5), fnet.tanh, fnet.dense(2, bias=False))
    assert net.flops((3,)) == (2 * 3 * 5 + 5) + 5 + 2 * 5 * 2
    assert fnet.chain(net, fnet.dense(1)).flops((3,)) == net.flops((3,)) + 5
    block = fnet.chain(fnet.dense(4), fnet.relu)
    assert fnet.residual(block).flops((4,)) == block.flops((4,)) + 4
    for n in (1, 3, 17):
        assert fnet.repeat(block, n).flops((4,)) == n * block.flops((4,))
    nested = fnet.repeat(fnet.repeat(fnet.residual(block), 3), 2)
    assert nested.flops((4,)) == 6 * (block.flops((4,)) + 4)


def test_forward_flops_of_a_dense_layer_match_xla_cost_analysis():
    """The closed form agrees with XLA's own count for one example."""
    layer = fnet.dense(7)
    params = abstract_init(layer, (5,))[0]
    x = jax.ShapeDtypeStruct((1, 5), jnp.float64)
    analysis = jax.jit(layer.apply).lower(params, x).compile().cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    assert layer.flops((5,)) == int(analysis["flops"]) == 2 * 5 * 7 + 7


# ---------------------------------------------------------------------------------------
# Errors.

def test_unknown_mode_or_wrt_is_an_argument_error_listing_the_options():
    net = dense_chain((3, 4, 2))
    params, _ = random_params(net, (3,), np.random.default_rng(0))
    x = jnp.ones((3,))
    with pytest.raises(fnet.ArgumentError) as info:
        fnet.jacobian(net, params, x, mode="optimum")
    for part in ("'forward'", "'reverse'", "'optimal'", "'optimum'"):
        assert part in str(info.value), str(info.value)
    with pytest.raises(fnet.ArgumentError) as info:
        fnet.jacobian(net, params, x, wrt="inputs", mode="optimal")
    for part in ("'input'", "'params'", "'inputs'"):
        assert part in str(info.value), str(info.value)
    with pytest.raises(fnet.ArgumentError) as info:
        fnet.jacobian_plan(net, (3,), wrt="weights")
    for part in ("'input'", "'params'", "'weights'"):
        assert part in str(info.value), str(info.value)
