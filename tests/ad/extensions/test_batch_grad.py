"""The ``batch_grad`` extension: every example's own gradient from the one backward walk.

For a batch of B examples, l_b = loss(net.apply(params, x[b:b+1]), y[b:b+1]) and
g_b = grad_params l_b. ``fnet.backprop(..., extensions=(fnet.extensions.batch_grad(),))``
returns ``record.extensions["batch_grad"]``, a pytree like params whose leaves are
(B, *leaf shape) = g_b (inside a repeat of n copies: (B, n, *S)), and
``fnet.per_example_grads`` returns the same. The reference everywhere is
``jax.vmap(jax.grad(l_b))`` over the examples, to a relative error of 1e-10 in float64.

Targeted cases: the dense fast rule against the generic per-example pullback (on vector
inputs and on inputs with extra per-example axes); a user layer's own rule is the one used
(and its result is what comes back); repeats under every memory policy, nested repeats,
residuals and nested chains; ``jax.vmap`` over parameter sets and over batches;
``jax.jit`` and eager calls (``chex.variants``); ``fnet.per_example_grads`` against
``batch_grad`` and against its former definition (a vmap of per-example
``value_and_grad``); float32 and bfloat16; and the errors.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

import funcnet as fnet
from funcnet.ad.extensions import _base as extensions_base
from funcnet.ad.extensions._base import per_example_grads_generic

# pytest runs with --import-mode=importlib; conftest puts tests/ on sys.path.
from exactness import assert_close, problem, random_params, rel_err  # noqa: E402

LOSS = fnet.losses.squared_error
POLICIES = ("keep", "sqrt", "recompute")
MODES = {"jit": jax.jit, "eager": lambda fn: fn}


# ---------------------------------------------------------------------------------------
# Helpers.

def batch_grad_fn(net, loss=LOSS, remat="keep"):
    """(params, x, y) -> (batch_grad, record.grads), by one backprop."""
    def fn(params, x, y):
        record = fnet.backprop(net, loss, params, x, y,
                               extensions=(fnet.extensions.batch_grad(),), remat=remat)
        return record.extensions["batch_grad"], record.grads

    return fn


def one_example_grad(net, loss=LOSS):
    """(params, x_b, y_b) -> g_b = grad of example b's own loss, by jax.grad."""
    def fn(params, xb, yb):
        return jax.grad(lambda p: loss(net.apply(p, xb[None]), yb[None]))(params)

    return fn


@functools.lru_cache(maxsize=None)
def reference(net, loss=LOSS):
    """The contract's reference: jax.vmap(jax.grad(l_b)) over the batch, jitted (one per
    net, so that the jitted and eager variants of a test compile it once)."""
    return jax.jit(jax.vmap(one_example_grad(net, loss), in_axes=(None, 0, 0)))




def batch_mean(tree):
    """The mean over the leading (batch) axis, in numpy (no compilation)."""
    return jax.tree.map(lambda g: jnp.asarray(np.mean(np.asarray(g), axis=0)), tree)


def assert_batch_grads(per_example, params, x, y, net, what, loss=LOSS, grads=None):
    """Leaves (B, *leaf shape), equal to the reference; their batch mean equals ``grads``."""
    batch = x.shape[0]
    assert jax.tree.structure(per_example) == jax.tree.structure(params), what
    for g, p in zip(jax.tree.leaves(per_example), jax.tree.leaves(params)):
        assert g.shape == (batch,) + p.shape, (what, g.shape, p.shape)
    assert_close(per_example, reference(net, loss)(params, x, y), what)
    if grads is not None:
        assert_close(batch_mean(per_example), grads, f"{what}: batch mean vs record.grads")


def generic(layer):
    """The same function as ``layer`` as a user layer without rules: batch_grad must take
    the generic per-example pullback for it."""
    return fnet.layer(layer.apply, lambda key, shape: layer.init(key, shape)[0],
                      name=f"generic {layer.name}")


def _scale(w, z):
    return w["scale"][None] * z


def _init_scale(key, in_shape):
    return {"scale": 1.0 + 0.5 * jax.random.normal(key, in_shape[-1:])}


def _scale_rule(layer, params, z, q):
    del layer, params
    return {"scale": z * q}


def _sine(w, z):
    del w
    return jnp.sin(z)


SCALE = fnet.layer(_scale, _init_scale, name="scale")
SCALE_WITH_RULE = fnet.layer(_scale, _init_scale, name="scale with rule",
                             rules={"per_example_grads": _scale_rule})
SINE = fnet.layer(_sine, name="sin")


# ---------------------------------------------------------------------------------------
# Networks of every composition, jitted and eager (chex variants).

def repeat_net():
    return fnet.chain(
        fnet.dense(4),
        fnet.repeat(fnet.chain(fnet.dense(4), fnet.tanh), 4),       # last step deferred
        fnet.repeat(fnet.residual(fnet.chain(fnet.dense(4, bias=False), SCALE)), 3),
        fnet.repeat(SCALE_WITH_RULE, 2),
        fnet.dense(2))


class BatchGradVariants(chex.TestCase):
    """The same assertions under ``jax.jit`` and without it."""

    def check(self, net, in_shape, batch=3, remat="keep", loss=LOSS, seed=0):
        params, x, y = problem(net, in_shape, batch, seed)
        per_example, grads = self.variant(batch_grad_fn(net, loss, remat))(params, x, y)
        what = f"batch_grad of {net.name}, remat={remat}"
        assert_batch_grads(per_example, params, x, y, net, what, loss, grads)
        return params, per_example

    @chex.variants(with_jit=True, without_jit=True)
    def test_dense_and_activations(self):
        net = fnet.chain(fnet.dense(5), fnet.tanh, fnet.dense(4, bias=False), fnet.relu,
                         fnet.flatten, fnet.dense(3))
        params, per_example = self.check(net, (6,), batch=4)
        assert per_example[0]["w"].shape == (4, 6, 5)
        assert per_example[1] == ()

    @chex.variants(with_jit=True, without_jit=True)
    def test_batch_of_one(self):
        self.check(fnet.chain(fnet.dense(3), fnet.sigmoid, fnet.dense(2)), (2,), batch=1)

    @chex.variants(with_jit=True, without_jit=True)
    def test_residual_and_nested_chains(self):
        net = fnet.chain(
            fnet.dense(4),
            fnet.residual(fnet.chain(fnet.dense(3), fnet.gelu, fnet.dense(4))),
            fnet.chain(fnet.chain(fnet.dense(3), fnet.softplus), fnet.residual(fnet.dense(3))),
            fnet.residual(fnet.residual(SCALE_WITH_RULE)),
            fnet.dense(2))
        self.check(net, (5,))

    @chex.variants(with_jit=True, without_jit=True)
    def test_a_net_that_is_not_a_chain(self):
        """A single layer as the net: batch_grad has its params' structure (here the
        inner chain's 3-tuple), not wrapped in a tuple of one layer."""
        net = fnet.residual(fnet.chain(fnet.dense(3), fnet.tanh, fnet.dense(3)))
        params, per_example = self.check(net, (3,))
        assert isinstance(per_example, tuple) and len(per_example) == 3
        self.check(fnet.dense(2), (3,))

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(*POLICIES)
    def test_repeats(self, remat):
        params, per_example = self.check(repeat_net(), (3,), remat=remat)
        assert per_example[1][0]["w"].shape == (3, 4, 4, 4)  # (B, n, fan_in, out)
        assert per_example[3]["scale"].shape == (3, 2, 4)

    @chex.variants(with_jit=True, without_jit=True)
    def test_parameterless_repeat_and_user_layers(self):
        net = fnet.chain(fnet.dense(3), fnet.repeat(fnet.tanh, 3), SINE,
                         fnet.repeat(fnet.residual(SINE), 2), SCALE, fnet.dense(2))
        params, per_example = self.check(net, (2,))
        assert per_example[1] == () and per_example[2] == ()

    @chex.variants(with_jit=True, without_jit=True)
    def test_dense_on_inputs_with_extra_axes(self):
        """Per-example shape (T, D): the dense rule sums over the T rows of each example."""
        net = fnet.chain(fnet.dense(4), fnet.tanh, fnet.dense(3, bias=False),
                         fnet.residual(fnet.dense(3)), fnet.dense(2))
        self.check(net, (5, 6), batch=3)
        self.check(fnet.chain(fnet.dense(4), fnet.flatten, fnet.dense(2)), (3, 2, 6))

    @chex.variants(with_jit=True, without_jit=True)
    def test_per_example_grads_function(self):
        """fnet.per_example_grads equals batch_grad, and its former definition: a vmap of
        the per-example value_and_grad."""
        net = fnet.chain(fnet.dense(3),
                         fnet.repeat(fnet.chain(fnet.dense(3), SCALE_WITH_RULE, fnet.tanh), 4),
                         SCALE, fnet.dense(2))
        params, x, y = problem(net, (3,), batch=4)
        per_example, _ = jax.jit(batch_grad_fn(net, remat="sqrt"))(params, x, y)
        former = jax.jit(jax.vmap(
            lambda p, xb, yb: fnet.value_and_grad(net, LOSS)(p, xb[None], yb[None])[1],
            in_axes=(None, 0, 0)))(params, x, y)
        got = self.variant(fnet.per_example_grads(net, LOSS, remat="sqrt"))(params, x, y)
        assert_close(got, per_example, "per_example_grads vs batch_grad")
        assert_close(got, former, "per_example_grads vs vmapped value_and_grad")
        assert_batch_grads(got, params, x, y, net, "per_example_grads")


@pytest.mark.parametrize("remat", POLICIES)
def test_nested_repeat_and_repeat_as_the_net(remat):
    """A repeat of a chain holding a repeat: leaves (B, n_outer, n_inner, *S); and a
    repeat that is the whole net (batch_grad is its params' structure)."""
    inner = fnet.repeat(fnet.residual(fnet.chain(fnet.dense(3), fnet.tanh)), 2)
    net = fnet.chain(fnet.repeat(fnet.chain(inner, SCALE), 4), fnet.dense(2))
    params, x, y = problem(net, (3,), batch=3)
    per_example, grads = jax.jit(batch_grad_fn(net, remat=remat))(params, x, y)
    assert per_example[0][0][0]["w"].shape == (3, 4, 2, 3, 3)
    assert_batch_grads(per_example, params, x, y, net, f"nested repeat, {remat}", grads=grads)

    net = fnet.repeat(fnet.chain(fnet.dense(3), fnet.sigmoid), 4)
    params, x, y = problem(net, (3,), batch=2)
    per_example, grads = jax.jit(batch_grad_fn(net, remat=remat))(params, x, y)
    assert per_example[0]["w"].shape == (2, 4, 3, 3)
    assert_batch_grads(per_example, params, x, y, net, f"repeat as the net, {remat}",
                       grads=grads)


# ---------------------------------------------------------------------------------------
# The dense rule, the generic rule and a user layer's own rule.

@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("example_shape", [(5,), (3, 5), (2, 3, 5)])
def test_dense_rule_equals_generic_rule(bias, example_shape):
    """Called directly on z (B, *example shape) and q: the same A_b^T q_b."""
    layer = fnet.dense(4, bias=bias)
    rule = layer.rule("per_example_grads")
    assert rule is not None
    rng = np.random.default_rng(0)
    params, out_shape = random_params(layer, example_shape, rng)
    z = jnp.asarray(rng.standard_normal((6,) + example_shape))
    q = jnp.asarray(rng.standard_normal((6,) + out_shape))
    fast = jax.jit(lambda p, z, q: rule(layer, p, z, q))(params, z, q)
    slow = jax.jit(lambda p, z, q: per_example_grads_generic(layer, p, z, q))(params, z, q)
    assert_close(fast, slow, f"dense rule vs generic on per-example shape {example_shape}")
    pullback = jax.vjp(layer.apply, params, z)[1]
    assert_close(jax.tree.map(lambda g: jnp.sum(g, axis=0), fast), pullback(q)[0],
                 "the sum over b of A_b^T q_b vs the pullback's A^T q")


@pytest.mark.parametrize("example_shape", [(5,), (3, 5)])
def test_dense_fast_rule_equals_generic_dense_in_a_network(example_shape):
    """The same net with its dense layers wrapped as user layers (the generic rule): the
    same batch_grad, for the same params."""
    fast_net = fnet.chain(fnet.dense(4), fnet.tanh, fnet.residual(fnet.dense(4, bias=False)),
                          fnet.dense(2))
    generic_net = fnet.chain(generic(fnet.dense(4)), fnet.tanh,
                             fnet.residual(generic(fnet.dense(4, bias=False))),
                             generic(fnet.dense(2)))
    params, x, y = problem(fast_net, example_shape, batch=3)
    fast, _ = jax.jit(batch_grad_fn(fast_net))(params, x, y)
    slow, _ = jax.jit(batch_grad_fn(generic_net))(params, x, y)
    assert_close(fast, slow, "dense fast rule vs the generic rule")
    assert_batch_grads(fast, params, x, y, fast_net, "dense fast rule")


def test_which_rule_runs(monkeypatch):
    """Dense layers and user layers with a rule never take the generic per-example
    pullback; a user layer without one does. (Layers without params may: their share is
    empty.)"""
    generic_calls = []

    def counting_generic(layer, params, z, q):
        if jax.tree.leaves(params):
            generic_calls.append(layer.name)
        return per_example_grads_generic(layer, params, z, q)

    monkeypatch.setattr(extensions_base, "per_example_grads_generic", counting_generic)
    with_rules = fnet.chain(fnet.dense(3), fnet.tanh, SCALE_WITH_RULE,
                            fnet.repeat(fnet.dense(3), 2), fnet.dense(2))
    params, x, y = problem(with_rules, (3,), batch=2)
    per_example, _ = jax.jit(batch_grad_fn(with_rules))(params, x, y)  # a fresh trace
    assert_batch_grads(per_example, params, x, y, with_rules, "rules only")
    assert generic_calls == [], generic_calls

    without = fnet.chain(fnet.dense(3), SCALE, fnet.dense(2))
    params, x, y = problem(without, (3,), batch=2)
    per_example, _ = jax.jit(batch_grad_fn(without))(params, x, y)
    assert_batch_grads(per_example, params, x, y, without, "a user layer without a rule")
    assert generic_calls == ["scale"], generic_calls


@pytest.mark.parametrize("mode, remat", [("jit", remat) for remat in POLICIES]
                         + [("eager", "keep")])
def test_a_user_layers_own_rule_is_used(mode, remat):
    """The rule is called (counted at trace time) with z (B, width) and q (B, width), in a
    chain and inside a repeat, and batch_grad equals the reference."""
    calls = []

    def counting_rule(layer, params, z, q):
        calls.append((layer.name, z.shape, q.shape))
        return _scale_rule(layer, params, z, q)

    scale = fnet.layer(_scale, _init_scale, name="counted scale",
                       rules={"per_example_grads": counting_rule})
    net = fnet.chain(fnet.dense(3), scale, fnet.repeat(fnet.chain(fnet.dense(3), scale), 4),
                     fnet.dense(2))
    params, x, y = problem(net, (2,), batch=5)
    per_example, grads = MODES[mode](batch_grad_fn(net, remat=remat))(params, x, y)
    assert_batch_grads(per_example, params, x, y, net, f"counted rule, {remat}", grads=grads)
    assert calls, "the layer's own per_example_grads rule was never called"
    assert all(call == ("counted scale", (5, 3), (5, 3)) for call in calls), calls


@pytest.mark.parametrize("mode", sorted(MODES))
def test_a_user_layers_rule_result_is_what_comes_back(mode):
    """A deliberately wrong rule (twice the right answer): batch_grad is twice the
    reference at that layer and right elsewhere; record.grads does not use the rule."""
    doubled = fnet.layer(_scale, _init_scale, name="doubling scale",
                         rules={"per_example_grads": lambda layer, params, z, q: {
                             "scale": 2.0 * z * q}})
    net = fnet.chain(fnet.dense(3), doubled, fnet.repeat(doubled, 2), fnet.dense(2))
    params, x, y = problem(net, (2,), batch=3)
    per_example, grads = MODES[mode](batch_grad_fn(net))(params, x, y)
    expected = reference(net)(params, x, y)
    assert_close(per_example[1], jax.tree.map(lambda g: 2.0 * g, expected[1]), "doubled")
    assert_close(per_example[2], jax.tree.map(lambda g: 2.0 * g, expected[2]), "doubled, repeat")
    assert_close((per_example[0], per_example[3]), (expected[0], expected[3]), "dense layers")
    assert_close(grads, batch_mean(expected), "record.grads")


# ---------------------------------------------------------------------------------------
# jax.vmap over parameter sets and over batches.

def vmap_net():
    return fnet.chain(fnet.dense(4), fnet.residual(fnet.chain(SCALE, fnet.tanh)),
                      fnet.repeat(fnet.chain(fnet.dense(4), SCALE_WITH_RULE, fnet.sigmoid), 4),
                      SINE, fnet.dense(2))


@pytest.mark.parametrize("remat", POLICIES)
def test_vmap_over_parameter_sets(remat):
    net = vmap_net()
    sets = [problem(net, (3,), batch=4, seed=seed) for seed in range(3)]
    _, x, y = sets[0]
    params = jax.tree.map(lambda *leaves: jnp.stack(leaves), *(s[0] for s in sets))

    got, grads = jax.jit(jax.vmap(batch_grad_fn(net, remat=remat), in_axes=(0, None, None)))(
        params, x, y)
    expected = jax.jit(jax.vmap(jax.vmap(one_example_grad(net), in_axes=(None, 0, 0)),
                                in_axes=(0, None, None)))(params, x, y)
    for g, p in zip(jax.tree.leaves(got), jax.tree.leaves(params)):
        assert g.shape == (3, 4) + p.shape[1:]
    assert_close(got, expected, f"vmap over 3 parameter sets, remat={remat}")
    assert_close(jax.tree.map(lambda g: jnp.asarray(np.mean(np.asarray(g), axis=1)), got),
                 grads, "batch means vs record.grads")


def test_vmap_over_batches_eager_and_jitted():
    net = fnet.chain(fnet.dense(3), fnet.repeat(fnet.chain(fnet.dense(3), SCALE), 2),
                     SINE, fnet.dense(2))
    params, _, _ = problem(net, (3,), batch=1)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((3, 4, 3)))
    y = jnp.asarray(rng.standard_normal((3, 4, 2)))
    fn = jax.vmap(batch_grad_fn(net, remat="sqrt"), in_axes=(None, 0, 0))
    expected = jax.jit(jax.vmap(jax.vmap(one_example_grad(net), in_axes=(None, 0, 0)),
                                in_axes=(None, 0, 0)))(params, x, y)
    for mode, wrap in MODES.items():
        got, _ = wrap(fn)(params, x, y)
        assert_close(got, expected, f"vmap over 3 batches, {mode}")


# ---------------------------------------------------------------------------------------
# Lower precision: close to the float64 result within the dtype's tolerance.

@pytest.mark.parametrize("dtype, tolerance", [(jnp.float32, 1e-5), (jnp.bfloat16, 5e-2)])
def test_low_precision(dtype, tolerance):
    net = fnet.chain(fnet.dense(6), fnet.tanh, SCALE_WITH_RULE,
                     fnet.repeat(fnet.residual(fnet.chain(fnet.dense(6), fnet.sigmoid)), 2),
                     SCALE, fnet.dense(2))
    params, x, y = problem(net, (4,), batch=5)
    exact, _ = jax.jit(batch_grad_fn(net))(params, x, y)
    cast = jax.tree.map(lambda a: a.astype(dtype), (params, x, y))
    got, grads = jax.jit(batch_grad_fn(net))(*cast)
    for path_leaf, g, e in zip(jax.tree_util.tree_flatten_with_path(got)[0],
                               jax.tree.leaves(got), jax.tree.leaves(exact)):
        where = jax.tree_util.keystr(path_leaf[0])
        assert g.dtype == dtype, (where, g.dtype)
        assert g.shape == e.shape, where
        err = rel_err(np.asarray(g, np.float64), e)
        assert err <= tolerance, f"{jnp.dtype(dtype).name} batch_grad at {where}: {err:.2e}"
    for g in jax.tree.leaves(grads):
        assert g.dtype == dtype


# ---------------------------------------------------------------------------------------
# Errors.

def test_asking_for_the_same_extension_twice_raises():
    net = fnet.chain(fnet.dense(2))
    params, x, y = problem(net, (3,), batch=2)
    with pytest.raises(fnet.ArgumentError, match="extensions: each extension may be asked for once"):
        fnet.backprop(net, LOSS, params, x, y,
                      extensions=(fnet.extensions.batch_grad(), fnet.extensions.batch_grad()))


@pytest.mark.parametrize("not_an_extension", [
    fnet.extensions.BatchGrad,   # the class, not an instance
    fnet.dense(2),               # has a .name, is not an extension
    "batch_grad",
    object(),
    None,
], ids=["class", "layer", "string", "object", "None"])
def test_a_non_extension_raises_argument_error(not_an_extension):
    net = fnet.chain(fnet.dense(2))
    params, x, y = problem(net, (3,), batch=2)
    with pytest.raises(fnet.ArgumentError, match="extensions: must be fnet.extensions"):
        fnet.backprop(net, LOSS, params, x, y, extensions=(not_an_extension,))


def test_bad_remat_and_targets_raise():
    net = fnet.chain(fnet.dense(2))
    params, x, y = problem(net, (3,), batch=2)
    with pytest.raises(fnet.ArgumentError, match="remat: must be one of"):
        fnet.backprop(net, LOSS, params, x, y, extensions=(fnet.extensions.batch_grad(),),
                      remat="everything")
    with pytest.raises(fnet.LayerError, match="one target per example"):
        fnet.per_example_grads(net, LOSS)(params, x, y[:1])
