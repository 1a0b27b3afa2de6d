"""Property tests: funcnet's hand-written derivatives equal JAX's, exactly, in float64.

Over random networks (tests/strategies.py), with and without ``jax.jit``, every result is
compared with the corresponding ``jax`` transform of ``net.apply`` to a relative error of
at most 1e-10 (see :func:`rel_err`), leaf by leaf:

  1. value_and_grad / grad        vs jax.value_and_grad
  2. backprop's z_i and q_i       vs running the layers one by one, and jax.grad at each z_i
  3. vjp pullbacks                vs jax.vjp; and <J v, u> = <v, J^T u> (jvp against vjp)
  4. jvp (both tangents, params only, input only) vs jax.jvp
  5. jacobian (input/params x forward/reverse), layer_jacobians vs jax.jacfwd
  6. per_example_grads            vs jax.vmap(jax.grad) of one-example losses; its batch
                                  mean vs fnet.grad
  7. jax.vmap of fnet.jacobian over a batch vs jax.jacfwd per example.
  8. backprop's batch_grad extension, under a drawn memory policy, vs jax.vmap(jax.grad)
     of one-example losses; its batch mean vs backprop's own grads.

The random networks include user layers (``fnet.layer``, some with their own
``per_example_grads`` rule) and repeats (tests/strategies.py).
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import funcnet as fnet

# pytest runs with --import-mode=importlib, which puts no test directory on sys.path.
from strategies import cases, top_level_layers  # noqa: E402

TOL = 1e-10
TINY = 1e-300

# Whether funcnet runs under jax.jit or eagerly is drawn per example (the references are
# always jitted: compiling once is far cheaper than compiling op by op).
JIT = st.booleans()
REMAT = st.sampled_from(["keep", "sqrt", "recompute"])

# Examples per property (@settings below) are set so that the file takes about 3 minutes
# of CPU (the whole suite has to stay near 15 minutes on 2 cores): every example compiles
# (XLA, or op by op when eager) for its own fresh network; the examples are derandomized,
# so every run checks the same networks.

# Jacobians are materialised: n_params x n_out entries. Keep those networks small.
SMALL = dict(max_depth=5, max_width=10, max_batch=4)


# ---------------------------------------------------------------------------------------
# Helpers.

def rel_err(a, b) -> float:
    """max |a - b| / max(max |b|, tiny) over all leaves of two pytrees of the same structure."""
    a_leaves, b_leaves = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(a_leaves) == len(b_leaves)
    num = max((float(np.max(np.abs(np.asarray(x) - np.asarray(y)), initial=0.0))
               for x, y in zip(a_leaves, b_leaves)), default=0.0)
    den = max((float(np.max(np.abs(np.asarray(y)), initial=0.0)) for y in b_leaves),
              default=0.0)
    return num / max(den, TINY)


def assert_close(actual, expected, what: str, case=None) -> None:
    """Same tree structure, same leaf shapes and dtypes, and rel_err <= TOL on every leaf."""
    context = f"{what} ({case.description})" if case is not None else what
    assert jax.tree.structure(actual) == jax.tree.structure(expected), (
        f"{context}: structure {jax.tree.structure(actual)} != {jax.tree.structure(expected)}"
    )
    paths_and_leaves = jax.tree_util.tree_flatten_with_path(expected)[0]
    for (path, e), a in zip(paths_and_leaves, jax.tree.leaves(actual)):
        where = f"{context} at {jax.tree_util.keystr(path) or 'the leaf'}"
        assert jnp.shape(a) == jnp.shape(e), f"{where}: shape {jnp.shape(a)} != {jnp.shape(e)}"
        assert jnp.result_type(a) == jnp.result_type(e), (
            f"{where}: dtype {jnp.result_type(a)} != {jnp.result_type(e)}"
        )
        err = rel_err(a, e)
        assert err <= TOL, f"{where}: relative error {err:.3e} > {TOL:g}"
    assert rel_err(actual, expected) <= TOL


def maybe_jit(fn, jit: bool):
    return jax.jit(fn) if jit else fn


def random_like(rng: np.random.Generator, tree):
    """A standard-normal pytree with the structure, shapes and dtypes of ``tree``."""
    return jax.tree.map(
        lambda leaf: jnp.asarray(rng.standard_normal(jnp.shape(leaf)), jnp.result_type(leaf)),
        tree)


def vdot(a, b) -> float:
    """<a, b> summed over all leaves of two pytrees (in numpy: no compilation)."""
    return float(sum(np.vdot(np.asarray(x), np.asarray(y))
                     for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))))


def norm(a) -> float:
    return float(np.sqrt(vdot(a, a)))


def take(tree, b):
    """Entry b of the leading axis of every leaf, sliced in numpy (no compilation)."""
    return jax.tree.map(lambda leaf: jnp.asarray(np.asarray(leaf)[b]), tree)


def has_params(params) -> bool:
    return bool(jax.tree.leaves(params))


def single_example_fns(net):
    """(x_i, params) -> net(params, x_i[None])[0], as functions of the input and the params."""
    def of_input(xi, params):
        return net.apply(params, xi[None])[0]

    def of_params(params, xi):
        return net.apply(params, xi[None])[0]

    return of_input, of_params


# ---------------------------------------------------------------------------------------
# 1. value_and_grad and grad.

@settings(max_examples=12)
@given(case=cases(), jit=JIT)
def test_value_and_grad_matches_jax(case, jit):
    net, loss = case.net, case.loss

    def ours(params, x, y):
        value, grads = fnet.value_and_grad(net, loss)(params, x, y)
        return value, grads, fnet.grad(net, loss)(params, x, y)

    @jax.jit
    def reference(params, x, y):
        return jax.value_and_grad(lambda p: loss(net.apply(p, x), y))(params)

    value, grads, grads_only = maybe_jit(ours, jit)(case.params, case.x, case.y)
    ref_value, ref_grads = reference(case.params, case.x, case.y)

    assert jax.tree.structure(grads) == jax.tree.structure(case.params)
    assert [jnp.shape(g) for g in jax.tree.leaves(grads)] == [
        jnp.shape(p) for p in jax.tree.leaves(case.params)]
    assert jnp.shape(value) == ()
    assert_close(value, ref_value, "value", case)
    assert_close(grads, ref_grads, "grads", case)
    assert_close(grads_only, ref_grads, "fnet.grad", case)


# ---------------------------------------------------------------------------------------
# 2. backprop: activations z_1..z_{L+1} and cotangents q_1..q_{L+1}.

@settings(max_examples=12)
@given(case=cases(), jit=JIT)
def test_backprop_activations_and_cotangents(case, jit):
    net, loss = case.net, case.loss
    layers, _ = top_level_layers(net, case.params)
    depth = len(layers)

    @jax.jit
    def reference(params, x, y):
        layers, layer_params = top_level_layers(net, params)
        zs = [x]  # z_1 = x, z_{i+1} = g_i(w_i; z_i), layer by layer
        for layer, w in zip(layers, layer_params):
            zs.append(layer.apply(w, zs[-1]))

        def tail(z, i):  # run layers i..L from z_i, then the loss
            for layer, w in zip(layers[i:], layer_params[i:]):
                z = layer.apply(w, z)
            return loss(z, y)

        qs = [jax.grad(tail)(zs[i], i) for i in range(depth + 1)]  # q_i = d loss / d z_i
        grads = jax.grad(lambda p: loss(net.apply(p, x), y))(params)
        return tuple(zs), tuple(qs), loss(zs[-1], y), grads

    record = maybe_jit(lambda p, x, y: fnet.backprop(net, loss, p, x, y), jit)(
        case.params, case.x, case.y)
    zs, qs, value, grads = reference(case.params, case.x, case.y)

    assert len(record.activations) == depth + 1
    assert len(record.cotangents) == depth + 1
    assert_close(tuple(record.activations), zs, "activations z_1..z_{L+1}", case)
    assert_close(tuple(record.cotangents), qs, "cotangents q_1..q_{L+1}", case)
    assert_close(record.value, value, "value", case)
    assert_close(record.grads, grads, "grads", case)


# ---------------------------------------------------------------------------------------
# 3. vjp, and the dot-product test against jvp.

@settings(max_examples=12)
@given(case=cases(), jit=JIT)
def test_vjp_matches_jax(case, jit):
    net = case.net

    def ours(params, x, ct):
        out, pullback = fnet.vjp(net, params, x)
        return out, pullback(ct)

    @jax.jit
    def reference(params, x, ct):
        out, pullback = jax.vjp(net.apply, params, x)
        return out, pullback(ct)

    out_shape = jax.eval_shape(net.apply, case.params, case.x).shape
    ct = jnp.asarray(case.rng().standard_normal(out_shape))
    out, (ct_params, ct_x) = maybe_jit(ours, jit)(case.params, case.x, ct)
    ref_out, (ref_ct_params, ref_ct_x) = reference(case.params, case.x, ct)

    assert_close(out, ref_out, "out", case)
    assert jax.tree.structure(ct_params) == jax.tree.structure(case.params)
    assert_close(ct_params, ref_ct_params, "ct_params", case)
    assert_close(ct_x, ref_ct_x, "ct_x", case)


@settings(max_examples=12)
@given(case=cases(), jit=JIT)
def test_dot_product_jvp_against_vjp(case, jit):
    """<J v, u> = <v, J^T u> for v = (params_dot, x_dot) and a random cotangent u."""
    net = case.net
    rng = case.rng()
    params_dot = random_like(rng, case.params)
    x_dot = random_like(rng, case.x)
    u = random_like(rng, jax.eval_shape(net.apply, case.params, case.x))

    def both(params, x, params_dot, x_dot, u):
        _, out_dot = fnet.jvp(net, params, x, params_dot, x_dot)
        _, pullback = fnet.vjp(net, params, x)
        ct_params, ct_x = pullback(u)
        return out_dot, ct_params, ct_x

    out_dot, ct_params, ct_x = maybe_jit(both, jit)(case.params, case.x, params_dot, x_dot, u)
    lhs = vdot(out_dot, u)
    rhs = vdot(params_dot, ct_params) + vdot(x_dot, ct_x)
    # Cauchy-Schwarz scales for either side; both products are sums of many terms.
    scale = max(norm(out_dot) * norm(u), norm((params_dot, x_dot)) * norm((ct_params, ct_x)),
                TINY)
    assert abs(lhs - rhs) <= TOL * scale, (case.description, lhs, rhs)
    # the test is not vacuous: J v is nonzero unless the net maps to a constant here
    assert norm(out_dot) > 0 or norm((ct_params, ct_x)) == 0


def test_vjp_pullback_can_be_returned_from_jit():
    """The pullback is documented as a pytree (a jax.tree_util.Partial), as jax.vjp's is:
    jax.jit(lambda p, x: fnet.vjp(net, p, x)) must be able to return it."""
    net = fnet.chain(fnet.dense(3), fnet.tanh, fnet.residual(fnet.dense(3)))
    params, _ = net.init(jax.random.key(0), (2,))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 2)))
    out, pullback = jax.jit(lambda p, x: fnet.vjp(net, p, x))(params, x)
    ct = jnp.ones_like(out)
    assert_close(pullback(ct), jax.vjp(net.apply, params, x)[1](ct), "pullback from jit")


# ---------------------------------------------------------------------------------------
# 4. jvp, with both tangents and with either one left out (None).

@settings(max_examples=12)
@given(case=cases(), jit=JIT)
def test_jvp_matches_jax(case, jit):
    net, params, x = case.net, case.params, case.x
    rng = case.rng()
    params_dot, x_dot = random_like(rng, params), random_like(rng, x)

    def ours(params, x, params_dot, x_dot):
        return (fnet.jvp(net, params, x, params_dot, x_dot),
                fnet.jvp(net, params, x, None, x_dot),
                fnet.jvp(net, params, x, params_dot, None))

    @jax.jit
    def reference(params, x, params_dot, x_dot):
        both = jax.jvp(net.apply, (params, x), (params_dot, x_dot))
        input_only = jax.jvp(lambda x_: net.apply(params, x_), (x,), (x_dot,))
        params_only = jax.jvp(lambda p_: net.apply(p_, x), (params,), (params_dot,))
        return both, input_only, params_only

    got = maybe_jit(ours, jit)(params, x, params_dot, x_dot)
    expected = reference(params, x, params_dot, x_dot)
    names = ("both tangents", "params_dot=None", "x_dot=None")
    for name, (out, out_dot), (ref_out, ref_out_dot) in zip(names, got, expected):
        assert_close(out, ref_out, f"jvp out, {name}", case)
        assert_close(out_dot, ref_out_dot, f"jvp out_dot, {name}", case)


# ---------------------------------------------------------------------------------------
# 5. Jacobians of one example.

def reference_jacobians(net, with_params: bool):
    """jax.jacfwd of the single-example function, w.r.t. the input (and the params)."""
    of_input, of_params = single_example_fns(net)

    @jax.jit
    def reference(params, xi):
        jac_input = jax.jacfwd(of_input)(xi, params)
        # (jax.jacfwd itself cannot differentiate w.r.t. a pytree without leaves)
        return jac_input, jax.jacfwd(of_params)(params, xi) if with_params else None

    return reference


@settings(max_examples=9)
@given(case=cases(**SMALL), jit=JIT)
def test_jacobian_matches_jacfwd(case, jit):
    net, params = case.net, case.params
    xi = take(case.x, -1)
    with_params = has_params(params)

    def ours(params, xi):
        result = {}
        for mode in ("forward", "reverse"):
            result["input", mode] = fnet.jacobian(net, params, xi, wrt="input", mode=mode)
            if with_params:
                result["params", mode] = fnet.jacobian(net, params, xi, wrt="params",
                                                       mode=mode)
        return result

    got = maybe_jit(ours, jit)(params, xi)
    ref_input, ref_params = reference_jacobians(net, with_params)(params, xi)
    out_width = ref_input.shape[0]
    assert ref_input.shape == (out_width,) + xi.shape
    for mode in ("forward", "reverse"):
        assert_close(got["input", mode], ref_input, f"jacobian wrt input, {mode}", case)
        if with_params:
            jac = got["params", mode]
            assert jax.tree.structure(jac) == jax.tree.structure(params)
            for leaf, p in zip(jax.tree.leaves(jac), jax.tree.leaves(params)):
                assert leaf.shape == (out_width,) + p.shape
            assert_close(jac, ref_params, f"jacobian wrt params, {mode}", case)


@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_jacobian_wrt_params_of_parameterless_net(mode):
    """A net without parameters has an empty Jacobian w.r.t. params: params' own (empty)
    structure, in either mode."""
    net = fnet.chain(fnet.tanh, fnet.chain(fnet.relu))
    params, _ = net.init(jax.random.key(0), (3,))
    jac = fnet.jacobian(net, params, jnp.ones((3,)), wrt="params", mode=mode)
    assert jax.tree.structure(jac) == jax.tree.structure(params)
    assert jax.tree.leaves(jac) == []


@settings(max_examples=9)
@given(case=cases(**SMALL), jit=JIT)
def test_layer_jacobians_match_jacfwd(case, jit):
    net, params = case.net, case.params
    xi = take(case.x, -1)
    layers, _ = top_level_layers(net, params)

    @jax.jit
    def reference(params, xi):
        layers, layer_params = top_level_layers(net, params)
        z, pairs = xi, []
        for layer, w in zip(layers, layer_params):
            def g(w_, z_, layer=layer):
                return layer.apply(w_, z_[None])[0]
            a = jax.jacfwd(g, argnums=0)(w, z) if has_params(w) else None
            pairs.append((a, jax.jacfwd(g, argnums=1)(w, z)))
            z = g(w, z)
        return tuple(pairs)

    pairs = maybe_jit(lambda p, xi: fnet.layer_jacobians(net, p, xi), jit)(params, xi)
    ref_pairs = reference(params, xi)
    assert isinstance(pairs, tuple) and len(pairs) == len(layers)

    _, layer_params = top_level_layers(net, params)
    for index, (layer, w, (a, b), (ref_a, ref_b)) in enumerate(
            zip(layers, layer_params, pairs, ref_pairs)):
        what = f"layer {index} ({layer.name})"
        assert_close(b, ref_b, f"B of {what}", case)
        if has_params(w):
            assert_close(a, ref_a, f"A of {what}", case)
        else:  # a parameterless layer (or a chain of them): A is its empty params
            assert jax.tree.structure(a) == jax.tree.structure(w), what
            assert jax.tree.leaves(a) == [], what
    # B_i has shape out_shape_i + in_shape_i: consecutive blocks chain up, from x's shape
    assert pairs[0][1].shape[1:] == xi.shape
    for (_, b), (_, b_next) in zip(pairs, pairs[1:]):
        assert b.shape[0] == b_next.shape[1]


def per_example_reference(net, loss):
    """The contract's per-example gradients by JAX alone: jax.vmap over the examples of
    jax.grad of each example's own loss, jitted."""
    def one_example_grad(params, xb, yb):
        return jax.grad(lambda p: loss(net.apply(p, xb[None]), yb[None]))(params)

    return jax.jit(jax.vmap(one_example_grad, in_axes=(None, 0, 0)))


# ---------------------------------------------------------------------------------------
# 6. Per-example gradients.

@settings(max_examples=9)
@given(case=cases(), jit=JIT)
def test_per_example_grads(case, jit):
    net, loss = case.net, case.loss

    def ours(params, x, y):
        return (fnet.per_example_grads(net, loss)(params, x, y),
                fnet.grad(net, loss)(params, x, y))

    reference = per_example_reference(net, loss)

    per_example, full = maybe_jit(ours, jit)(case.params, case.x, case.y)
    ref = reference(case.params, case.x, case.y)
    batch = case.x.shape[0]
    assert jax.tree.structure(per_example) == jax.tree.structure(case.params)
    for g, p in zip(jax.tree.leaves(per_example), jax.tree.leaves(case.params)):
        assert g.shape == (batch,) + p.shape
    assert_close(per_example, ref, "per-example grads", case)
    mean = jax.tree.map(lambda g: jnp.asarray(np.mean(np.asarray(g), axis=0)), per_example)
    assert_close(mean, full, "batch mean of per-example grads vs fnet.grad", case)


# ---------------------------------------------------------------------------------------
# 7. jax.vmap of fnet.jacobian over a batch of examples.

@settings(max_examples=9)
@given(case=cases(**SMALL), jit=JIT, mode=st.sampled_from(["forward", "reverse"]))
def test_vmapped_jacobian_matches_jacfwd_per_example(case, jit, mode):
    net, params, x = case.net, case.params, case.x
    with_params = has_params(params)

    def ours(params, x):
        jac_input = jax.vmap(
            lambda xi: fnet.jacobian(net, params, xi, wrt="input", mode=mode))(x)
        if not with_params:  # (see test_jacobian_wrt_params_of_parameterless_net)
            return jac_input, None
        jac_params = jax.vmap(
            lambda xi: fnet.jacobian(net, params, xi, wrt="params", mode=mode))(x)
        return jac_input, jac_params

    jac_input, jac_params = maybe_jit(ours, jit)(params, x)
    reference = reference_jacobians(net, with_params)
    for b in range(x.shape[0]):
        ref_input, ref_params = reference(params, take(x, b))
        assert_close(take(jac_input, b), ref_input,
                     f"vmapped jacobian wrt input, {mode}, example {b}", case)
        if with_params:
            assert_close(take(jac_params, b), ref_params,
                         f"vmapped jacobian wrt params, {mode}, example {b}", case)


# ---------------------------------------------------------------------------------------
# 8. The batch_grad extension of backprop, under every memory policy.

@settings(max_examples=6)
@given(case=cases(), jit=JIT, remat=REMAT)
def test_batch_grad_matches_vmapped_grad(case, jit, remat):
    """record.extensions["batch_grad"] leaf b is g_b = grad of example b's own loss, leaves
    (B, *leaf shape) ((B, n, *S) inside a repeat of n copies); its batch mean is
    record.grads."""
    net, loss = case.net, case.loss

    def ours(params, x, y):
        record = fnet.backprop(net, loss, params, x, y,
                               extensions=(fnet.extensions.batch_grad(),), remat=remat)
        return record.extensions["batch_grad"], record.grads

    reference = per_example_reference(net, loss)

    per_example, grads = maybe_jit(ours, jit)(case.params, case.x, case.y)
    ref = reference(case.params, case.x, case.y)
    batch = case.x.shape[0]
    what = f"batch_grad, remat={remat}, {'jit' if jit else 'eager'}"
    assert jax.tree.structure(per_example) == jax.tree.structure(case.params), what
    for g, p in zip(jax.tree.leaves(per_example), jax.tree.leaves(case.params)):
        assert g.shape == (batch,) + p.shape, (what, g.shape, p.shape)
    assert_close(per_example, ref, what, case)
    mean = jax.tree.map(lambda g: jnp.asarray(np.mean(np.asarray(g), axis=0)), per_example)
    assert_close(mean, grads, f"batch mean of {what} vs record.grads", case)
