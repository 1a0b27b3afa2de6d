"""fnet.summary: shapes, parameter counts and FLOPs of every (nested) layer."""

import math

import jax

import funcnet as fnet


def _count(params):
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))


def test_summary_rows_match_init_and_nest():
    block = fnet.chain(fnet.dense(16), fnet.tanh)
    net = fnet.chain(fnet.flatten, fnet.dense(16), fnet.residual(block), fnet.repeat(block, 8),
                     fnet.chain(fnet.dense(10), fnet.gelu, name="head"))
    params, out_shape = net.init(jax.random.key(0), (8, 8))
    s = fnet.summary(net, (8, 8))
    assert s.rows[0].name == "chain" and s.rows[0].out_shape == out_shape == (10,)
    assert s.total_params == _count(params)
    top = [row for row in s.rows if row.depth == 1]
    assert [row.name for row in top] == [layer.name for layer in net.layers]
    assert [row.params for row in top] == [_count(p) for p in params]
    assert top[1].flops == 2 * 64 * 16 + 16  # dense(16) on 64 features
    assert top[3].flops == 8 * (2 * 16 * 16 + 16 + 16)  # repeat: 8 x (dense + tanh)
    assert s.total_flops == sum(row.flops for row in top)
    text = str(s)
    assert "    0: chain" in text and "      0: dense(16)" in text  # indentation by depth
    assert "each: chain" in text
    assert f"total: {s.total_params:,} params" in text
    html = s._repr_html_()
    assert html.startswith("<table>") and html.count("<tr>") == len(s.rows) + 1


def test_summary_of_a_user_layer_uses_xla_flops():
    import jax.numpy as jnp

    square = fnet.layer(lambda w, z: w[None] * z * z, lambda key, shape: jnp.ones(shape), name="scaled square")
    s = fnet.summary(fnet.chain(fnet.dense(5), square), (3,))
    assert s.rows[2].name == "scaled square" and s.rows[2].params == 5
    assert s.rows[2].flops >= 5  # XLA counts at least one multiply per entry


def test_a_failing_user_init_is_named_by_its_place_in_the_chain():
    import jax.numpy as jnp
    import pytest

    broken = fnet.layer(lambda w, z: z @ w, lambda key, shape: jnp.ones((7, 2)), name="broken")
    with pytest.raises(fnet.LayerError, match=r"layer 1 \(broken\): init failed for per-example input shape \(5,\)"):
        fnet.chain(fnet.dense(5), broken).init(jax.random.key(0), (3,))


def _embed_g(w, z):
    return w[z]


def test_summary_of_a_chain_on_integer_inputs():
    import jax.numpy as jnp

    embed = fnet.layer(_embed_g, lambda key, shape: jax.random.normal(key, (10, 4)),
                       name="embed", in_dtype=jnp.int32)
    net = fnet.chain(embed, fnet.flatten, fnet.dense(3))
    params, out_shape = net.init(jax.random.key(0), (5,))
    s = fnet.summary(net, (5,))
    assert [(row.name, row.in_shape, row.out_shape, row.params) for row in s.rows] == [
        ("chain", (5,), (3,), 103),
        ("embed", (5,), (5, 4), 40),
        ("flatten", (5, 4), (20,), 0),
        ("dense(3)", (20,), (3,), 63),
    ]
    assert s.total_params == _count(params) == 10 * 4 + 20 * 3 + 3
    assert s.rows[0].out_shape == out_shape
    assert s.rows[1].flops >= 0  # a gather: XLA counts next to nothing, but it counts
    assert s.rows[3].flops == 2 * 20 * 3 + 3
    assert s.total_flops == sum(row.flops for row in s.rows[1:]) > 0
    assert "embed" in str(s)


def test_summary_refuses_an_int_in_shape_with_the_fix():
    import pytest

    net = fnet.chain(fnet.dense(4), fnet.relu)
    with pytest.raises(fnet.ArgumentError, match=r"^in_shape: .*pass \(784,\)") as error:
        fnet.summary(net, 784)
    assert error.value.argument == "in_shape"
    assert fnet.summary(net, [784]).total_params == 784 * 4 + 4  # a list is a shape
