"""float32 and bfloat16: the hand-written passes run, keep the params' dtype, and agree
with jax's own transforms to a dtype-appropriate tolerance."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import funcnet as fnet

DTYPES = [
    pytest.param(jnp.float32, 1e-5, id="float32"),
    pytest.param(jnp.bfloat16, 2e-2, id="bfloat16"),
]

LOSSES = ["squared_error", "logistic", "softmax_cross_entropy"]


def _net():
    return fnet.chain(fnet.dense(8), fnet.gelu,
                      fnet.residual(fnet.chain(fnet.dense(8), fnet.tanh)),
                      fnet.dense(4, bias=False), fnet.leaky_relu(0.1), fnet.dense(3))


def _f64(a):
    return np.asarray(a).astype(np.float64)  # numpy handles bfloat16 (ml_dtypes)


def _rel_err(a, b):
    """Normwise relative error of two pytrees, computed in float64."""
    num = math.sqrt(sum(float(np.sum((_f64(u) - _f64(v)) ** 2))
                        for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b))))
    den = math.sqrt(sum(float(np.sum(_f64(v) ** 2)) for v in jax.tree.leaves(b)))
    return num / den if den else num


def _setup(key, dtype, loss_name="squared_error", batch=6):
    net = _net()
    params, _ = net.init(key, (3,))
    params = jax.tree.map(lambda a: a.astype(dtype), params)
    x = jax.random.normal(jax.random.key(1), (batch, 3), dtype)
    raw = jax.random.normal(jax.random.key(2), (batch, 3), dtype)
    if loss_name == "squared_error":
        y = raw
    elif loss_name == "logistic":
        y = (raw > 0).astype(dtype)
    else:
        y = jnp.arange(batch) % 3  # integer labels
    return net, params, x, y


def _assert_dtype_tree(tree, dtype):
    for leaf in jax.tree.leaves(tree):
        assert leaf.dtype == dtype


@pytest.mark.parametrize("dtype, tol", DTYPES)
def test_value_and_grad_keeps_dtype_and_agrees_with_jax(key, dtype, tol):
    """Not jitted: funcnet's eager backward pass against eager jax.value_and_grad."""
    net, params, x, y = _setup(key, dtype)
    loss = fnet.losses.squared_error
    ref_value, ref_grads = jax.value_and_grad(lambda p: loss(net.apply(p, x), y))(params)
    value, grads = fnet.value_and_grad(net, loss)(params, x, y)
    assert value.dtype == dtype
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    _assert_dtype_tree(grads, dtype)
    assert abs(float(value) - float(ref_value)) <= tol * abs(float(ref_value))
    assert _rel_err(grads, ref_grads) <= tol
    only_grads = fnet.grad(net, loss)(params, x, y)
    _assert_dtype_tree(only_grads, dtype)
    assert _rel_err(only_grads, ref_grads) <= tol


@pytest.mark.parametrize("loss_name", LOSSES)
@pytest.mark.parametrize("dtype, tol", DTYPES)
def test_jitted_value_and_grad_keeps_dtype_and_agrees_with_jax(key, dtype, tol, loss_name):
    net, params, x, y = _setup(key, dtype, loss_name)
    loss = getattr(fnet.losses, loss_name)
    ref_value, ref_grads = jax.jit(jax.value_and_grad(
        lambda p, a, b: loss(net.apply(p, a), b)))(params, x, y)
    value, grads = jax.jit(fnet.value_and_grad(net, loss))(params, x, y)
    assert value.dtype == dtype
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    _assert_dtype_tree(grads, dtype)
    assert abs(float(value) - float(ref_value)) <= tol * abs(float(ref_value))
    assert _rel_err(grads, ref_grads) <= tol


@pytest.mark.parametrize("dtype, tol", DTYPES)
def test_low_precision_grads_are_close_to_float64(key, dtype, tol):
    """Not just self-consistent: close to the float64 answer, to the dtype's accuracy."""
    net, params, x, y = _setup(key, dtype)
    p64 = jax.tree.map(lambda a: a.astype(jnp.float64), params)
    x64, y64 = x.astype(jnp.float64), y.astype(jnp.float64)
    _, grads = fnet.value_and_grad(net, fnet.losses.squared_error)(params, x, y)
    _, exact = fnet.value_and_grad(net, fnet.losses.squared_error)(p64, x64, y64)
    bound = 1e-4 if dtype == jnp.float32 else 5e-2
    assert _rel_err(grads, exact) <= bound


@pytest.mark.parametrize("dtype, tol", DTYPES)
def test_backprop_record_keeps_dtype(key, dtype, tol):
    net, params, x, y = _setup(key, dtype)
    record = fnet.backprop(net, fnet.losses.squared_error, params, x, y)
    assert record.value.dtype == dtype
    _assert_dtype_tree(record.grads, dtype)
    _assert_dtype_tree(record.cotangents, dtype)
    _assert_dtype_tree(record.activations, dtype)
    assert len(record.cotangents) == len(record.activations) == len(net.layers) + 1
    ref_x = jax.grad(lambda z: fnet.losses.squared_error(net.apply(params, z), y))(x)
    assert _rel_err(record.cotangents[0], ref_x) <= tol
    _, ref_grads = jax.value_and_grad(
        lambda p: fnet.losses.squared_error(net.apply(p, x), y))(params)
    assert _rel_err(record.grads, ref_grads) <= tol


@pytest.mark.parametrize("dtype, tol", DTYPES)
def test_jvp_keeps_dtype_and_agrees_with_jax(key, dtype, tol):
    net, params, x, _ = _setup(key, dtype)
    params_dot = jax.tree.map(
        lambda a: jax.random.normal(jax.random.key(3), a.shape, a.dtype), params)
    x_dot = jax.random.normal(jax.random.key(4), x.shape, dtype)
    ref_out, ref_dot = jax.jvp(net.apply, (params, x), (params_dot, x_dot))
    for fn in (fnet.jvp, jax.jit(fnet.jvp, static_argnums=0)):
        out, out_dot = fn(net, params, x, params_dot, x_dot)
        assert out.dtype == out_dot.dtype == dtype
        assert out.shape == out_dot.shape == ref_out.shape
        assert _rel_err(out, ref_out) <= tol
        assert _rel_err(out_dot, ref_dot) <= tol
    # one tangent at a time (the other None is zero)
    _, only_x = fnet.jvp(net, params, x, None, x_dot)
    _, ref_only_x = jax.jvp(lambda z: net.apply(params, z), (x,), (x_dot,))
    assert only_x.dtype == dtype and _rel_err(only_x, ref_only_x) <= tol
    _, none = fnet.jvp(net, params, x)
    assert none.dtype == dtype and not np.any(_f64(none))


@pytest.mark.parametrize("dtype, tol", DTYPES)
def test_vjp_keeps_dtype(key, dtype, tol):
    net, params, x, _ = _setup(key, dtype)
    out, pullback = fnet.vjp(net, params, x)
    ct = jax.random.normal(jax.random.key(5), out.shape, dtype)
    ct_params, ct_x = pullback(ct)
    _assert_dtype_tree(ct_params, dtype)
    assert ct_x.dtype == dtype
    _, ref_pullback = jax.vjp(net.apply, params, x)
    ref_params, ref_x = ref_pullback(ct)
    assert _rel_err(ct_params, ref_params) <= tol
    assert _rel_err(ct_x, ref_x) <= tol


def test_per_example_grads_float32(key):
    net, params, x, y = _setup(key, jnp.float32, batch=5)
    loss = fnet.losses.squared_error
    # reference: jax's own per-example gradients, each example's loss on a batch of one
    ref = jax.jit(jax.vmap(jax.grad(lambda p, a, b: loss(net.apply(p, a[None]), b[None])),
                           in_axes=(None, 0, 0)))(params, x, y)
    full = fnet.grad(net, loss)(params, x, y)
    for fn in (fnet.per_example_grads(net, loss), jax.jit(fnet.per_example_grads(net, loss))):
        per = fn(params, x, y)
        assert jax.tree.structure(per) == jax.tree.structure(params)
        for leaf, p in zip(jax.tree.leaves(per), jax.tree.leaves(params)):
            assert leaf.dtype == jnp.float32
            assert leaf.shape == (5,) + p.shape
        per, ref_np = jax.tree.map(np.asarray, per), jax.tree.map(np.asarray, ref)
        for b in range(5):  # each row is that example's own gradient
            row = jax.tree.map(lambda g: g[b], per)
            assert _rel_err(row, jax.tree.map(lambda g: g[b], ref_np)) <= 1e-5
        # the batch mean is the full-batch gradient
        mean = jax.tree.map(lambda g: np.mean(g, axis=0), per)
        assert _rel_err(mean, full) <= 1e-5


def test_per_example_grads_float32_integer_labels(key):
    net, params, x, y = _setup(key, jnp.float32, "softmax_cross_entropy", batch=5)
    loss = fnet.losses.softmax_cross_entropy
    per = jax.jit(fnet.per_example_grads(net, loss))(params, x, y)
    _assert_dtype_tree(per, jnp.float32)
    ref = jax.grad(lambda p: loss(net.apply(p, x[2:3]), y[2:3]))(params)
    assert _rel_err(jax.tree.map(lambda g: np.asarray(g)[2], per), ref) <= 1e-5


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_user_layer_in_low_precision(key, dtype):
    def g(w, z):
        return jnp.sin(z) * w[None, :]

    scale = fnet.layer(g, lambda k, shape: jnp.ones(shape) + 0.1, name="sin_scale")
    net = fnet.chain(fnet.dense(4), scale, fnet.dense(2))
    params, _ = net.init(key, (3,))
    params = jax.tree.map(lambda a: a.astype(dtype), params)
    x = jax.random.normal(jax.random.key(1), (4, 3), dtype)
    y = jax.random.normal(jax.random.key(2), (4, 2), dtype)
    value, grads = jax.jit(fnet.value_and_grad(net, fnet.losses.squared_error))(params, x, y)
    assert value.dtype == dtype
    _assert_dtype_tree(grads, dtype)
    _, ref = jax.value_and_grad(
        lambda p: fnet.losses.squared_error(net.apply(p, x), y))(params)
    assert _rel_err(grads, ref) <= (1e-5 if dtype == jnp.float32 else 2e-2)
