"""What ``repeat(block, n)`` keeps for its backward pass (``funcnet.ad._repeat_plan``).

The repeat keeps, per copy, only the activations its layers' backward steps need (dense:
its input; tanh, sigmoid, relu, identity: their output, which is the next layer's input;
other activations: their input; any other layer: its recorded pullback), and rebuilds the
pullbacks in the backward scan. Checked here: the plan for typical blocks; exactness
against jax.grad of the same scan and against the unrolled chain for blocks of every
shape of plan, jitted and eager, under the keep and sqrt policies; that one activation
per copy is kept for chain(dense, tanh); and that rebuilding dense's pullback recomputes
no forward product.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest

import funcnet as fnet
from funcnet.nn._layer import abstract_init
from funcnet.ad._repeat_plan import residual_plan

from exactness import assert_close, random_params  # noqa: E402

LOSS = fnet.losses.squared_error
W = 5


def _scale(w, z):
    return z * w["s"][None]


SCALE = fnet.layer(_scale, lambda key, shape: {"s": jnp.ones(shape[-1:])}, name="scale")

PLANS = {
    # block: (needs, kept, last step deferred)
    "dense, tanh": (fnet.chain(fnet.dense(W), fnet.tanh),
                    ("input", "output"), (True, False), True),
    "dense, gelu": (fnet.chain(fnet.dense(W), fnet.gelu),
                    ("input", "input"), (True, True), False),
    "tanh, dense": (fnet.chain(fnet.tanh, fnet.dense(W)),
                    ("output", "input"), (False, True), False),
    "dense, relu, dense, sigmoid": (
        fnet.chain(fnet.dense(W), fnet.relu, fnet.dense(W), fnet.sigmoid),
        ("input", "output", "input", "output"), (True, False, True, False), True),
    "nested: (dense, softplus), residual(dense), identity": (
        fnet.chain(fnet.chain(fnet.dense(W), fnet.softplus), fnet.residual(fnet.dense(W)),
                   fnet.identity),
        ("input", "input", "record", "output"), (True, True, False, False), True),
    "dense": (fnet.dense(W), ("input",), (True,), False),
    "tanh": (fnet.tanh, ("output",), (True,), True),
    "leaky_relu, user layer, flatten": (
        fnet.chain(fnet.leaky_relu(0.1), SCALE, fnet.flatten),
        ("input", "record", "record"), (True, False, False), False),
}


@pytest.mark.parametrize("name", PLANS)
def test_the_plan_keeps_what_each_backward_step_needs(name):
    block, needs, kept, deferred = PLANS[name]
    plan = residual_plan(block)
    assert plan.needs == needs
    assert plan.kept == kept
    assert plan.last_step_deferred == deferred
    assert len(plan.layers) == len(needs)


@pytest.mark.parametrize("n", [1, 4])
@pytest.mark.parametrize("name", PLANS)
def test_grads_and_input_cotangent_equal_jax_and_the_unrolled_chain(name, n):
    """value_and_grad (keep and sqrt) and vjp of chain(dense, repeat(block, n), dense):
    jitted and eager, against jax.value_and_grad / jax.vjp of the net's own apply (a
    scan differentiated by JAX) and funcnet's grads of the unrolled chain."""
    block = PLANS[name][0]
    net = fnet.chain(fnet.dense(W), fnet.repeat(block, n), fnet.dense(2))
    unrolled = fnet.chain(fnet.dense(W), fnet.chain(*[block] * n), fnet.dense(2))
    rng = np.random.default_rng(n)
    params, _ = random_params(net, (3,), rng)
    x = jnp.asarray(rng.standard_normal((4, 3)))
    y = jnp.asarray(rng.standard_normal((4, 2)))
    ct = jnp.asarray(rng.standard_normal((4, 2)))
    unstack = lambda stacked: tuple(jax.tree.map(lambda a, k=k: a[k], stacked)  # noqa: E731
                                    for k in range(n))

    reference = jax.value_and_grad(lambda p: LOSS(net.apply(p, x), y))(params)
    out, jax_pullback = jax.vjp(net.apply, params, x)
    ref_ct = jax_pullback(ct)
    unrolled_params = (params[0], unstack(params[1]), params[2])
    value_u, grads_u = jax.jit(fnet.value_and_grad(unrolled, LOSS))(unrolled_params, x, y)

    for remat in ("keep", "sqrt"):
        fn = fnet.value_and_grad(net, LOSS, remat=remat)
        for how, run in (("jit", jax.jit(fn)), ("eager", fn)):
            what = f"{name}, n={n}, {remat}, {how}"
            value, grads = run(params, x, y)
            assert_close((value, grads), reference, f"value_and_grad vs jax ({what})")
            assert_close((value, (grads[0], unstack(grads[1]), grads[2])), (value_u, grads_u),
                         f"value_and_grad vs unrolled ({what})")
    ours_out, pullback = fnet.vjp(net, params, x)
    assert_close((ours_out, jax.jit(pullback)(ct)), (out, ref_ct), f"vjp vs jax.vjp ({name})")


def _compiled(net, batch, width):
    params = abstract_init(net, (width,))[0]
    x = jax.ShapeDtypeStruct((batch, width), jnp.float64)
    fn = fnet.value_and_grad(net, LOSS)
    return jax.jit(fn).lower(params, x, x).compile()


def _flops(compiled) -> float:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0]
    return float(analysis["flops"])


def test_chain_of_dense_and_tanh_keeps_one_activation_per_copy():
    """repeat(chain(dense(32), tanh), 64) at batch 512 in float64: one (n, B, W) stack
    of activations is 8 MiB. Stacking every jax.vjp residual would keep three (the dense
    input, tanh's y and 1 - y); the plan keeps the dense inputs only, so XLA's temporary
    memory is about one stack."""
    n, batch, width = 64, 512, 32
    one_stack = n * batch * width * 8
    temp = _compiled(fnet.repeat(fnet.chain(fnet.dense(width), fnet.tanh), n), batch,
                     width).memory_analysis().temp_size_in_bytes
    assert one_stack <= temp < 1.5 * one_stack, (temp, one_stack)


def test_rebuilding_the_dense_pullback_recomputes_no_forward_product():
    """Against jax.value_and_grad of the same repeat (JAX's scan autodiff, which stores
    its residuals and recomputes nothing): the same loops, so the same FLOPs (XLA counts
    a loop body once either way). Were the dense forward product recomputed in the
    backward scan, funcnet's would be about 4/3 of JAX's."""
    net = fnet.repeat(fnet.chain(fnet.dense(64), fnet.tanh), 8)
    params = abstract_init(net, (64,))[0]
    x = jax.ShapeDtypeStruct((128, 64), jnp.float64)
    ours = _flops(_compiled(net, 128, 64))
    theirs = _flops(jax.jit(jax.value_and_grad(lambda p, x, y: LOSS(net.apply(p, x), y)))
                    .lower(params, x, x).compile())
    assert 0.95 * theirs < ours < 1.05 * theirs, (ours, theirs)
