"""self_attention: values against a plain per-head formula, causal masking, derivatives
and every extension against JAX in float64 (transformer blocks: residual attention and
MLP blocks, repeated), its fast rules against the generic ones, arguments, shapes, FLOPs
and equality."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import Phase, example, given, settings
from hypothesis import strategies as st

import funcnet as fnet
from exactness import assert_close, random_params
from layer_checks import POLICIES, check_network
from rule_checks import assert_rules_used, check_rules

# Each example of the whole-network checks compiles several programs: a failure is
# reported as drawn rather than shrunk for minutes.
NO_SHRINK = (Phase.explicit, Phase.reuse, Phase.generate)


@st.composite
def configs(draw, max_steps=4):
    """(num_heads, causal, T, D) with D a multiple of the heads."""
    heads, causal = draw(st.integers(1, 3)), draw(st.booleans())
    steps, head_width = draw(st.integers(1, max_steps)), draw(st.integers(1, 2))
    return heads, causal, steps, heads * head_width


def reference(params, z, heads, causal):
    """DESIGN.md's formula, one example, head and position at a time, in numpy."""
    p = jax.tree.map(np.asarray, params)
    batch, steps, features = z.shape
    width = features // heads
    out = np.empty_like(z)
    for b in range(batch):
        u = z[b] @ p["qkv"]["w"] + p["qkv"]["b"]
        q, k, v = u[:, :features], u[:, features:2 * features], u[:, 2 * features:]
        heads_out = []
        for h in range(heads):
            cols = slice(h * width, (h + 1) * width)
            a = np.zeros((steps, width))
            for i in range(steps):
                seen = range(i + 1) if causal else range(steps)
                scores = np.array([q[i, cols] @ k[j, cols] / math.sqrt(width) for j in seen])
                weights = np.exp(scores - scores.max())
                weights /= weights.sum()
                a[i] = sum(w * v[j, cols] for w, j in zip(weights, seen))
            heads_out.append(a)
        out[b] = np.concatenate(heads_out, axis=1) @ p["out"]["w"] + p["out"]["b"]
    return out


@settings(max_examples=15)
@given(config=configs(), batch=st.integers(1, 3), seed=st.integers(0, 99))
def test_values_match_the_per_head_formula(config, batch, seed):
    heads, causal, steps, features = config
    layer = fnet.self_attention(heads, causal)
    rng = np.random.default_rng(seed)
    params, _ = random_params(layer, (steps, features), rng)
    z = rng.standard_normal((batch, steps, features))
    out = jax.jit(layer.apply)(params, jnp.asarray(z))
    assert_close(out, reference(params, z, heads, causal), layer.name)


@settings(max_examples=4)
@given(heads=st.integers(1, 2), steps=st.integers(2, 4), seed=st.integers(0, 99))
def test_causal_outputs_do_not_depend_on_later_positions(heads, steps, seed):
    rng = np.random.default_rng(seed)
    z = jnp.asarray(rng.standard_normal((1, steps, 2 * heads)))
    later = np.triu(np.ones((steps, steps), dtype=bool), k=1)  # j > i
    for causal in (True, False):
        layer = fnet.self_attention(heads, causal)
        params, _ = random_params(layer, (steps, 2 * heads), rng)
        # |d out[i] / d z[j]| summed over the features, for every pair of positions
        jac = jax.jit(jax.jacfwd(layer.apply, argnums=1))(params, z)[0, :, :, 0]
        dependence = np.abs(np.asarray(jac)).sum(axis=(1, 3))
        if causal:
            assert np.all(dependence[later] == 0), dependence
            assert np.all(dependence[~later] > 0)
        else:
            assert np.all(dependence > 0)
        # and changing the last position leaves the earlier outputs as they were
        out, out_changed = jax.jit(layer.apply)(params, jnp.stack([z[0], z[0].at[-1].add(10.0)]))
        same = np.asarray(out[:-1] == out_changed[:-1])
        assert same.all() if causal else not same.all()


def test_init_params_structure_and_scale(key):
    params, out_shape = fnet.self_attention(4).init(key, (3, 64))
    assert out_shape == (3, 64)
    shapes = jax.tree.map(jnp.shape, params)
    assert shapes == {"qkv": {"w": (64, 192), "b": (192,)}, "out": {"w": (64, 64), "b": (64,)}}
    np.testing.assert_array_equal(params["qkv"]["b"], np.zeros(192))
    np.testing.assert_array_equal(params["out"]["b"], np.zeros(64))
    for w in (params["qkv"]["w"], params["out"]["w"]):  # N(0, 1/D): std 1/8
        assert abs(float(jnp.std(w)) * 8 - 1) < 0.1
        assert abs(float(jnp.mean(w))) < 0.01


# --- derivatives and extensions against JAX ---------------------------------------------

def attention_block(heads, causal):
    """The pre-norm residual attention block z + attention(layer_norm(z))."""
    return fnet.residual(fnet.chain(fnet.layer_norm(), fnet.self_attention(heads, causal)))


def transformer(heads, causal, features):
    """An attention block and an MLP block (pre-norm residuals), then a dense read-out."""
    mlp = fnet.residual(fnet.chain(fnet.layer_norm(), fnet.dense(4 * features), fnet.gelu,
                                   fnet.dense(features)))
    return fnet.chain(attention_block(heads, causal), mlp, fnet.flatten, fnet.dense(2))


def _check(net, in_shape, seed, **kwargs):
    rng = np.random.default_rng(seed)
    params, _ = random_params(net, in_shape, rng)
    x = jnp.asarray(rng.standard_normal((2,) + in_shape))
    y = jnp.asarray(rng.standard_normal((2, 2)))
    check_network(net, fnet.losses.squared_error, params, x, y, net.describe(), rng, **kwargs)
    return params, x, y


@settings(max_examples=1, phases=NO_SHRINK)
@given(config=configs(max_steps=3), seed=st.integers(0, 99),
       policy=st.sampled_from(POLICIES), jit=st.booleans())
@example(config=(2, True, 3, 4), seed=0, policy="sqrt", jit=True)
def test_transformer_derivatives_and_extensions_equal_jax(config, seed, policy, jit):
    heads, causal, steps, features = config
    _check(transformer(heads, causal, features), (steps, features), seed,
           policies=(policy,), jit_modes=(jit,))


def test_every_policy_jitted_and_eager_on_a_repeated_causal_block():
    net = fnet.chain(fnet.repeat(attention_block(2, True), 2), fnet.flatten, fnet.dense(2))
    params, x, y = _check(net, (3, 4), 0)
    grads = jax.jit(fnet.grad(net, fnet.losses.squared_error))(params, x, y)
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(grads))


# --- fast rules ---------------------------------------------------------------------------

@settings(max_examples=5)
@given(config=configs(), batch=st.integers(1, 3), seed=st.integers(0, 99))
def test_fast_rules_equal_the_generic_rule(config, batch, seed):
    heads, causal, steps, features = config
    layer = fnet.self_attention(heads, causal)
    rng = np.random.default_rng(seed)
    params, _ = random_params(layer, (steps, features), rng)
    z, q = (jnp.asarray(rng.standard_normal((batch, steps, features))) for _ in range(2))
    check_rules(layer, params, z, q, layer.name)


def test_fast_rules_are_used(monkeypatch):
    net = transformer(2, True, 4)
    rng = np.random.default_rng(3)
    params, _ = random_params(net, (3, 4), rng)
    x, y = jnp.asarray(rng.standard_normal((2, 3, 4))), jnp.asarray(rng.standard_normal((2, 2)))
    assert_rules_used(net, fnet.losses.squared_error, params, x, y, monkeypatch)


# --- arguments, shapes, FLOPs, equality ----------------------------------------------------

@pytest.mark.parametrize("args, argument, problem", [
    ((0,), "self_attention(num_heads)", "at least 1"),
    ((2.0,), "self_attention(num_heads)", "must be an int"),
    ((True,), "self_attention(num_heads)", "must be an int"),
    ((2, "yes"), "self_attention(causal)", "True or False"),
    ((2, 1), "self_attention(causal)", "True or False"),
])
def test_bad_arguments_are_refused_naming_them(args, argument, problem):
    with pytest.raises(fnet.ArgumentError, match=problem) as info:
        fnet.self_attention(*args)
    assert info.value.argument == argument


def test_features_not_divisible_by_the_heads_are_refused_naming_the_layer(key):
    net = fnet.chain(fnet.dense(6), fnet.self_attention(4))
    with pytest.raises(fnet.LayerError, match="6 is not a multiple of 4") as info:
        net.init(key, (3, 5))
    assert info.value.path == ((1, "self_attention(4)"),)
    assert "8 features" in info.value.problem  # the fix: a width that divides


@pytest.mark.parametrize("in_shape", [(8,), (2, 3, 4), (0, 4), (3, 0)])
def test_inputs_that_are_not_sequences_are_refused(key, in_shape):
    with pytest.raises(fnet.LayerError, match=r"\(T, D\)") as info:
        fnet.self_attention(1).init(key, in_shape)
    assert str(tuple(in_shape)) in info.value.problem


@pytest.mark.parametrize("heads, causal", [(1, False), (2, True), (4, False)])
@pytest.mark.parametrize("steps, features", [(1, 4), (5, 8), (7, 12)])
def test_flops_are_the_closed_form(heads, causal, steps, features):
    flops = fnet.self_attention(heads, causal).flops((steps, features))
    projections = steps * (2 * features * 3 * features + 3 * features
                           + 2 * features * features + features)
    products = 2 * (2 * steps * steps * features)  # q k^T and the weighted sums of v
    softmax = 6 * heads * steps * steps
    assert flops == projections + products + softmax > 0


def test_summary_counts_params_and_flops(key):
    summary = fnet.summary(transformer(2, False, 4), (3, 4))
    text = str(summary)
    assert "self_attention(2)" in text and "layer_norm" in text
    assert summary.total_params == sum(
        leaf.size for leaf in jax.tree.leaves(transformer(2, False, 4).init(key, (3, 4))[0]))


def test_equal_layers_are_equal_and_hash_alike():
    assert fnet.self_attention(2) == fnet.self_attention(np.int64(2), np.bool_(False))
    assert hash(fnet.self_attention(2, True)) == hash(fnet.nn.SelfAttention(2, causal=True))
    assert fnet.self_attention(2) != fnet.self_attention(2, causal=True)
    assert fnet.self_attention(2) != fnet.self_attention(4)
    assert type(fnet.self_attention(np.int64(2)).num_heads) is int
    assert fnet.self_attention(2).name == "self_attention(2)"
    assert fnet.self_attention(2, True).name == "self_attention(2, causal)"
    assert fnet.self_attention(2).repeat_keeps == "input"
