"""``fnet.repeat(block, n)``: n copies of a shape-keeping block, params stacked on axis 0.

A repeat is the same function as the unrolled ``chain(block, ..., block)`` with its params
unstacked, so every funcnet transform of a network containing repeats (apply,
value_and_grad, grad, jvp, vjp, backprop, jacobian in every mode) must agree with the same
transform of the unrolled network, and with JAX's own transforms of ``net.apply``, to a
relative error of 1e-10 in float64. The structures covered: a repeat of a nested chain,
of a residual, a repeat nested in a chain, a repeat that is the whole network, and a
repeat inside a repeat. Also: errors (width-changing block, n = 0, unstacked params),
and that tracing does not unroll (the jaxpr does not grow with n).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import funcnet as fnet
from funcnet.nn._layer import abstract_init

# pytest runs with --import-mode=importlib, which puts no test directory on sys.path.
from exactness import assert_close, random_params  # noqa: E402
from strategies import activations  # noqa: E402

LOSS = fnet.losses.squared_error
OUT = 3  # output width of the networks below


# ---------------------------------------------------------------------------------------
# Helpers.

def unroll(layer, params, take=lambda a, k: a[k]):
    """``(chain(block, ..., block), unstacked params)`` for every repeat inside ``layer``.

    ``take(leaf, k)`` picks copy k of a stacked leaf; the default unstacks params (and
    grads and tangents, which have their structure). A repeat becomes a chain of n
    copies, so top-level layer counts (and backprop's records) are unchanged.
    """
    if isinstance(layer, fnet.Repeat):
        copies = [unroll(layer.layer, jax.tree.map(lambda a: take(a, k), params), take)
                  for k in range(layer.n)]
        return fnet.chain(*(c[0] for c in copies)), tuple(c[1] for c in copies)
    if isinstance(layer, fnet.Chain):
        items = [unroll(item, p, take) for item, p in zip(layer.layers, params)]
        return fnet.chain(*(i[0] for i in items)), tuple(i[1] for i in items)
    if isinstance(layer, fnet.Residual):
        inner, p = unroll(layer.inner, params, take)
        return fnet.residual(inner), p
    return layer, params


def unroll_params(layer, params, take=lambda a, k: a[k]):
    return unroll(layer, params, take)[1]


KINDS = ("repeat_of_chain", "repeat_of_residual", "repeat_is_net", "repeat_of_nested_chain",
         "repeat_in_repeat")


def build(kind: str, width: int, n: int, act: fnet.Layer):
    """``(net, in_width)``: a network of ``kind`` with a repeat of depth about ``n``."""
    block = fnet.chain(fnet.dense(width), act)
    if kind == "repeat_of_chain":  # a repeat nested in a chain
        return fnet.chain(fnet.dense(width), fnet.repeat(block, n), fnet.dense(OUT)), 5
    if kind == "repeat_of_residual":
        return fnet.chain(fnet.dense(width), fnet.repeat(fnet.residual(block), n),
                          act, fnet.dense(OUT)), 4
    if kind == "repeat_is_net":  # the network is the repeat itself (not a chain)
        return fnet.repeat(block, n), width
    if kind == "repeat_of_nested_chain":
        nested = fnet.chain(fnet.chain(fnet.dense(width, bias=False), act),
                            fnet.residual(fnet.dense(width)))
        return fnet.chain(fnet.dense(width), fnet.repeat(nested, n), fnet.dense(OUT)), 2
    assert kind == "repeat_in_repeat"
    inner = fnet.repeat(fnet.residual(block), 1 + n % 3)
    return fnet.chain(fnet.dense(width), fnet.repeat(inner, max(1, n // 2)),
                      fnet.dense(OUT)), 3


def random_like(rng, tree):
    return jax.tree.map(lambda leaf: jnp.asarray(rng.standard_normal(jnp.shape(leaf))), tree)


def make_case(kind, n, width, act, batch, seed):
    """``(net, params, x, y, rng, description)`` with float64 params and inputs."""
    net, in_width = build(kind, width, n, act)
    rng = np.random.default_rng(seed)
    params, out_shape = random_params(net, (in_width,), rng)
    x = jnp.asarray(rng.standard_normal((batch, in_width)))
    y = jnp.asarray(rng.standard_normal((batch,) + out_shape))
    return net, params, x, y, rng, f"{kind}, n={n}, width={width}, {act.name}, seed {seed}"


@st.composite
def repeat_cases(draw, max_n=12, max_width=16, max_batch=4):
    """A random kind (see :func:`build`), depth n, width, activation, batch and seed."""
    return make_case(draw(st.sampled_from(KINDS)), draw(st.integers(1, max_n)),
                     draw(st.integers(1, max_width)), draw(activations()),
                     draw(st.integers(1, max_batch)), draw(st.integers(0, 2**32 - 1)))


# ---------------------------------------------------------------------------------------
# init: stacked params.

@pytest.mark.parametrize("n", [1, 5])
def test_init_stacks_params_along_a_leading_axis_of_n(n, key):
    block = fnet.chain(fnet.dense(3), fnet.tanh, fnet.residual(fnet.dense(3, bias=False)))
    net = fnet.repeat(block, n)
    params, out_shape = net.init(key, (3,))
    assert out_shape == (3,)
    one_copy = abstract_init(block, (3,))[0]
    assert jax.tree.structure(params) == jax.tree.structure(one_copy)
    for leaf, single in zip(jax.tree.leaves(params), jax.tree.leaves(one_copy)):
        assert leaf.shape == (n,) + single.shape
    if n > 1:  # the copies are initialised independently
        w = params[0]["w"]
        assert not np.allclose(w[0], w[1])
    assert net.name == f"repeat({block.name}, {n})"


def test_init_of_a_repeat_inside_a_repeat_stacks_twice(key):
    net = fnet.chain(fnet.dense(4), fnet.repeat(fnet.repeat(fnet.dense(4), 3), 5))
    params, out_shape = net.init(key, (2,))
    assert out_shape == (4,)
    assert params[1]["w"].shape == (5, 3, 4, 4)
    assert params[1]["b"].shape == (5, 3, 4)


def test_repeat_of_a_parameterless_layer(key):
    """repeat(tanh, 3) keeps the shape and has params (); it is tanh applied 3 times."""
    net = fnet.chain(fnet.dense(4), fnet.repeat(fnet.tanh, 3), fnet.dense(2))
    assert abstract_init(net, (3,))[1] == (2,)
    params, out_shape = random_params(net, (3,), np.random.default_rng(0))
    x = jnp.asarray(np.random.default_rng(1).standard_normal((5, 3)))
    expected = fnet.chain(fnet.dense(4), fnet.tanh, fnet.tanh, fnet.tanh, fnet.dense(2)).apply(
        (params[0], (), (), (), params[2]), x)
    assert out_shape == (2,)
    assert_close(net.apply(params, x), expected, "repeat(tanh, 3) apply")
    reference = jax.value_and_grad(lambda p: LOSS(net.apply(p, x), jnp.zeros((5, 2))))(params)
    for remat in ("keep", "sqrt", "recompute"):
        assert_close(fnet.value_and_grad(net, LOSS, remat=remat)(params, x, jnp.zeros((5, 2))),
                     reference, f"repeat(tanh, 3) value_and_grad, remat={remat}")


# ---------------------------------------------------------------------------------------
# The same function as the unrolled chain, and the same derivatives as JAX's.
#
# References: jax.value_and_grad of the repeat net's own apply (a scan, differentiated by
# JAX), and JAX's transforms of the unrolled chain's apply (no scan). funcnet runs on the
# repeat net eagerly and under jax.jit, and on the unrolled chain.

def jax_transforms(net, params, x, y, params_dot, x_dot, ct):
    """JAX's own value_and_grad, jvps (both tangents, params only, input only) and vjp."""
    value, grads = jax.value_and_grad(lambda p: LOSS(net.apply(p, x), y))(params)
    zeros_p, zeros_x = jax.tree.map(jnp.zeros_like, params), jnp.zeros_like(x)
    jvps = {
        "both": jax.jvp(net.apply, (params, x), (params_dot, x_dot)),
        "params": jax.jvp(net.apply, (params, x), (params_dot, zeros_x)),
        "input": jax.jvp(net.apply, (params, x), (zeros_p, x_dot)),
    }
    out, pullback = jax.vjp(net.apply, params, x)
    return value, grads, jvps, (out, pullback(ct))


def funcnet_transforms(net, params, x, y, params_dot, x_dot, ct):
    """funcnet's apply, value_and_grad, jvps, vjp, grad and backprop."""
    value, grads = fnet.value_and_grad(net, LOSS)(params, x, y)
    jvps = {
        "both": fnet.jvp(net, params, x, params_dot, x_dot),
        "params": fnet.jvp(net, params, x, params_dot, None),
        "input": fnet.jvp(net, params, x, None, x_dot),
    }
    out, pullback = fnet.vjp(net, params, x)
    return dict(apply=net.apply(params, x), value=value, grads=grads, jvps=jvps,
                vjp=(out, pullback(ct)), grad=fnet.grad(net, LOSS)(params, x, y),
                backprop=fnet.backprop(net, LOSS, params, x, y))


@functools.partial(jax.jit, static_argnums=(0, 1))
def jitted_transforms(net, unrolled, args, unrolled_args):
    """One compilation per example: JAX's transforms of the repeat net (the reference),
    and funcnet's of the repeat net and of the unrolled chain."""
    return (jax_transforms(net, *args), funcnet_transforms(net, *args),
            funcnet_transforms(unrolled, *unrolled_args))


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=2)
@given(n=st.integers(1, 12), width=st.integers(1, 16), act=activations(),
       batch=st.integers(1, 4), seed=st.integers(0, 2**32 - 1))
@example(n=12, width=16, act=fnet.tanh, batch=3, seed=1)  # the deepest and widest
def test_every_transform_equals_unrolled_chain_and_jax(kind, n, width, act, batch, seed):
    net, params, x, y, rng, description = make_case(kind, n, width, act, batch, seed)
    unrolled, unrolled_params = unroll(net, params)
    params_dot, x_dot, ct = random_like(rng, (params, x, y))
    args = (params, x, y, params_dot, x_dot, ct)
    u_args = (unrolled_params, x, y, unroll_params(net, params_dot), x_dot, ct)
    (ref_value, ref_grads, ref_jvps, ref_vjp), ours, theirs = jitted_transforms(
        net, unrolled, args, u_args)
    what = f"jit, {description}"

    # apply: the same function.
    assert_close(ours["apply"], theirs["apply"], f"apply vs unrolled ({what})")
    assert_close(ours["apply"], ref_vjp[0], f"apply vs jax ({what})")
    # value_and_grad and grad: vs jax.grad, and vs the unrolled chain
    assert_close(ours["value"], ref_value, f"value vs jax ({what})")
    assert_close(ours["grads"], ref_grads, f"grads vs jax.grad ({what})")
    assert_close(ours["grad"], ref_grads, f"fnet.grad vs jax.grad ({what})")
    assert_close(ours["value"], theirs["value"], f"value vs unrolled ({what})")
    assert_close(unroll_params(net, ours["grads"]), theirs["grads"],
                 f"grads vs unrolled ({what})")
    # jvp: both tangents, params only, input only
    for kind in ("both", "params", "input"):
        assert_close(ours["jvps"][kind], ref_jvps[kind], f"jvp ({kind}) vs jax.jvp ({what})")
        assert_close(ours["jvps"][kind], theirs["jvps"][kind],
                     f"jvp ({kind}) vs unrolled ({what})")
    # vjp
    out, (ct_params, ct_x) = ours["vjp"]
    assert_close((out, (ct_params, ct_x)), ref_vjp, f"vjp vs jax.vjp ({what})")
    assert_close((out, (unroll_params(net, ct_params), ct_x)), theirs["vjp"],
                 f"vjp vs unrolled ({what})")
    # backprop: value, grads, and the records z_i, q_i of the top-level layers
    record, u_record = ours["backprop"], theirs["backprop"]
    assert_close(record.value, ref_value, f"backprop value ({what})")
    assert_close(record.grads, ref_grads, f"backprop grads vs jax.grad ({what})")
    assert_close(unroll_params(net, record.grads), u_record.grads,
                 f"backprop grads vs unrolled ({what})")
    if isinstance(net, fnet.Chain):  # a repeat nested in a chain is one top-level layer
        assert len(record.activations) == len(u_record.activations) == len(net.layers) + 1
        assert_close(record.activations, u_record.activations, f"z_i ({what})")
        assert_close(record.cotangents, u_record.cotangents, f"q_i ({what})")
    else:  # the net is the repeat: L = 1; the unrolled chain has n layers
        assert len(record.activations) == len(record.cotangents) == 2
        for mine, unrolled_ones, z_or_q in [(record.activations, u_record.activations, "z"),
                                            (record.cotangents, u_record.cotangents, "q")]:
            assert_close((mine[0], mine[-1]), (unrolled_ones[0], unrolled_ones[-1]),
                         f"{z_or_q}_1 and {z_or_q}_(L+1) ({what})")

    # Eagerly (no jit): apply, value_and_grad.
    what = f"eager, {description}"
    assert_close(net.apply(params, x), ours["apply"], f"apply ({what})")
    value, grads = fnet.value_and_grad(net, LOSS)(params, x, y)
    assert_close(value, ref_value, f"value vs jax ({what})")
    assert_close(grads, ref_grads, f"grads vs jax.grad ({what})")


MODES = ("forward", "reverse", "optimal")


@functools.partial(jax.jit, static_argnums=(0, 1))
def all_jacobians(net, unrolled, params, unrolled_params, x0):
    """Every (wrt, mode) Jacobian of the repeat net; jax.jacfwd of the unrolled chain."""
    ours = {(wrt, mode): fnet.jacobian(net, params, x0, wrt=wrt, mode=mode)
            for wrt in ("input", "params") for mode in MODES}
    reference = (jax.jacfwd(lambda xx: unrolled.apply(unrolled_params, xx[None])[0])(x0),
                 jax.jacfwd(lambda p: unrolled.apply(p, x0[None])[0])(unrolled_params))
    return ours, reference


@settings(max_examples=5)
@given(case=repeat_cases(max_n=5, max_width=6, max_batch=1))
def test_jacobians_in_every_mode_equal_jacfwd_of_the_unrolled_chain(case):
    """Under jit: fnet.jacobian in every mode and for both wrt of a net with repeats
    equals jax.jacfwd of the unrolled chain (stacked params leaves unstacked)."""
    net, params, x, _, _, description = case
    x0 = x[0]
    unrolled, unrolled_params = unroll(net, params)
    got, (ref_input, ref_params) = all_jacobians(net, unrolled, params, unrolled_params, x0)
    for mode in MODES:
        assert_close(got["input", mode], ref_input, f"input jacobian, {mode} ({description})")
        params_jacobian = got["params", mode]
        for leaf, stacked in zip(jax.tree.leaves(params_jacobian), jax.tree.leaves(params)):
            assert leaf.shape == ref_input.shape[:1] + stacked.shape
        # A stacked leaf's jacobian has shape out_shape + (n, *S): unstack axis 1.
        assert_close(unroll_params(net, params_jacobian, take=lambda a, k: a[:, k]),
                     ref_params, f"params jacobian, {mode} ({description})")


# ---------------------------------------------------------------------------------------
# Errors.

def test_repeat_of_a_width_changing_layer_names_the_layers_and_shapes(key):
    with pytest.raises(fnet.LayerError) as info:
        fnet.repeat(fnet.dense(3), 2).init(key, (4,))
    message = str(info.value)
    for part in ("repeat(dense(3), 2)", "dense(3)", "(4,)", "(3,)"):
        assert part in message, (part, message)

    net = fnet.chain(fnet.dense(4), fnet.repeat(fnet.chain(fnet.dense(4), fnet.dense(5)), 2))
    with pytest.raises(fnet.LayerError) as info:
        net.init(key, (3,))
    message = str(info.value)
    assert info.value.path == ((1, "repeat(chain, 2)"),), info.value.path
    for part in ("layer 1 (repeat(chain, 2))", "(4,)", "(5,)"):
        assert part in message, (part, message)


@pytest.mark.parametrize("n, problem", [
    (0, "must be at least 1, got 0"), (-3, "must be at least 1, got -3"),
    (2.0, "must be an int, got 2.0 (float)"), (True, "must be an int, got True (bool)")])
def test_repeat_needs_an_int_count_of_at_least_one_copy(n, problem):
    with pytest.raises(fnet.ArgumentError) as info:
        fnet.repeat(fnet.dense(4), n)
    assert str(info.value) == f"repeat(n): {problem}" or str(info.value).startswith(
        f"repeat(n): {problem}"), str(info.value)
    assert info.value.argument == "repeat(n)"


def test_repeat_accepts_a_numpy_count_as_an_int():
    assert fnet.repeat(fnet.dense(4), np.int64(3)) == fnet.repeat(fnet.dense(4), 3)
    assert type(fnet.repeat(fnet.dense(4), np.int64(3)).n) is int


def test_repeat_of_something_that_is_not_a_layer():
    with pytest.raises(fnet.ArgumentError, match=r"repeat\(layer\): must be a funcnet Layer"):
        fnet.repeat(lambda w, z: z, 3)


def _entry_points(net, params, x, y):
    """Every public entry point that checks params, called on (params, x, y)."""
    return {
        "vjp": lambda: fnet.vjp(net, params, x),
        "value_and_grad": lambda: fnet.value_and_grad(net, LOSS)(params, x, y),
        "value_and_grad jit": lambda: jax.jit(fnet.value_and_grad(net, LOSS))(params, x, y),
        "value_and_grad sqrt": lambda: fnet.value_and_grad(net, LOSS, remat="sqrt")(
            params, x, y),
        "jvp": lambda: fnet.jvp(net, params, x, None, x),
        "backprop": lambda: fnet.backprop(net, LOSS, params, x, y),
        "jacobian": lambda: fnet.jacobian(net, params, x[0], mode="optimal"),
    }


@pytest.mark.parametrize("nested", [False, True], ids=["repeat_is_net", "repeat_in_chain"])
def test_unstacked_or_wrongly_stacked_params_name_the_repeat(nested, key):
    def wrap(repeat):
        return fnet.chain(fnet.tanh, repeat) if nested else repeat

    def wrap_params(p):
        return ((), p) if nested else p

    block = fnet.chain(fnet.dense(5), fnet.tanh)
    net = wrap(fnet.repeat(block, 3))
    x, y = jnp.ones((2, 5)), jnp.zeros((2, 5))
    rng = np.random.default_rng(0)
    stacked = random_params(fnet.repeat(block, 3), (5,), rng)[0]
    one_copy = jax.tree.map(lambda a: a[0], stacked)
    four = random_params(fnet.repeat(block, 4), (5,), rng)[0]
    for label, bad in [("one copy, unstacked", one_copy), ("stacked 4 for n=3", four)]:
        for entry, call in _entry_points(net, wrap_params(bad), x, y).items():
            with pytest.raises(fnet.LayerError) as info:
                call()
            message = str(info.value)
            assert "repeat(chain, 3)" in message, (label, entry, message)
            assert "leading axis of 3" in message, (label, entry, message)


@pytest.mark.parametrize("nested", [False, True], ids=["repeat_is_net", "repeat_in_chain"])
def test_unstacked_params_whose_first_axis_happens_to_be_n_name_the_repeat(nested, key):
    """repeat(dense(4), 4) given ONE copy's params: w (4, 4) and b (4,) both start with 4,
    so they pass as stacked; the per-copy check then fails and must still say that the
    problem is in the repeat's params."""
    repeat = fnet.repeat(fnet.dense(4), 4)
    net = fnet.chain(fnet.tanh, repeat) if nested else repeat
    stacked, _ = random_params(repeat, (4,), np.random.default_rng(0))
    one_copy = jax.tree.map(lambda a: a[0], stacked)
    params = ((), one_copy) if nested else one_copy
    with pytest.raises(fnet.LayerError) as info:
        fnet.value_and_grad(net, LOSS)(params, jnp.ones((2, 4)), jnp.zeros((2, 4)))
    assert "repeat(dense(4), 4)" in str(info.value), str(info.value)


# ---------------------------------------------------------------------------------------
# Tracing does not unroll.

def equation_count(jaxpr) -> int:
    """Equations of a jaxpr, those of its sub-jaxprs (scan and loop bodies) included."""
    def sub_jaxprs(value):
        if hasattr(value, "eqns"):
            yield value
        elif hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):  # a ClosedJaxpr
            yield value.jaxpr
        elif isinstance(value, (tuple, list)):
            for item in value:
                yield from sub_jaxprs(item)

    return sum(1 + sum(equation_count(sub) for value in eqn.params.values()
                       for sub in sub_jaxprs(value))
               for eqn in jaxpr.eqns)


@pytest.mark.parametrize("remat", ["keep", "sqrt", "recompute"])
def test_the_traced_program_does_not_grow_with_n(remat):
    block = fnet.chain(fnet.dense(8), fnet.tanh)

    def count(net):
        params = abstract_init(net, (3,))[0]  # ShapeDtypeStructs: tracing needs no values
        x = jax.ShapeDtypeStruct((5, 3), jnp.float64)
        y = jax.ShapeDtypeStruct((5, 1), jnp.float64)
        jaxpr = jax.make_jaxpr(fnet.value_and_grad(net, LOSS, remat=remat))(params, x, y)
        return equation_count(jaxpr.jaxpr)

    def deep(n):
        return fnet.chain(fnet.dense(8), fnet.repeat(block, n), fnet.dense(1))

    def unrolled(n):
        return fnet.chain(fnet.dense(8), *([block] * n), fnet.dense(1))

    small, large = count(deep(4)), count(deep(64))
    assert abs(large - small) <= 8, (small, large)
    u_small, u_large = count(unrolled(4)), count(unrolled(16))
    assert u_large >= u_small + 12 * 2, (u_small, u_large)  # >= 2 equations per extra layer
    assert large < u_large
