"""Memory policies of the backward pass: ``fnet.value_and_grad(net, loss, remat=...)``.

``keep`` stores every layer's residuals, ``sqrt`` only the inputs of segments of about
sqrt(L) layers (recomputing one segment at a time on the way down), ``recompute`` only the
input x. All three are the same derivative: over random networks (nested chains,
residuals, and chains containing repeats) each equals ``jax.value_and_grad`` to a relative
error of 1e-10 in float64, eagerly and under ``jax.jit``, and so does ``fnet.grad``.

The recomputation must also be real once compiled: XLA's common-subexpression elimination
would otherwise merge the recomputed forward pass with the original one and keep every
activation alive. Under ``jax.jit(...).lower(...).compile()`` the FLOPs grow and the
temporary memory shrinks from keep to sqrt to recompute.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import funcnet as fnet
from funcnet.nn._layer import abstract_init
from funcnet.ad._policies import segment_bounds

# pytest runs with --import-mode=importlib, which puts no test directory on sys.path.
from exactness import assert_close, random_params  # noqa: E402
from strategies import (Net, activations, chains, cosh_loss, huber_loss, layers,  # noqa: E402
                        networks, residuals)

POLICIES = ("keep", "sqrt", "recompute")


# ---------------------------------------------------------------------------------------
# Helpers.

LOSSES = {
    "squared_error": fnet.losses.squared_error,
    "softmax_cross_entropy": fnet.losses.softmax_cross_entropy,
    "cosh": cosh_loss,
    "huber": huber_loss,
}


# ---------------------------------------------------------------------------------------
# Random networks, with and without repeats.

@st.composite
def repeat_blocks(draw, width, max_width):
    """A repeat(block, n) on per-example shape (width,): the block a residual, a chain
    ending at ``width``, a dense layer with an activation, or a repeat itself."""
    kind = draw(st.sampled_from(["residual", "chain", "dense", "repeat"]))
    if kind == "residual":
        block = draw(residuals(width, max_width, nesting=2)).layer
    elif kind == "chain":
        block = draw(chains(width, max_width, nesting=2, max_length=2, end_width=width)).layer
    elif kind == "dense":
        block = fnet.chain(fnet.dense(width), draw(activations()))
    else:
        block = fnet.repeat(fnet.residual(fnet.dense(width)), draw(st.integers(1, 3)))
    if not jax.tree.leaves(abstract_init(block, (width,))[0]):
        # A block without params (e.g. residual(relu)) would make the repeat's params
        # empty: a known failure of its own (test_repeat.py's
        # test_repeat_of_a_parameterless_layer), kept out of these random networks.
        block = fnet.chain(fnet.dense(width), block)
    n = draw(st.integers(1, 9))
    return Net(fnet.repeat(block, n), width, f"repeat({block.name}, {n})")


@st.composite
def networks_with_repeats(draw, in_width, max_depth=6, max_width=16):
    """A chain of 1..max_depth top-level layers, at least one of them a repeat (possibly
    nested inside a residual or a chain), or sometimes a repeat as the whole network."""
    if draw(st.integers(0, 5)) == 0:
        return draw(repeat_blocks(in_width, max_width))
    depth = draw(st.integers(1, max_depth))
    where = draw(st.integers(0, depth - 1))
    parts, width = [], in_width
    for index in range(depth):
        if index == where:
            part = draw(repeat_blocks(width, max_width))
            wrap = draw(st.sampled_from(["none", "residual", "chain"]))
            if wrap == "residual":
                part = Net(fnet.residual(part.layer), width, f"residual({part.description})")
            elif wrap == "chain":
                part = Net(fnet.chain(part.layer, fnet.dense(width)), width,
                           f"chain({part.description}, dense({width}))")
        else:
            part = draw(layers(width, max_width, nesting=1))
        parts.append(part)
        width = part.out_width
    return Net(fnet.chain(*(p.layer for p in parts)), width,
               "chain(" + ", ".join(p.description for p in parts) + ")")


@st.composite
def remat_cases(draw, with_repeats: bool, max_batch=4):
    """``(net, params, x, y, loss, description)`` in float64."""
    in_width = draw(st.integers(1, 16))
    if with_repeats:
        net = draw(networks_with_repeats(in_width))
    else:
        net = draw(networks(in_width, max_depth=8, max_width=16))
    batch = draw(st.integers(1, max_batch))
    loss_name = draw(st.sampled_from(sorted(LOSSES)))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    params, out_shape = random_params(net.layer, (in_width,), rng)
    assert out_shape == (net.out_width,)
    x = rng.standard_normal((batch, in_width))
    if draw(st.booleans()):  # exact zeros: relu's kink at 0 (with bias-free dense layers)
        x = np.where(rng.random(x.shape) < 0.5, 0.0, x)
    if loss_name == "softmax_cross_entropy":
        y = jnp.asarray(rng.integers(0, net.out_width, (batch,)))
    else:
        y = jnp.asarray(rng.standard_normal((batch, net.out_width)))
    description = f"{net.description} on x {x.shape}, {loss_name}, seed {seed}"
    return net.layer, params, jnp.asarray(x), y, LOSSES[loss_name], description


@functools.partial(jax.jit, static_argnums=(0, 1))
def jitted_everything(net, loss, params, x, y):
    """One compilation: jax.value_and_grad (the reference), and funcnet's value_and_grad
    and grad under every policy."""
    reference = jax.value_and_grad(lambda p: loss(net.apply(p, x), y))(params)
    ours = {policy: (fnet.value_and_grad(net, loss, remat=policy)(params, x, y),
                     fnet.grad(net, loss, remat=policy)(params, x, y))
            for policy in POLICIES}
    return reference, ours


def check_every_policy(case, eager_policies=POLICIES):
    """Every policy under jit; those in ``eager_policies`` also without jit."""
    net, params, x, y, loss, description = case
    (ref_value, ref_grads), ours = jitted_everything(net, loss, params, x, y)
    for policy in POLICIES:
        what = f"remat={policy}, jit ({description})"
        (value, grads), only_grads = ours[policy]
        assert_close(value, ref_value, f"value, {what}")
        assert_close(grads, ref_grads, f"grads vs jax.grad, {what}")
        assert_close(only_grads, ref_grads, f"fnet.grad vs jax.grad, {what}")
        if policy not in eager_policies:
            continue
        what = f"remat={policy}, eager ({description})"
        value, grads = fnet.value_and_grad(net, loss, remat=policy)(params, x, y)
        assert_close(value, ref_value, f"value, {what}")
        assert_close(grads, ref_grads, f"grads vs jax.grad, {what}")


# ---------------------------------------------------------------------------------------
# Every policy is the same derivative.

# Under jit every example checks every policy; eagerly (slower: no compilation of the
# whole) each example checks one drawn policy.

@settings(max_examples=6)
@given(case=remat_cases(with_repeats=False), eager=st.sampled_from(POLICIES))
def test_every_policy_equals_jax_value_and_grad(case, eager):
    check_every_policy(case, (eager,))


@settings(max_examples=6)
@given(case=remat_cases(with_repeats=True), eager=st.sampled_from(POLICIES))
def test_every_policy_equals_jax_value_and_grad_with_repeats(case, eager):
    check_every_policy(case, (eager,))


def test_grad_with_remat_on_a_deep_chain_of_repeats_and_residuals():
    """A fixed, deeper network: 3 repeats (n = 1, 5, 9) between residual blocks; every
    policy under jit, the two that recompute also eagerly."""
    block = fnet.chain(fnet.dense(6), fnet.tanh)
    net = fnet.chain(
        fnet.dense(6), fnet.repeat(block, 5), fnet.residual(block),
        fnet.repeat(fnet.residual(fnet.chain(fnet.dense(6), fnet.gelu, fnet.dense(6))), 9),
        fnet.sigmoid, fnet.repeat(fnet.dense(6), 1), fnet.dense(2))
    rng = np.random.default_rng(7)
    params, _ = random_params(net, (3,), rng)
    x, y = jnp.asarray(rng.standard_normal((5, 3))), jnp.asarray(rng.standard_normal((5, 2)))
    check_every_policy((net, params, x, y, fnet.losses.squared_error, "fixed deep net"),
                       eager_policies=("sqrt", "recompute"))


# ---------------------------------------------------------------------------------------
# Errors.

@pytest.mark.parametrize("make", [fnet.value_and_grad, fnet.grad], ids=["value_and_grad", "grad"])
@pytest.mark.parametrize("bad", ["checkpoint", "Sqrt", "", None])
def test_an_unknown_policy_is_an_argument_error_listing_the_options(make, bad):
    net = fnet.chain(fnet.dense(3), fnet.tanh)
    with pytest.raises(fnet.ArgumentError) as info:
        make(net, fnet.losses.squared_error, remat=bad)  # raised when built, not when called
    message = str(info.value)
    for option in POLICIES:
        assert repr(option) in message, message
    assert repr(bad) in message, message


def test_the_default_policy_is_keep():
    net = fnet.chain(fnet.dense(3), fnet.tanh, fnet.dense(1))
    rng = np.random.default_rng(0)
    params, _ = random_params(net, (2,), rng)
    x, y = jnp.asarray(rng.standard_normal((4, 2))), jnp.asarray(rng.standard_normal((4, 1)))
    loss = fnet.losses.squared_error
    fnet.value_and_grad(net, loss)(params, x, y)  # warm the init-shape cache first
    default = jax.make_jaxpr(fnet.value_and_grad(net, loss))(params, x, y)
    keep = jax.make_jaxpr(fnet.value_and_grad(net, loss, remat="keep"))(params, x, y)
    sqrt = jax.make_jaxpr(fnet.value_and_grad(net, loss, remat="sqrt"))(params, x, y)
    assert str(default) == str(keep)
    assert str(default) != str(sqrt)


# ---------------------------------------------------------------------------------------
# segment_bounds.

@pytest.mark.parametrize("n_layers", list(range(1, 41)) + [63, 64, 65, 100, 1000])
def test_segment_bounds_cover_the_chain_contiguously_in_segments_of_about_sqrt_l(n_layers):
    bounds = segment_bounds(n_layers)
    assert bounds[0][0] == 0 and bounds[-1][1] == n_layers
    for (_, stop), (start, _) in zip(bounds, bounds[1:]):
        assert stop == start  # contiguous, no overlap, no gap
    sizes = [stop - start for start, stop in bounds]
    assert all(size >= 1 for size in sizes)
    assert sum(sizes) == n_layers
    # every segment but the last has the same size s, the last at most s, and s ~ sqrt(L)
    size = sizes[0]
    assert all(s == size for s in sizes[:-1]) and sizes[-1] <= size
    assert abs(size - math.sqrt(n_layers)) <= 0.5 + 1e-12, (n_layers, size)
    assert len(bounds) == math.ceil(n_layers / size)
    # so the memory L/s + s is within a small factor of its minimum 2 sqrt(L)
    assert len(bounds) + size <= 2 * math.sqrt(n_layers) + 2


# ---------------------------------------------------------------------------------------
# Recomputation is real under jit.

def compiled_costs(net, in_width, batch, remat):
    """(FLOPs, temporary bytes) of jax.jit(value_and_grad) compiled for abstract inputs."""
    params = abstract_init(net, (in_width,))[0]
    x = jax.ShapeDtypeStruct((batch, in_width), jnp.float64)
    y = jax.ShapeDtypeStruct((batch, in_width), jnp.float64)
    fn = fnet.value_and_grad(net, fnet.losses.squared_error, remat=remat)
    compiled = jax.jit(fn).lower(params, x, y).compile()
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        assert len(analysis) == 1, analysis
        analysis = analysis[0]
    return float(analysis["flops"]), int(compiled.memory_analysis().temp_size_in_bytes)


def test_recomputation_survives_compilation_on_a_16_layer_chain():
    """16 top-level layers dense(64) + tanh, batch 256: sqrt recomputes about one extra
    forward pass and keeps about sqrt(16) activations; recompute redoes O(L^2) layers and
    keeps about one. Were XLA to merge the recomputation with the original forward pass
    (CSE), FLOPs and memory would equal keep's."""
    net = fnet.chain(*[fnet.chain(fnet.dense(64), fnet.tanh)] * 16)
    costs = {policy: compiled_costs(net, 64, 256, policy) for policy in POLICIES}
    flops = {policy: c[0] for policy, c in costs.items()}
    temp = {policy: c[1] for policy, c in costs.items()}
    assert flops["keep"] < flops["sqrt"] < flops["recompute"], flops
    assert temp["keep"] > temp["sqrt"] > temp["recompute"], temp
    # sqrt: about one extra forward pass (forward ~ 1/3 of forward + backward)
    assert flops["sqrt"] < 1.6 * flops["keep"], flops
    # recompute: sum over i of i layer evaluations ~ L/2 extra forward passes
    assert flops["recompute"] > 2 * flops["keep"], flops


def test_recomputation_survives_compilation_inside_a_repeat():
    """repeat(chain(dense(64), tanh), 16): the policies act on the scan over the copies.
    XLA's cost analysis counts a loop body once, so FLOPs only say that keep does the
    least work; the temporary memory is strictly ordered."""
    net = fnet.repeat(fnet.chain(fnet.dense(64), fnet.tanh), 16)
    costs = {policy: compiled_costs(net, 64, 256, policy) for policy in POLICIES}
    flops = {policy: c[0] for policy, c in costs.items()}
    temp = {policy: c[1] for policy, c in costs.items()}
    assert flops["keep"] < flops["sqrt"] and flops["keep"] < flops["recompute"], flops
    assert temp["keep"] > temp["sqrt"] > temp["recompute"], temp
