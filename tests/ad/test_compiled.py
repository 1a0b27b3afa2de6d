"""Calls without jax.jit run compiled per-layer code, and its caches do not grow."""

import jax
import jax.numpy as jnp
import numpy as np

import funcnet as fnet
from funcnet.ad import _compiled, _forward


def _net():
    net = fnet.chain(fnet.dense(16), fnet.relu, fnet.chain(fnet.dense(16), fnet.tanh),
                     fnet.residual(fnet.dense(16)), fnet.dense(3))
    params, _ = net.init(jax.random.key(0), (5,))
    x = jax.random.normal(jax.random.key(1), (8, 5))
    y = jnp.arange(8) % 3
    return net, params, x, y


def _max_diff(a, b):
    return max(float(jnp.max(jnp.abs(u - v))) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_eager_calls_equal_jitted_ones_and_reuse_their_compilations():
    _compiled.compiled_vjp.cache_clear()  # equal layers built by other tests share entries
    net, params, x, y = _net()
    loss = fnet.losses.softmax_cross_entropy
    f = fnet.value_and_grad(net, loss)
    reference = jax.jit(f)(params, x, y)
    first = f(params, x, y)
    layers_cached = _compiled.compiled_vjp.cache_info().currsize
    sizes = {layer: _compiled.compiled_vjp(layer)._cache_size()
             for layer in (net.layers[0], net.layers[4])}
    for _ in range(5):
        again = f(params, x, y)
        assert _max_diff(again, first) == 0.0
    assert _max_diff(first, reference) < 1e-12
    assert _compiled.compiled_vjp.cache_info().currsize == layers_cached
    for layer, size in sizes.items():
        assert _compiled.compiled_vjp(layer)._cache_size() == size
    # one compilation per layer and input shape: dense(16) meets widths 5 and 16
    assert sizes == {net.layers[0]: 2, net.layers[4]: 1}
    assert _compiled.run_pullback._cache_size() >= 1
    pullback_cache = _compiled.run_pullback._cache_size()
    f(params, x, y)
    assert _compiled.run_pullback._cache_size() == pullback_cache


def test_eager_jvp_and_backprop_equal_jitted():
    net, params, x, y = _net()
    loss = fnet.losses.softmax_cross_entropy
    dots = jax.tree.map(jnp.ones_like, params)
    eager = fnet.jvp(net, params, x, dots, jnp.ones_like(x))
    jitted = jax.jit(lambda p, x_: fnet.jvp(net, p, x_, dots, jnp.ones_like(x_)))(params, x)
    assert _max_diff(eager, jitted) < 1e-12
    size = _forward._compiled_jvp.cache_info().currsize
    fnet.jvp(net, params, x, dots, jnp.ones_like(x))
    assert _forward._compiled_jvp.cache_info().currsize == size
    record = fnet.backprop(net, loss, params, x, y)
    record_jit = jax.jit(lambda p: fnet.backprop(net, loss, p, x, y))(params)
    assert _max_diff(record, record_jit) < 1e-12
    np.testing.assert_array_equal(record.activations[0], x)
