"""embedding: values against table[idx], integer inputs through the machinery (an
embedding-first transformer against JAX in float64, every extension), the fast rules
(both branches of the squared norms) against the generic ones, the index checks (out of
range, negative, non-integer: named errors on concrete inputs, NaN under jit), arguments,
FLOPs, summaries and equality."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import Phase, example, given, settings
from hypothesis import strategies as st

import funcnet as fnet
from exactness import assert_close, random_params
from funcnet.nn._embedding import uses_masks
from layer_checks import POLICIES, check_network
from rule_checks import assert_rules_used, check_rules

# Each example of the whole-network checks compiles several programs: a failure is
# reported as drawn rather than shrunk for minutes.
NO_SHRINK = (Phase.explicit, Phase.reuse, Phase.generate)
SEQUENCE_SHAPES = st.lists(st.integers(1, 4), max_size=2).map(tuple)  # per-example (*S,)


def _indices(rng, num_embeddings, shape):
    return jnp.asarray(rng.integers(0, num_embeddings, shape), dtype=jnp.int32)


@settings(max_examples=15)
@given(num_embeddings=st.integers(1, 9), features=st.integers(1, 4), shape=SEQUENCE_SHAPES,
       batch=st.integers(1, 3), seed=st.integers(0, 99))
def test_values_are_the_table_rows(num_embeddings, features, shape, batch, seed):
    layer = fnet.embedding(num_embeddings, features)
    rng = np.random.default_rng(seed)
    table = rng.standard_normal((num_embeddings, features))
    idx = _indices(rng, num_embeddings, (batch,) + shape)
    out = jax.jit(layer.apply)({"table": jnp.asarray(table)}, idx)
    expected = np.empty((batch,) + shape + (features,))
    for position in np.ndindex(idx.shape):
        expected[position] = table[int(idx[position])]
    assert_close(out, expected, layer.name)
    assert layer.init(jax.random.key(0), shape)[1] == shape + (features,)


def test_init_draws_the_table_from_a_standard_normal(key):
    params, out_shape = fnet.embedding(200, 50).init(key, (7,))
    assert out_shape == (7, 50)
    assert jax.tree.map(jnp.shape, params) == {"table": (200, 50)}
    assert abs(float(jnp.std(params["table"])) - 1) < 0.03
    assert abs(float(jnp.mean(params["table"]))) < 0.03


# --- integer inputs through the machinery -------------------------------------------------

def language_model(num_embeddings, features, heads, causal):
    """embedding -> self_attention -> layer_norm -> flatten -> dense(2)."""
    return fnet.chain(fnet.embedding(num_embeddings, features),
                      fnet.self_attention(heads, causal), fnet.layer_norm(), fnet.flatten,
                      fnet.dense(2))


def _check(net, num_embeddings, steps, batch, seed, **kwargs):
    rng = np.random.default_rng(seed)
    params, _ = random_params(net, (steps,), rng)
    x = _indices(rng, num_embeddings, (batch, steps))
    y = jnp.asarray(rng.standard_normal((batch, 2)))
    check_network(net, fnet.losses.squared_error, params, x, y, net.describe(), rng, **kwargs)


@settings(max_examples=1, phases=NO_SHRINK)
@given(num_embeddings=st.integers(1, 6), heads=st.integers(1, 2), causal=st.booleans(),
       steps=st.integers(1, 3), batch=st.integers(2, 3), seed=st.integers(0, 99),
       policy=st.sampled_from(POLICIES), jit=st.booleans())
@example(num_embeddings=4, heads=2, causal=False, steps=3, batch=2, seed=0, policy="sqrt",
         jit=True)
def test_an_embedding_first_net_differentiates_like_jax(num_embeddings, heads, causal, steps,
                                                        batch, seed, policy, jit):
    net = language_model(num_embeddings, 2 * heads, heads, causal)
    _check(net, num_embeddings, steps, batch, seed, policies=(policy,), jit_modes=(jit,))


def test_every_policy_jitted_and_eager_on_an_embedding_first_net():
    _check(language_model(5, 4, 2, True), 5, 3, 3, 0)


def test_the_input_cotangent_of_integer_indices_is_float0():
    net = language_model(5, 2, 1, False)
    rng = np.random.default_rng(4)
    params, _ = random_params(net, (3,), rng)
    x, y = _indices(rng, 5, (2, 3)), jnp.asarray(rng.standard_normal((2, 2)))
    record = fnet.backprop(net, fnet.losses.squared_error, params, x, y)
    assert record.cotangents[0].shape == x.shape
    assert record.cotangents[0].dtype == jax.dtypes.float0  # JAX's "no cotangent"


def test_summary_of_a_transformer_on_integer_inputs(key):
    net = language_model(11, 4, 2, True)
    summary = fnet.summary(net, (5,))
    names = [row.name for row in summary.rows]
    assert names == ["chain", "embedding(11, 4)", "self_attention(2, causal)", "layer_norm",
                     "flatten", "dense(2)"]
    assert summary.rows[1].in_shape == (5,) and summary.rows[1].out_shape == (5, 4)
    params, _ = net.init(key, (5,))
    assert summary.total_params == sum(leaf.size for leaf in jax.tree.leaves(params))
    assert summary.total_flops == sum(item.flops(shape) for _, item, shape
                                      in net.sublayers((5,))) > 0
    assert "embedding(11, 4)" in str(summary)


# --- fast rules ---------------------------------------------------------------------------

@settings(max_examples=8)
@given(num_embeddings=st.integers(1, 6), features=st.integers(1, 3), shape=SEQUENCE_SHAPES,
       batch=st.integers(1, 3), seed=st.integers(0, 99))
def test_fast_rules_equal_the_generic_rule(num_embeddings, features, shape, batch, seed):
    layer = fnet.embedding(num_embeddings, features)
    rng = np.random.default_rng(seed)
    params = {"table": jnp.asarray(rng.standard_normal((num_embeddings, features)))}
    z = _indices(rng, num_embeddings, (batch,) + shape)
    q = jnp.asarray(rng.standard_normal((batch,) + shape + (features,)))
    check_rules(layer, params, z, q, layer.name)


@pytest.mark.parametrize("num_embeddings, features, steps, masks", [
    (50, 3, 6, True),   # T^2 = 36 < 150: through the same-index masks
    (2, 3, 6, False),   # T^2 = 36 >= 6: through the per-example tables
])
def test_both_branches_of_the_squared_norms_equal_the_generic_rule(num_embeddings, features,
                                                                   steps, masks):
    assert uses_masks(steps, num_embeddings, features) is masks
    layer = fnet.embedding(num_embeddings, features)
    rng = np.random.default_rng(5)
    params = {"table": jnp.asarray(rng.standard_normal((num_embeddings, features)))}
    z = _indices(rng, min(num_embeddings, 3), (4, steps))  # repeated indices in each example
    z = z.at[0].set(1)                                     # one example of one index only
    q = jnp.asarray(rng.standard_normal((4, steps, features)))
    check_rules(layer, params, z, q, f"{layer.name} on {steps} indices")


def test_fast_rules_are_used(monkeypatch):
    net = language_model(5, 2, 1, False)
    rng = np.random.default_rng(6)
    params, _ = random_params(net, (3,), rng)
    x, y = _indices(rng, 5, (2, 3)), jnp.asarray(rng.standard_normal((2, 2)))
    assert_rules_used(net, fnet.losses.squared_error, params, x, y, monkeypatch)


# --- index checks ------------------------------------------------------------------------

def _net_and_params(key):
    net = fnet.chain(fnet.chain(fnet.embedding(5, 2), fnet.flatten), fnet.dense(1))
    return net, net.init(key, (3,))[0]


@pytest.mark.parametrize("bad, position, fix", [
    (5, "x[1, 2]", "num_embeddings > 5"),
    (-1, "x[1, 2]", "reserved index"),
    (100, "x[1, 2]", "num_embeddings > 100"),
])
def test_concrete_indices_out_of_range_raise_naming_the_layer(key, bad, position, fix):
    net, params = _net_and_params(key)
    x = jnp.zeros((2, 3), dtype=jnp.int32).at[1, 2].set(bad)
    entry_points = [
        lambda: fnet.value_and_grad(net, fnet.losses.squared_error)(params, x, jnp.ones((2, 1))),
        lambda: fnet.vjp(net, params, x),
        lambda: fnet.jvp(net, params, x, params),
        lambda: fnet.per_example_grads(net, fnet.losses.squared_error)(params, x,
                                                                         jnp.ones((2, 1))),
        lambda: fnet.jacobian(net, params, x[1], wrt="params"),
    ]
    for call in entry_points:
        with pytest.raises(fnet.LayerError, match=r"indices in \[0, 5\)") as info:
            call()
        assert info.value.path[-1] == (0, "embedding(5, 2)")
        assert f"the first {bad} at" in info.value.problem
        assert fix in info.value.problem
    assert position in str(pytest.raises(fnet.LayerError, entry_points[0]).value)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64, jnp.bool_])
def test_non_integer_inputs_raise_naming_the_layer(key, dtype):
    net, params = _net_and_params(key)
    with pytest.raises(fnet.LayerError, match="takes integer indices") as info:
        fnet.grad(net, fnet.losses.squared_error)(params, jnp.zeros((2, 3), dtype),
                                                  jnp.ones((2, 1)))
    assert info.value.path == ((0, "chain"), (0, "embedding(5, 2)"))
    with pytest.raises(fnet.LayerError, match="takes integer indices"):  # traced: apply
        jax.jit(net.apply)(params, jnp.zeros((2, 3), dtype))


@pytest.mark.parametrize("bad", [5, 6, -1, -5, -6])
def test_under_jit_an_index_out_of_range_gives_nan_never_a_clamped_or_wrapped_row(bad):
    layer = fnet.embedding(5, 2)
    params = {"table": jnp.arange(10.0).reshape(5, 2)}
    idx = jnp.array([[0, bad, 4]], dtype=jnp.int32)
    out = np.asarray(jax.jit(layer.apply)(params, idx))
    assert np.isnan(out[0, 1]).all()
    np.testing.assert_array_equal(out[0, [0, 2]], [[0.0, 1.0], [8.0, 9.0]])
    net = fnet.chain(layer, fnet.flatten, fnet.dense(1))
    net_params = (params, (), {"w": jnp.ones((6, 1)), "b": jnp.zeros(1)})
    value = jax.jit(fnet.value_and_grad(net, fnet.losses.squared_error))(
        net_params, idx, jnp.ones((1, 1)))[0]
    assert np.isnan(value)


# --- arguments, FLOPs, equality --------------------------------------------------------------

@pytest.mark.parametrize("args, argument, problem", [
    ((0, 4), "embedding(num_embeddings)", "at least 1"),
    ((10.0, 4), "embedding(num_embeddings)", "must be an int"),
    ((10, 0), "embedding(features)", "at least 1"),
    ((10, True), "embedding(features)", "must be an int"),
    ((10, "4"), "embedding(features)", "must be an int"),
])
def test_bad_arguments_are_refused_naming_them(args, argument, problem):
    with pytest.raises(fnet.ArgumentError, match=problem) as info:
        fnet.embedding(*args)
    assert info.value.argument == argument


def test_flops_dtype_and_equality():
    layer = fnet.embedding(10, 4)
    assert layer.flops((7,)) == 0  # a lookup moves rows
    assert layer.in_dtype == np.dtype(np.int32)
    assert fnet.chain(layer, fnet.flatten).in_dtype == np.dtype(np.int32)
    assert layer == fnet.embedding(np.int64(10), np.int32(4))
    assert hash(layer) == hash(fnet.nn.Embedding(10, 4))
    assert type(fnet.embedding(np.int64(10), 4).num_embeddings) is int
    assert layer != fnet.embedding(10, 5) and layer != fnet.embedding(11, 4)
    assert layer.name == "embedding(10, 4)"
