"""Compiled per-layer code for calls without ``jax.jit``.

Called eagerly, ``jax.vjp`` would dispatch every operation of every layer one by one
(8-12x slower than jitted code). Instead each leaf layer's forward-with-pullback is
compiled once per layer and input shape and reused; the pullback it returns is a pytree
of residuals that one more compiled function applies. The caches are bounded, keyed on
the (hashable, immutable) layers and losses, and emptied by ``fnet.clear_caches()``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from funcnet._caches import bounded_cache
from funcnet.ad._inputs import check_scalar_loss
from funcnet.nn._layer import Layer, apply_with_key


def is_concrete(*trees) -> bool:
    """True when no leaf is a tracer, i.e. we are not inside jit, vmap or grad."""
    return not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(trees))


@bounded_cache(maxsize=1024)
def compiled_vjp(layer: Layer):
    """``jax.jit`` of ``(params, z, key) -> jax.vjp(layer.apply, params, z)`` (the key, or
    None, passed to a stochastic layer), one per layer."""
    return jax.jit(lambda params, z, key: jax.vjp(
        lambda w, z_: apply_with_key(layer, w, z_, key), params, z))


@jax.jit
def run_pullback(pullback, q):
    """Applies a pullback returned by :func:`compiled_vjp`, compiled."""
    return pullback(q)


def loss_and_seed(loss, out, y):
    """The loss value l_y(z_{L+1}) and the seed of the backward pass q_{L+1} = grad l_y,
    from ``jax.vjp`` of the loss alone seeded with 1."""
    value, loss_pullback = jax.vjp(lambda z: loss(z, y), out)
    check_scalar_loss(value, loss)
    (q,) = loss_pullback(jnp.ones_like(value))
    return value, q


@bounded_cache(maxsize=256)
def compiled_loss_seed(loss):
    """:func:`loss_and_seed` compiled, one per loss."""
    return jax.jit(lambda out, y: loss_and_seed(loss, out, y))
