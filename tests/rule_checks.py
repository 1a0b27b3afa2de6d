"""Checks of a layer's fast extension rules (``Layer.rule``), shared by the tests of the
layers beyond the MLP.

:func:`check_rules` compares each rule a layer brings with what the generic rule derives
from per-example pullbacks (``per_example_grads_generic``), in float64 at 1e-10.
:func:`assert_rules_used` runs the backward walk with every extension while the generic
rule is made to fail, so it passes only when every layer with params brings its own.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import funcnet as fnet
from exactness import assert_close
from funcnet.ad.extensions import _base
from layer_checks import EXTENSIONS

QUANTITIES = ("per_example_grads", "per_example_sq_norms", "sum_of_squares")


def _generic(layer, params, z, q):
    """The three quantities from the generic per-example pullbacks a_b."""
    grads = _base.per_example_grads_generic(layer, params, z, q)
    return {
        "per_example_grads": grads,
        "per_example_sq_norms": jax.tree.map(
            lambda a: jnp.sum(jnp.square(a).reshape(a.shape[0], -1), axis=1), grads),
        "sum_of_squares": jax.tree.map(lambda a: jnp.sum(jnp.square(a), axis=0), grads),
    }


def _both(layer, params, z, q):
    rules = {quantity: layer.rule(quantity) for quantity in QUANTITIES}
    missing = [quantity for quantity, rule in rules.items() if rule is None]
    assert not missing, f"{layer.name} brings no rule for {missing}"
    got = {quantity: rule(layer, params, z, q) for quantity, rule in rules.items()}
    return got, _generic(layer, params, z, q)


def check_rules(layer, params, z, q, what: str) -> None:
    """Every quantity of :data:`QUANTITIES` has a rule, equal to the generic one (both
    compiled in one program)."""
    got, expected = jax.jit(_both, static_argnums=0)(layer, params, z, q)
    for quantity in QUANTITIES:
        assert_close(got[quantity], expected[quantity], f"{quantity} rule of {what}")


def assert_rules_used(net, loss, params, x, y, monkeypatch) -> None:
    """Backprop with every extension (jitted, freshly traced) succeeds while the generic
    per-example rule raises: every leaf layer with params used a rule of its own."""

    def generic_called(layer, *args):
        raise AssertionError(f"the generic per-example rule was used for {layer.name}")

    monkeypatch.setattr(_base, "per_example_grads_generic", generic_called)

    def run(p, x_, y_):  # a new function each call: traced again, with the patch in place
        return fnet.backprop(net, loss, p, x_, y_, extensions=EXTENSIONS).extensions

    jax.block_until_ready(jax.jit(run)(params, x, y))
