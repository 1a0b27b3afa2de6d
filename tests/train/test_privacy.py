"""DP-SGD: the private step against a reference built from jax.vmap(jax.grad), the noise's
law, Poisson sampling in fit (every sampled example used, in chunks), the privacy spent by
dp-accounting, and the arguments."""

import math

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import funcnet as fnet
from funcnet.train import _fit as fit_module
from funcnet.train._privacy import chunk_size, poisson_masks

pytestmark = pytest.mark.standard_promotion  # optax promotes Python floats against int32

LOSS = fnet.losses.softmax_cross_entropy


def _problem(n=40, width=5, classes=3):
    net = fnet.chain(fnet.dense(6), fnet.tanh, fnet.dense(classes))
    params, _ = net.init(jax.random.key(0), (width,))
    x = jax.random.normal(jax.random.key(1), (n, width))
    y = jnp.argmax(x[:, :classes], axis=1).astype(jnp.int32)
    return net, params, x, y


def _clipped_sum_reference(net, params, x, y, max_norm):
    """sum_b c_b g_b from per-example gradients of jax.vmap(jax.grad)."""
    def example_loss(p, xb, yb):
        return LOSS(net.apply(p, xb[None]), yb[None])

    grads = jax.vmap(jax.grad(example_loss), in_axes=(None, 0, 0))(params, x, y)
    norms = jnp.sqrt(sum(jnp.sum(g.reshape(g.shape[0], -1) ** 2, axis=1)
                         for g in jax.tree.leaves(grads)))
    factors = jnp.minimum(1.0, max_norm / norms)
    return jax.tree.map(lambda g: jnp.tensordot(factors, g, axes=1), grads)


def _max_diff(a, b):
    return max(float(jnp.max(jnp.abs(u - v))) for u, v in zip(jax.tree.leaves(a),
                                                                jax.tree.leaves(b)))


def test_private_step_without_noise_is_the_clipped_mean_step():
    net, params, x, y = _problem(n=16)
    optimizer = optax.sgd(0.3)
    step = fnet.train_step(net, LOSS, optimizer, privacy=fnet.dp_sgd(0.5, 0.0))
    state, value = step(fnet.init_train_state(params, optimizer), x, y, jax.random.key(9))
    total = _clipped_sum_reference(net, params, x, y, 0.5)
    expected = jax.tree.map(lambda w, g: w - 0.3 * g / 16, params, total)
    assert _max_diff(state.params, expected) <= 1e-12
    assert abs(float(value) - float(LOSS(net.apply(params, x), y))) <= 1e-12
    assert int(state.step) == 1


def test_private_step_noise_is_gaussian_with_sigma_times_the_norm():
    """(noisy - clean) * B / (lr sigma C) must be standard normal entries: over the 69
    entries here the sample mean is within 4/sqrt(69) of 0 and the sample standard
    deviation within 4 standard errors (1/sqrt(2 * 69)) of 1 (a 4-sigma band: a false
    alarm about once in 15,000 runs; the key is fixed, so the test is deterministic)."""
    net, params, x, y = _problem(n=16)
    optimizer = optax.sgd(1.0)
    clean = fnet.train_step(net, LOSS, optimizer, privacy=fnet.dp_sgd(0.5, 0.0))
    noisy = fnet.train_step(net, LOSS, optimizer, privacy=fnet.dp_sgd(0.5, 2.0))
    key = jax.random.key(4)
    a, _ = clean(fnet.init_train_state(params, optimizer), x, y, key)
    b, _ = noisy(fnet.init_train_state(params, optimizer), x, y, key)
    z = np.concatenate([np.ravel((u - v) * 16 / (2.0 * 0.5))
                        for u, v in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params))])
    assert z.size == 5 * 6 + 6 + 6 * 3 + 3
    assert abs(z.mean()) <= 4 / math.sqrt(z.size)
    assert abs(z.std() - 1) <= 4 / math.sqrt(2 * z.size)
    c, _ = noisy(fnet.init_train_state(params, optimizer), x, y, key)
    assert _max_diff(b.params, c.params) == 0.0  # the same key, the same noise


@pytest.mark.parametrize("chunk", [None, 2], ids=["default chunks", "chunks of 2"])
def test_fit_uses_every_poisson_sampled_example_in_chunks(chunk, monkeypatch):
    """One epoch of private fit with sigma = 0 equals the reference loop over the same
    Poisson samples (batch_size 4, q = 0.1 of 40), in the default chunks (4 + 2 sqrt(4) =
    8 examples) and in chunks of 2, which most samples exceed: accumulated over chunks."""
    if chunk is not None:
        monkeypatch.setattr(fit_module, "chunk_size", lambda batch_size, examples: chunk)
    net, params, x, y = _problem(n=40)
    key, batch_size, lr, max_norm = jax.random.key(5), 4, 0.2, 0.7
    result = fnet.fit(net, LOSS, optax.sgd(lr), params, x, y, key=key, epochs=1,
                      batch_size=batch_size, privacy=fnet.dp_sgd(max_norm, 0.0), progress=False)
    masks, _ = poisson_masks(key, 0, 10, 40, batch_size / 40)
    masks = np.asarray(masks)
    if chunk is not None:
        assert max(masks.sum(axis=1)) > 2 * chunk  # three chunks or more were accumulated
    reference = params
    for row in masks:
        sampled = np.flatnonzero(row)
        if sampled.size:
            total = _clipped_sum_reference(net, reference, x[sampled], y[sampled], max_norm)
            reference = jax.tree.map(lambda w, g: w - lr * g / batch_size, reference, total)
    assert _max_diff(result.params, reference) <= 1e-12
    assert result.history.step_loss.shape == (10,)
    assert int(result.state.step) == 10


def test_fit_reports_the_privacy_spent_by_dp_accounting():
    net, params, x, y = _problem(n=40)
    privacy = fnet.dp_sgd(1.0, 1.3, delta=1e-4)
    result = fnet.fit(net, LOSS, optax.sgd(0.1), params, x, y, key=jax.random.key(0), epochs=3,
                      batch_size=8, privacy=privacy, progress=False)
    epsilons = [row["epsilon"] for row in result.history.epochs]
    assert all(row["delta"] == 1e-4 for row in result.history.epochs)
    assert epsilons == sorted(epsilons) and epsilons[0] > 0
    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(dp_accounting.PoissonSampledDpEvent(
        8 / 40, dp_accounting.GaussianDpEvent(1.3)), 15)
    assert epsilons[-1] == pytest.approx(accountant.get_epsilon(1e-4), rel=1e-12)
    assert fnet.privacy_spent(privacy, 0.2, 15) == epsilons[-1]


def test_chunks_hold_the_expected_sample_and_two_standard_deviations():
    assert chunk_size(256, 60000) == 256 + 32
    assert chunk_size(4, 40) == 8
    assert chunk_size(64, 70) == 70  # never more than the examples there are


def test_privacy_spent_behaves_as_privacy_does():
    more_noise = fnet.privacy_spent(fnet.dp_sgd(1.0, 2.0), 0.01, 1000)
    less_noise = fnet.privacy_spent(fnet.dp_sgd(1.0, 1.0), 0.01, 1000)
    longer = fnet.privacy_spent(fnet.dp_sgd(1.0, 1.0), 0.01, 4000)
    assert 0 < more_noise < less_noise < longer
    assert fnet.privacy_spent(fnet.dp_sgd(1.0, 1.0), 0.01, 0) == 0.0
    assert fnet.privacy_spent(fnet.dp_sgd(1.0, 0.0), 0.01, 10) == math.inf


def test_private_fit_is_deterministic_in_its_key():
    net, params, x, y = _problem(n=40)
    kwargs = dict(epochs=2, batch_size=8, privacy=fnet.dp_sgd(1.0, 1.0), progress=False)
    a = fnet.fit(net, LOSS, optax.sgd(0.1), params, x, y, key=jax.random.key(2), **kwargs)
    b = fnet.fit(net, LOSS, optax.sgd(0.1), params, x, y, key=jax.random.key(2), **kwargs)
    c = fnet.fit(net, LOSS, optax.sgd(0.1), params, x, y, key=jax.random.key(3), **kwargs)
    assert _max_diff(a.params, b.params) == 0.0
    assert _max_diff(a.params, c.params) > 0.0


@pytest.mark.parametrize("args, argument, problem", [
    ((0.0, 1.0), "dp_sgd(max_norm)", "must be positive"),
    ((1.0, -1.0), "dp_sgd(noise_multiplier)", "must be positive"),
    ((1.0, math.nan), "dp_sgd(noise_multiplier)", "must be finite"),
    ((1.0, 1.0, 1.5), "dp_sgd(delta)", "must be below 1"),
    (("1", 1.0), "dp_sgd(max_norm)", "must be a real number"),
])
def test_dp_sgd_settings_are_checked(args, argument, problem):
    with pytest.raises(fnet.ArgumentError) as info:
        fnet.dp_sgd(*args)
    assert info.value.argument == argument and problem in str(info.value)


def test_private_training_refuses_what_it_does_not_support():
    net, params, x, y = _problem(n=40)
    privacy = fnet.dp_sgd(1.0, 1.0)
    with pytest.raises(fnet.ArgumentError, match=r"^privacy: .*steps_per_call=1"):
        fnet.fit(net, LOSS, optax.sgd(0.1), params, x, y, key=jax.random.key(0),
                 batch_size=8, steps_per_call=2, privacy=privacy, progress=False)
    with pytest.raises(fnet.ArgumentError, match=r"^privacy: must be fnet.dp_sgd"):
        fnet.fit(net, LOSS, optax.sgd(0.1), params, x, y, key=jax.random.key(0),
                 batch_size=8, privacy={"max_norm": 1.0}, progress=False)
    step = fnet.train_step(net, LOSS, optax.sgd(0.1), privacy=privacy)
    with pytest.raises(fnet.ArgumentError, match=r"^key: must be one PRNG key"):
        step(fnet.init_train_state(params, optax.sgd(0.1)), x, y, 0)


def test_each_clipped_example_gradient_has_norm_at_most_max_norm():
    """With one example per batch the clipped mean is c_b g_b itself: its norm is
    min(||g_b||, max_norm), never more."""
    net, params, x, y = _problem(n=12)
    clipped = jax.jit(fnet.clipped_value_and_grad(net, LOSS, 2.0))
    norms = fnet.per_example_grad_norms(net, LOSS)(params, x, y)
    assert float(jnp.max(norms)) > 2.0 > float(jnp.min(norms))  # both kinds of example
    for b in range(12):
        _, g = clipped(params, x[b:b + 1], y[b:b + 1])
        norm = math.sqrt(sum(float(jnp.sum(leaf ** 2)) for leaf in jax.tree.leaves(g)))
        assert norm <= 2.0 * (1 + 1e-12)
        assert norm == pytest.approx(min(float(norms[b]), 2.0), rel=1e-10)


def test_noise_differs_between_keys():
    net, params, x, y = _problem(n=16)
    optimizer = optax.sgd(1.0)
    step = fnet.train_step(net, LOSS, optimizer, privacy=fnet.dp_sgd(0.5, 1.0))
    a, _ = step(fnet.init_train_state(params, optimizer), x, y, jax.random.key(1))
    b, _ = step(fnet.init_train_state(params, optimizer), x, y, jax.random.key(2))
    differences = [np.abs(np.asarray(u) - np.asarray(v)) for u, v in
                   zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params))]
    assert all((d > 0).all() for d in differences)  # every entry got its own noise
