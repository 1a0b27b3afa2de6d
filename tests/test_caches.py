"""Bounded caches, emptied by fnet.clear_caches(); fit compiles its step once."""

from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import funcnet as fnet
from funcnet._caches import _CACHES, cache_sizes

BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"


class CompileCounter:
    """Counts XLA compilations (JAX's backend-compile events) while active."""

    def __init__(self):
        self.count = 0

    def __call__(self, event, duration, **kwargs):
        if event == BACKEND_COMPILE:
            self.count += 1

    def __enter__(self):
        jax.monitoring.register_event_duration_secs_listener(self)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self)


def _problem():
    net = fnet.chain(fnet.dense(16), fnet.relu, fnet.dense(3))
    params, _ = net.init(jax.random.key(0), (4,))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((64, 4)))
    y = jnp.asarray(rng.integers(0, 3, 64))
    return net, params, x, y


def test_clear_caches_empties_every_cache_and_they_fill_again():
    net, params, x, y = _problem()
    fnet.value_and_grad(net, fnet.losses.softmax_cross_entropy)(params, x, y)  # eager
    fnet.summary(net, (4,))
    assert sum(cache_sizes().values()) > 0
    fnet.clear_caches()
    assert set(cache_sizes().values()) == {0}
    value, _ = fnet.value_and_grad(net, fnet.losses.softmax_cross_entropy)(params, x, y)
    assert np.isfinite(float(value))
    assert sum(cache_sizes().values()) > 0


def test_every_cache_is_bounded():
    assert len(_CACHES) >= 8
    for cache in _CACHES:
        assert cache.cache_info().maxsize is not None, cache


@pytest.mark.standard_promotion
@pytest.mark.parametrize("steps_per_call", [1, "epoch"])
def test_a_second_identical_fit_compiles_nothing(steps_per_call):
    net, params, x, y = _problem()
    loss, optimizer = fnet.losses.softmax_cross_entropy, optax.adam(1e-2)

    def run():
        return fnet.fit(net, loss, optimizer, params, x, y, key=jax.random.key(1), epochs=2,
                        batch_size=16, eval_data=(x, y), progress=False,
                        steps_per_call=steps_per_call)

    with CompileCounter() as first:
        result = run()
    with CompileCounter() as second:
        again = run()
    assert first.count > 0  # the counter does see compilations
    assert second.count == 0, f"{second.count} compilations on the second fit"
    np.testing.assert_array_equal(result.history.step_loss, again.history.step_loss)


@pytest.mark.standard_promotion
def test_fit_without_tqdm_and_progress_false_runs(monkeypatch):
    """tqdm lives in an extra: fit must not need it unless a bar is asked for."""
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tqdm" else real_find_spec(name, *a))
    net, params, x, y = _problem()
    loss = fnet.losses.softmax_cross_entropy
    for progress in (False, None):
        result = fnet.fit(net, loss, optax.sgd(0.1), params, x, y, key=jax.random.key(0),
                          batch_size=32, progress=progress)
        assert result.history.step_loss.shape == (2,)
    with pytest.raises(fnet.ArgumentError, match="^progress: .*pip install tqdm"):
        fnet.fit(net, loss, optax.sgd(0.1), params, x, y, key=jax.random.key(0),
                 batch_size=32, progress=True)
