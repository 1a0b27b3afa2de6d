"""Differentially private training: DP-SGD on the one backward walk, and the privacy it
spends, counted by Google's ``dp-accounting``.

One step of DP-SGD (Abadi et al., 2016) on the examples S of a Poisson sample (each
example in with probability q, independently):

    g~ = ( sum_{b in S} c_b g_b  +  N(0, sigma^2 C^2 I) ) / (q n),  c_b = min(1, C / ||g_b||)

with C the clipping norm ``max_norm``, sigma the ``noise_multiplier`` and q n the expected
batch size (a denominator that does not depend on the data). The clipped sum comes from
one walk per chunk of the sample (:func:`funcnet.ad._per_example.clipped_mean`: the norms
from ``batch_l2``, then A_i^T diag(c) q_{i+1} per layer). ``fit(..., privacy=...)``
implements Poisson sampling and accounts for exactly that: each step is a
``PoissonSampledDpEvent(q, GaussianDpEvent(sigma))``, composed over the steps by the RDP
accountant of ``dp-accounting``, which reports epsilon at the run's delta.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from funcnet._arguments import check_key, check_real
from funcnet._caches import bounded_cache
from funcnet._errors import ArgumentError
from funcnet.ad._per_example import clipped_mean
from funcnet.train._state import TrainState



@dataclasses.dataclass(frozen=True)
class DPSGD:
    """DP-SGD settings: clip every example's gradient to norm ``max_norm`` (C), add
    Gaussian noise of standard deviation ``noise_multiplier * max_norm`` (sigma C) to the
    clipped sum, and report the epsilon spent at ``delta``."""

    max_norm: float
    noise_multiplier: float
    delta: float = 1e-5

    def __post_init__(self):
        for name in ("max_norm", "noise_multiplier", "delta"):
            value = check_real(f"dp_sgd({name})", getattr(self, name))
            if value < 0 or (value == 0 and name != "noise_multiplier"):
                raise ArgumentError(f"dp_sgd({name})", f"must be positive, got {value}.")
            object.__setattr__(self, name, value)
        if self.delta >= 1:
            raise ArgumentError("dp_sgd(delta)", f"must be below 1, got {self.delta} (usually "
                                                 f"well below 1 / the number of examples).")


def dp_sgd(max_norm: float, noise_multiplier: float, delta: float = 1e-5) -> DPSGD:
    """DP-SGD settings for :func:`funcnet.fit` and :func:`funcnet.train_step`
    (``privacy=fnet.dp_sgd(1.0, 1.1)``); see :class:`DPSGD`. A noise multiplier of 0
    clips without noise (no privacy; epsilon is reported as infinite)."""
    return DPSGD(max_norm, noise_multiplier, delta)


def privacy_spent(privacy: DPSGD, sampling_rate: float, steps: int) -> float:
    """epsilon of ``steps`` DP-SGD steps with Poisson sampling rate q at ``privacy.delta``,
    by the RDP accountant of ``dp-accounting`` (infinite without noise, 0 for no step)."""
    rdp_accountant = _accounting().rdp.rdp_privacy_accountant
    if steps == 0:
        return 0.0
    if privacy.noise_multiplier == 0:
        return math.inf
    orders, rdp = _one_step_rdp(float(sampling_rate), privacy.noise_multiplier)
    # RDP adds up over composed steps: `steps` identical steps are steps * rdp, exactly
    # what the accountant's compose(event, count=steps) computes
    epsilon, _ = rdp_accountant.compute_epsilon(orders, [steps * r for r in rdp],
                                                privacy.delta)
    return float(epsilon)


@bounded_cache(maxsize=64)
def _one_step_rdp(sampling_rate: float, noise_multiplier: float):
    """(orders, RDP at each order) of one Poisson-sampled Gaussian step, by dp-accounting's
    RDP accountant (about 0.2 s to compute; cached, as fit asks after every epoch)."""
    accounting = _accounting()
    accountant = accounting.rdp.RdpAccountant()
    accountant.compose(accounting.PoissonSampledDpEvent(
        sampling_rate, accounting.GaussianDpEvent(noise_multiplier)))
    return tuple(accountant.orders), tuple(float(r) for r in accountant.rdp)


def check_privacy(privacy) -> None:
    if not isinstance(privacy, DPSGD):
        raise ArgumentError("privacy", f"must be fnet.dp_sgd(max_norm, noise_multiplier, "
                                       f"delta), got {privacy!r}.")
    _accounting()


def _accounting():
    """The dp-accounting package, an optional dependency (the ``privacy`` extra) imported
    when privacy is first asked for: it brings scipy.stats, which ``import funcnet``
    should not pay for."""
    try:
        import dp_accounting
        from dp_accounting.rdp import rdp_privacy_accountant  # noqa: F401 (its submodule)
    except ImportError:
        raise ArgumentError("privacy", "DP-SGD reports the privacy it spends with "
                                       "dp-accounting, which is not installed: pip install "
                                       "dp-accounting (the privacy extra: pip install -e "
                                       "'.[privacy]').") from None
    return dp_accounting


@bounded_cache(maxsize=32)
def private_step(net, loss, optimizer, remat: str):
    """``(accumulate, update)``, both compiled (once for every clipping norm and noise
    multiplier, which are arguments):

    - ``accumulate(params, x, y, indices, weights, total, loss_total, max_norm, key)``
      adds the clipped sum sum_b w_b c_b g_b and the weighted example losses of the
      examples ``x[indices]`` (weights 1 for sampled ones, 0 for padding) to the running
      totals; ``key`` (None for a net without stochastic layers) draws the dropout masks;
    - ``update(state, total, loss_total, count, key, denominator, noise_std)`` adds noise
      N(0, noise_std^2) (noise_std = sigma C) drawn from ``key`` to the total, divides by
      the denominator and takes the optimizer step (state donated); returns (state, the
      sample's mean loss).
    """

    def accumulate(params, x, y, indices, weights, total, loss_total, max_norm, key=None):
        x_chunk, y_chunk = x[indices], jax.tree.map(lambda t: t[indices], y)
        record, _, mean = clipped_mean(net, loss, max_norm, remat, params, x_chunk, y_chunk,
                                       weights, key)
        size = weights.shape[0]
        total = jax.tree.map(lambda t, g: t + g * size, total, mean)
        losses = jax.vmap(lambda o, t: loss(o[None], jax.tree.map(lambda a: a[None], t)))(
            record.activations[-1], y_chunk)
        return total, loss_total + jnp.sum(losses * weights)

    def update(state: TrainState, total, loss_total, count, key, denominator, noise_std):
        grads = jax.tree.map(lambda g: g / denominator, _noised(total, key, noise_std))
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(params, opt_state, state.step + 1), loss_total / jnp.maximum(count, 1)

    return jax.jit(accumulate, donate_argnums=(5, 6)), jax.jit(update, donate_argnums=0)


def _noised(total, key, noise_std):
    """total + N(0, noise_std^2) entrywise, one key per leaf."""
    leaves, treedef = jax.tree.flatten(total)
    keys = jax.random.split(key, max(len(leaves), 1))
    return jax.tree.unflatten(treedef, [
        leaf + noise_std * jax.random.normal(k, leaf.shape, leaf.dtype)
        for k, leaf in zip(keys, leaves)])


def private_train_step(net, loss, optimizer, privacy: DPSGD, remat: str):
    """``step(state, x, y, key) -> (state, mean loss)``: DP-SGD on the whole batch given
    (denominator: its size), the noise drawn from ``key`` (from ``jax.random.split(key)``'s
    first key, and the dropout masks from its second, when the net holds dropout); see
    :func:`private_step`."""
    accumulate, update = private_step(net, loss, optimizer, remat)

    def step(state: TrainState, x, y, key):
        check_key("key", key)
        dropout_key = None
        if net.stochastic:
            key, dropout_key = jax.random.split(key)
        batch = jnp.shape(x)[0]
        total, loss_total = accumulate(state.params, x, y, jnp.arange(batch),
                                       jnp.ones((batch,), jnp.float32),
                                       zeros_like_tree(state.params), jnp.zeros((), jnp.float32),
                                       privacy.max_norm, dropout_key)
        return update(state, total, loss_total, batch, key, batch, noise_std(privacy))

    return step


def noise_std(privacy: DPSGD) -> float:
    """sigma C, the standard deviation of the noise added to the clipped sum."""
    return privacy.noise_multiplier * privacy.max_norm


def chunk_size(batch_size: int, examples: int) -> int:
    """How many examples one compiled walk of fit's private step takes: the expected
    sample size plus two of its standard deviations (about sqrt(batch_size)), so that a
    Poisson sample needs a second, mostly padded chunk only about 2% of the time."""
    return min(examples, batch_size + math.ceil(2 * math.sqrt(batch_size)))


@jax.jit
def zeros_like_tree(tree):
    """Zeros shaped like ``tree`` (one compiled program per layout)."""
    return jax.tree.map(jnp.zeros_like, tree)


def poisson_sample(mask_row: np.ndarray, chunk: int) -> Tuple[np.ndarray, np.ndarray, int]:
    """The sampled examples (``mask_row`` True) as fixed-size chunks: (indices, weights)
    of length ``chunk * k`` (k >= 1 chunks; padding: index 0, weight 0) and the count.
    Every sampled example is used: nothing is truncated."""
    sampled = np.flatnonzero(mask_row)
    count = len(sampled)
    chunks = max(1, -(-count // chunk))
    indices = np.zeros(chunks * chunk, np.int32)
    weights = np.zeros(chunks * chunk, np.float32)
    indices[:count], weights[:count] = sampled, 1
    return indices, weights, count


@functools.partial(jax.jit, static_argnums=(2, 3))
def poisson_masks(key, epoch, steps: int, n: int, rate):
    """Epoch ``epoch``'s Poisson samples: a (steps, n) bool array, entry (t, j) True when
    example j is in step t's sample (probability ``rate``, independently), and the key
    of the epoch's noise (step t's noise: ``jax.random.fold_in(noise_key, t)``)."""
    sample_key, noise_key = jax.random.split(jax.random.fold_in(key, epoch))
    return jax.random.uniform(sample_key, (steps, n)) < rate, noise_key
