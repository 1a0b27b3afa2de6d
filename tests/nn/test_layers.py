"""Built-in layers, composition and user-defined layers.

Checks the layer contract (``init(key, in_shape) -> (params, out_shape)``, ``apply(params,
z) -> z_next``), the documented params structures, activation values against numpy
formulas, equality/hashing/immutability (layers are jit static values), and both ways of
making a user layer, differentiated by funcnet's backward pass and compared with jax.grad.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import funcnet as fnet

RTOL = 1e-10  # float64 exactness, as in DESIGN.md


def _rel_err(a, b):
    """Normwise relative error of two pytrees (0 when both are zero)."""
    a, b = jax.tree.map(np.asarray, a), jax.tree.map(np.asarray, b)
    num = math.sqrt(sum(float(np.sum((x - y) ** 2))
                        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))))
    den = math.sqrt(sum(float(np.sum(y ** 2)) for y in jax.tree.leaves(b)))
    return num / den if den else num


def _batch(key, batch, in_shape):
    return jax.random.normal(key, (batch,) + tuple(in_shape))


# --------------------------------------------------------------------------------------
# init's out_shape agrees with apply's real output shape (stax-style), for every layer.

LAYER_CASES = [
    ("dense", lambda: fnet.dense(5), (3,)),
    ("dense_no_bias", lambda: fnet.dense(5, bias=False), (3,)),
    ("dense_multi_axis", lambda: fnet.dense(4), (2, 3)),
    ("relu", lambda: fnet.relu, (4,)),
    ("tanh", lambda: fnet.tanh, (2, 3)),
    ("sigmoid", lambda: fnet.sigmoid, (4,)),
    ("softplus", lambda: fnet.softplus, (4,)),
    ("gelu", lambda: fnet.gelu, (4,)),
    ("identity", lambda: fnet.identity, (2, 2)),
    ("leaky_relu", lambda: fnet.leaky_relu(0.2), (4,)),
    ("flatten", lambda: fnet.flatten, (2, 3, 4)),
    ("chain", lambda: fnet.chain(fnet.dense(6), fnet.tanh, fnet.dense(2)), (3,)),
    ("nested_chain",
     lambda: fnet.chain(fnet.dense(6), fnet.chain(fnet.relu, fnet.chain(fnet.dense(3))),
                        fnet.sigmoid), (4,)),
    ("residual", lambda: fnet.residual(fnet.dense(3)), (3,)),
    ("residual_of_chain",
     lambda: fnet.residual(fnet.chain(fnet.dense(7), fnet.gelu, fnet.dense(3))), (3,)),
    ("empty_chain", lambda: fnet.chain(), (3,)),
]


@pytest.mark.parametrize("make, in_shape", [c[1:] for c in LAYER_CASES],
                         ids=[c[0] for c in LAYER_CASES])
def test_init_out_shape_matches_apply(key, make, in_shape):
    net = make()
    params, out_shape = net.init(key, in_shape)
    assert isinstance(out_shape, tuple)
    assert all(isinstance(d, int) for d in out_shape)
    for batch in (1, 4):
        x = _batch(jax.random.key(1), batch, in_shape)
        out = net.apply(params, x)
        assert out.shape == (batch,) + out_shape
        assert out.dtype == x.dtype
        # __call__ is apply
        np.testing.assert_array_equal(net(params, x), out)


def test_out_shapes_of_each_kind(key):
    assert fnet.dense(5).init(key, (3,))[1] == (5,)
    assert fnet.dense(4).init(key, (2, 3))[1] == (2, 4)  # over the last axis
    assert fnet.flatten.init(key, (2, 3, 4))[1] == (24,)
    for act in (fnet.relu, fnet.tanh, fnet.sigmoid, fnet.softplus, fnet.gelu,
                fnet.identity, fnet.leaky_relu(0.3)):
        assert act.init(key, (2, 5))[1] == (2, 5)
    assert fnet.residual(fnet.dense(3)).init(key, (3,))[1] == (3,)


# --------------------------------------------------------------------------------------
# Params structures (DESIGN.md).


def test_dense_params_structure(key):
    params, _ = fnet.dense(5).init(key, (3,))
    assert isinstance(params, dict) and set(params) == {"w", "b"}
    assert params["w"].shape == (3, 5)
    assert params["b"].shape == (5,)
    np.testing.assert_array_equal(params["b"], np.zeros(5))
    assert params["w"].dtype == jnp.result_type(float)  # JAX's default float dtype


def test_dense_without_bias_params_structure(key):
    params, _ = fnet.dense(5, bias=False).init(key, (3,))
    assert isinstance(params, dict) and set(params) == {"w"}
    assert params["w"].shape == (3, 5)


def test_dense_apply_is_affine(key):
    params, _ = fnet.dense(4).init(key, (3,))
    params = {"w": params["w"], "b": jnp.arange(4.0)}
    x = _batch(jax.random.key(1), 5, (3,))
    expected = np.asarray(x) @ np.asarray(params["w"]) + np.arange(4.0)[None, :]
    np.testing.assert_allclose(fnet.dense(4).apply(params, x), expected, rtol=1e-12)
    no_bias = fnet.dense(4, bias=False)
    np.testing.assert_allclose(no_bias.apply({"w": params["w"]}, x),
                               np.asarray(x) @ np.asarray(params["w"]), rtol=1e-12)


def test_dense_init_is_lecun_normal(key):
    fan_in, out = 400, 100
    w = np.asarray(fnet.dense(out).init(key, (fan_in,))[0]["w"])
    # 40000 draws from N(0, 1/fan_in): the std estimate is within ~1% of 1/sqrt(fan_in).
    assert abs(w.std() * math.sqrt(fan_in) - 1.0) < 0.05
    assert abs(w.mean()) * math.sqrt(fan_in) < 0.05


def test_dense_init_depends_on_key():
    a = fnet.dense(4).init(jax.random.key(0), (3,))[0]["w"]
    b = fnet.dense(4).init(jax.random.key(1), (3,))[0]["w"]
    assert not np.allclose(a, b)


@pytest.mark.parametrize("layer", [fnet.relu, fnet.tanh, fnet.sigmoid, fnet.softplus,
                                   fnet.gelu, fnet.identity, fnet.leaky_relu(0.1),
                                   fnet.flatten],
                         ids=lambda layer: layer.name)
def test_parameterless_layers_have_empty_tuple_params(key, layer):
    params, _ = layer.init(key, (2, 3))
    assert params == ()


def test_chain_params_one_entry_per_layer(key):
    net = fnet.chain(fnet.dense(6), fnet.relu, fnet.chain(fnet.dense(4), fnet.tanh),
                     fnet.residual(fnet.dense(4, bias=False)), fnet.dense(1))
    params, out_shape = net.init(key, (3,))
    assert out_shape == (1,)
    assert isinstance(params, tuple) and len(params) == 5
    assert params[0]["w"].shape == (3, 6) and params[0]["b"].shape == (6,)
    assert params[1] == ()
    assert isinstance(params[2], tuple) and len(params[2]) == 2
    assert params[2][0]["w"].shape == (6, 4) and params[2][1] == ()
    # a residual's params are those of its inner layer
    assert set(params[3]) == {"w"} and params[3]["w"].shape == (4, 4)
    assert params[4]["w"].shape == (4, 1)


def test_chain_gives_layers_different_keys(key):
    params, _ = fnet.chain(fnet.dense(3), fnet.dense(3)).init(key, (3,))
    assert not np.allclose(params[0]["w"], params[1]["w"])


def test_chain_accepts_a_list():
    layers = [fnet.dense(3), fnet.relu]
    assert fnet.chain(layers) == fnet.chain(*layers)


def test_init_infers_shapes_through_a_whole_chain_without_data(key):
    """init needs only a key and a per-example shape: every width is inferred."""
    net = fnet.chain(
        fnet.flatten, fnet.dense(7), fnet.relu,
        fnet.chain(fnet.dense(5), fnet.tanh, fnet.chain(fnet.dense(5, bias=False))),
        fnet.residual(fnet.chain(fnet.dense(9), fnet.gelu, fnet.dense(5))),
        fnet.dense(2),
    )
    params, out_shape = net.init(key, (4, 3))
    assert out_shape == (2,)
    shapes = jax.tree.map(jnp.shape, params)
    assert shapes == (
        (),
        {"w": (12, 7), "b": (7,)},
        (),
        ({"w": (7, 5), "b": (5,)}, (), ({"w": (5, 5)},)),
        ({"w": (5, 9), "b": (9,)}, (), {"w": (9, 5), "b": (5,)}),
        {"w": (5, 2), "b": (2,)},
    )
    out = net.apply(params, _batch(jax.random.key(2), 3, (4, 3)))
    assert out.shape == (3, 2)


def test_residual_adds_its_input(key):
    inner = fnet.chain(fnet.dense(3), fnet.tanh)
    params, _ = inner.init(key, (3,))
    x = _batch(jax.random.key(1), 4, (3,))
    np.testing.assert_allclose(fnet.residual(inner).apply(params, x),
                               x + inner.apply(params, x), rtol=1e-14)


def test_flatten_values(key):
    x = jnp.arange(2 * 3 * 4.0).reshape(2, 3, 4)
    np.testing.assert_array_equal(fnet.flatten.apply((), x), np.arange(24.0).reshape(2, 12))


# --------------------------------------------------------------------------------------
# Activation values against independent numpy formulas.

_erf = np.vectorize(math.erf)


def _np_gelu(z):
    return 0.5 * z * (1.0 + _erf(z / math.sqrt(2.0)))


ACTIVATION_FORMULAS = [
    (fnet.relu, lambda z: np.maximum(z, 0.0)),
    (fnet.tanh, np.tanh),
    (fnet.sigmoid, lambda z: 1.0 / (1.0 + np.exp(-z))),
    (fnet.softplus, lambda z: np.log1p(np.exp(z))),
    (fnet.gelu, _np_gelu),
    (fnet.identity, lambda z: z),
    (fnet.leaky_relu(0.2), lambda z: np.where(z >= 0, z, 0.2 * z)),
    (fnet.leaky_relu(3.0), lambda z: np.where(z >= 0, z, 3.0 * z)),
]


@pytest.mark.parametrize("layer, formula", ACTIVATION_FORMULAS,
                         ids=[layer.name for layer, _ in ACTIVATION_FORMULAS])
def test_activation_values(layer, formula):
    z = np.linspace(-6.0, 6.0, 25).reshape(5, 5)  # includes 0
    out = layer.apply((), jnp.asarray(z))
    np.testing.assert_allclose(np.asarray(out), formula(z), rtol=1e-12, atol=1e-15)


def test_relu_derivative_at_zero_is_zero():
    z = jnp.array([[-1.0, 0.0, 2.0]])
    g = jax.grad(lambda z: jnp.sum(fnet.relu.apply((), z)))(z)
    np.testing.assert_array_equal(g, [[0.0, 0.0, 1.0]])


def test_relu_derivative_at_zero_on_the_hand_written_path():
    """q_1 from funcnet's own backward pass through relu at z = 0 is 0 too."""
    net = fnet.chain(fnet.dense(2), fnet.relu)
    params = ({"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}, ())  # pre-activations exactly 0
    x = jnp.ones((4, 3))
    record = fnet.backprop(net, lambda out, y: jnp.sum(out), params, x, None)
    np.testing.assert_array_equal(record.cotangents[1], np.zeros((4, 2)))
    np.testing.assert_array_equal(record.grads[0]["w"], np.zeros((3, 2)))
    np.testing.assert_array_equal(record.grads[0]["b"], np.zeros(2))


@pytest.mark.parametrize("alpha", [0.01, 0.2, 2.5])
def test_leaky_relu_slopes(alpha):
    layer = fnet.leaky_relu(alpha)
    z = jnp.array([[-3.0, -0.5, 0.5, 4.0]])
    g = jax.grad(lambda z: jnp.sum(layer.apply((), z)))(z)
    np.testing.assert_allclose(g, [[alpha, alpha, 1.0, 1.0]], rtol=1e-15)
    # documented: the derivative at 0 is alpha
    g0 = jax.grad(lambda z: jnp.sum(layer.apply((), z)))(jnp.zeros((1, 1)))
    np.testing.assert_allclose(g0, [[alpha]], rtol=1e-15)


def test_leaky_relu_default_alpha():
    assert fnet.leaky_relu() == fnet.leaky_relu(0.01)


# --------------------------------------------------------------------------------------
# Equality, hashing, jit static values, immutability.


def _make_net():
    return fnet.chain(fnet.dense(8), fnet.leaky_relu(0.1),
                      fnet.residual(fnet.chain(fnet.dense(8), fnet.tanh)),
                      fnet.flatten, fnet.dense(3, bias=False))


def test_rebuilt_layers_are_equal_and_hash_equal():
    pairs = [
        (fnet.dense(3), fnet.dense(3)),
        (fnet.dense(3, bias=False), fnet.dense(3, bias=False)),
        (fnet.leaky_relu(0.1), fnet.leaky_relu(0.1)),
        (fnet.residual(fnet.dense(3)), fnet.residual(fnet.dense(3))),
        (_make_net(), _make_net()),
    ]
    for a, b in pairs:
        assert a is not b
        assert a == b
        assert hash(a) == hash(b)


def test_different_settings_are_unequal():
    distinct = [
        fnet.dense(3), fnet.dense(4), fnet.dense(3, bias=False), fnet.relu, fnet.tanh,
        fnet.sigmoid, fnet.softplus, fnet.gelu, fnet.identity, fnet.leaky_relu(0.1),
        fnet.leaky_relu(0.2), fnet.flatten, fnet.residual(fnet.dense(3)),
        fnet.chain(fnet.dense(3)), fnet.chain(fnet.dense(3), fnet.relu),
        fnet.chain(fnet.relu, fnet.dense(3)), fnet.chain(fnet.dense(3), name="other"),
    ]
    for i, a in enumerate(distinct):
        for j, b in enumerate(distinct):
            assert (a == b) == (i == j), (a, b)


def test_layers_work_as_dict_keys():
    table = {fnet.dense(3): "a", _make_net(): "b", fnet.relu: "c"}
    assert table[fnet.dense(3)] == "a"
    assert table[_make_net()] == "b"
    assert table[fnet.relu] == "c"


def test_layers_as_jit_static_args_do_not_retrace_when_rebuilt(key):
    traces = []

    @functools.partial(jax.jit, static_argnums=0)
    def forward(net, params, x):
        traces.append(net)
        return net.apply(params, x)

    params, _ = _make_net().init(key, (4,))
    x = _batch(jax.random.key(1), 2, (4,))
    first = forward(_make_net(), params, x)
    second = forward(_make_net(), params, x)  # an equal, rebuilt net
    assert len(traces) == 1
    np.testing.assert_array_equal(first, second)
    np.testing.assert_allclose(first, _make_net().apply(params, x), rtol=1e-12)
    # a different net is a different static value: it does trace again
    other = fnet.chain(fnet.dense(3))
    forward(other, other.init(key, (4,))[0], x)
    assert len(traces) == 2


def test_value_and_grad_under_jit_with_static_net_does_not_retrace(key):
    traces = []

    @functools.partial(jax.jit, static_argnums=0)
    def step(net, params, x, y):
        traces.append(1)
        return fnet.value_and_grad(net, fnet.losses.squared_error)(params, x, y)

    params, _ = _make_net().init(key, (4,))
    x = _batch(jax.random.key(1), 2, (4,))
    y = _batch(jax.random.key(2), 2, (3,))
    step(_make_net(), params, x, y)
    step(_make_net(), params, x, y)
    assert len(traces) == 1


@pytest.mark.parametrize("layer, attr", [
    (fnet.dense(3), "out_features"),
    (fnet.dense(3), "name"),
    (fnet.relu, "name"),
    (fnet.leaky_relu(0.1), "alpha"),
    (fnet.flatten, "name"),
    (fnet.chain(fnet.dense(3)), "layers"),
    (fnet.residual(fnet.dense(3)), "inner"),
    (fnet.Layer(lambda k, s: ((), s), lambda p, z: z, "id"), "name"),
    (fnet.layer(lambda w, z: z, name="id2"), "g"),
], ids=lambda v: v if isinstance(v, str) else getattr(v, "name", None))
def test_layers_are_immutable(layer, attr):
    before = getattr(layer, attr)
    with pytest.raises(AttributeError):
        setattr(layer, attr, 5)
    assert getattr(layer, attr) == before
    with pytest.raises(dataclasses.FrozenInstanceError):
        layer.some_new_attribute = 1


def test_names():
    assert fnet.dense(8).name == "dense(8)"
    assert fnet.relu.name == "relu"
    assert fnet.leaky_relu(0.2).name == "leaky_relu(0.2)"
    assert fnet.flatten.name == "flatten"
    assert fnet.chain(fnet.relu).name == "chain"
    assert fnet.chain(fnet.relu, name="trunk").name == "trunk"
    assert fnet.residual(fnet.dense(3)).name == "residual(dense(3))"


# --------------------------------------------------------------------------------------
# User layers: fnet.Layer(init, apply, name) and fnet.layer(g, init_params, name).


def _scale_init(key, in_shape):
    return {"scale": 1.0 + 0.1 * jax.random.normal(key, in_shape)}, in_shape


def _scale_apply(params, z):
    return params["scale"][None, :] * z


def _proj_g(params, z):
    return jnp.sin(z @ params["m"])


def _proj_init(key, in_shape):
    return {"m": jax.random.normal(key, (in_shape[-1], 5)) / 2.0}


def _user_net():
    scale = fnet.Layer(_scale_init, _scale_apply, name="scale")
    proj = fnet.layer(_proj_g, _proj_init, name="proj")
    square = fnet.layer(lambda w, z: z * z, name="square")  # parameterless
    return fnet.chain(fnet.dense(4), scale, fnet.tanh, proj, square,
                      fnet.residual(fnet.chain(scale, fnet.dense(5))), fnet.dense(2))


def test_layer_class_user_layer(key):
    scale = fnet.Layer(_scale_init, _scale_apply, name="scale")
    params, out_shape = scale.init(key, (3,))
    assert out_shape == (3,) and params["scale"].shape == (3,)
    x = _batch(jax.random.key(1), 4, (3,))
    np.testing.assert_allclose(scale.apply(params, x), np.asarray(params["scale"])[None, :] * np.asarray(x))
    assert scale.name == "scale"
    assert scale == fnet.Layer(_scale_init, _scale_apply, name="scale")
    assert hash(scale) == hash(fnet.Layer(_scale_init, _scale_apply, name="scale"))
    assert scale != fnet.Layer(_scale_init, _scale_apply, name="other")
    assert scale != fnet.Layer(_scale_init, lambda p, z: z, name="scale")


def test_layer_class_needs_callables():
    with pytest.raises(fnet.ArgumentError, match=r"^init: must be a function") as error:
        fnet.Layer(None, _scale_apply, "bad")
    assert error.value.argument == "init"
    with pytest.raises(fnet.ArgumentError, match=r"^apply: must be a function") as error:
        fnet.Layer(_scale_init, "not a function", "bad")
    assert error.value.argument == "apply"
    with pytest.raises(TypeError):  # ArgumentError is a TypeError, as before
        fnet.Layer(None, _scale_apply, "bad")


def test_layer_function_needs_a_callable_g():
    with pytest.raises(fnet.ArgumentError, match=r"^g: must be a function g\(params, z\)") as error:
        fnet.layer(jnp.ones(3))
    assert error.value.argument == "g"
    with pytest.raises(fnet.ArgumentError) as error:
        fnet.layer(_proj_g, {"m": jnp.ones((3, 5))})  # params instead of init_params
    assert error.value.argument == "init_params"


def test_layer_names_must_be_str():
    for make in (lambda: fnet.layer(_proj_g, _proj_init, name=3),
                 lambda: fnet.Layer(_scale_init, _scale_apply, name=("scale",))):
        with pytest.raises(fnet.ArgumentError, match=r"^name: must be a str") as error:
            make()
        assert error.value.argument == "name"


def test_an_int_in_shape_is_refused_with_the_tuple_fix(key):
    nets = [fnet.Layer(_scale_init, _scale_apply, name="scale"),
            fnet.layer(_proj_g, _proj_init, name="proj"),
            fnet.chain(fnet.dense(4), fnet.layer(_proj_g, _proj_init))]
    for net in nets:
        with pytest.raises(fnet.ArgumentError, match=r"^in_shape: .*\(784,\)") as error:
            net.init(key, 784)
        assert error.value.argument == "in_shape"
    # lists still work, as shapes
    assert nets[1].init(key, [3])[1] == (5,)


# A hand-written embedding: integer inputs index the rows of a (10, 4) table.
def _embed_g(w, z):
    return w[z]


def _embed_init(key, in_shape):
    return jax.random.normal(key, (10, 4))


def _embed(**kwargs):
    return fnet.layer(_embed_g, _embed_init, name="embed", in_dtype=jnp.int32, **kwargs)


def test_integer_input_layer_infers_out_shape_and_applies(key):
    embed = _embed()
    assert embed.in_dtype == jnp.int32
    params, out_shape = embed.init(key, (5,))
    assert out_shape == (5, 4) and params.shape == (10, 4)
    params, out_shape = embed.init(key, (2, 3))  # any input shape: one row per index
    assert out_shape == (2, 3, 4)
    x = jnp.array([[0, 1, 2], [9, 9, 0]], dtype=jnp.int32)[:, None, :].repeat(2, axis=1)
    out = embed.apply(params, x)
    assert out.shape == (2,) + out_shape and out.dtype == params.dtype
    np.testing.assert_array_equal(out, np.asarray(params)[np.asarray(x)])
    # in a chain: init's out_shape agrees with apply's on integer inputs
    net = fnet.chain(embed, fnet.flatten, fnet.dense(3))
    params, out_shape = net.init(key, (5,))
    assert out_shape == (3,)
    x = jnp.array([[0, 1, 2, 3, 9], [4, 4, 4, 4, 4]], dtype=jnp.int32)
    assert net.apply(params, x).shape == (2, 3)


def test_in_dtype_is_part_of_the_layer():
    embed = _embed()
    # any spelling of the same dtype gives an equal layer (no retrace under jit)
    assert embed == fnet.layer(_embed_g, _embed_init, name="embed", in_dtype="int32")
    assert hash(embed) == hash(fnet.layer(_embed_g, _embed_init, name="embed", in_dtype=np.int32))
    assert embed != fnet.layer(_embed_g, _embed_init, name="embed")
    assert fnet.layer(_embed_g, _embed_init).in_dtype is None  # default: float inputs
    assert "int32" in repr(embed)
    user = fnet.Layer(_scale_init, _scale_apply, name="scale", in_dtype=jnp.int32)
    assert user.in_dtype == jnp.int32
    assert user != fnet.Layer(_scale_init, _scale_apply, name="scale")
    with pytest.raises(fnet.ArgumentError, match=r"^in_dtype: .*jnp\.int32"):
        fnet.layer(_embed_g, _embed_init, in_dtype="not a dtype")
    with pytest.raises(fnet.ArgumentError, match=r"^in_dtype: "):
        fnet.Layer(_scale_init, _scale_apply, in_dtype=object)


def test_index_layer_without_in_dtype_says_to_give_one(key):
    embed = fnet.layer(_embed_g, _embed_init, name="embed")  # traced on floats
    with pytest.raises(fnet.LayerError, match=r"layer 0 \(embed\).*in_dtype=jnp\.int32"):
        fnet.chain(embed).init(key, (5,))


def test_generic_flops_probe_with_the_in_dtype():
    def init(key, in_shape):
        return jnp.ones((10, 4)), tuple(in_shape) + (4,)

    def apply(w, z):
        return 2.0 * w[z]

    user = fnet.Layer(init, apply, name="embed2x", in_dtype=jnp.int32)
    assert user.flops((5,)) >= 5 * 4  # at least the multiply per output entry
    with pytest.raises(TypeError):  # traced on floats, w[z] cannot index
        fnet.Layer(init, apply, name="embed2x").flops((5,))


def test_layer_function_infers_out_shape(key):
    proj = fnet.layer(_proj_g, _proj_init, name="proj")
    params, out_shape = proj.init(key, (3,))
    assert out_shape == (5,)
    assert params["m"].shape == (3, 5)
    x = _batch(jax.random.key(1), 4, (3,))
    assert proj.apply(params, x).shape == (4, 5)
    # parameterless: params ()
    square = fnet.layer(lambda w, z: z.reshape(z.shape[0], -1), name="flat")
    params, out_shape = square.init(key, (2, 3))
    assert params == () and out_shape == (6,)


def test_layer_function_default_name_and_equality():
    assert fnet.layer(_proj_g, _proj_init).name == "_proj_g"
    assert fnet.layer(_proj_g, _proj_init) == fnet.layer(_proj_g, _proj_init)
    assert hash(fnet.layer(_proj_g, _proj_init)) == hash(fnet.layer(_proj_g, _proj_init))
    assert fnet.layer(_proj_g, _proj_init) != fnet.layer(_proj_g, None)


def test_user_layers_in_a_chain_differentiate_like_jax_grad(key):
    net = _user_net()
    params, out_shape = net.init(key, (3,))
    assert out_shape == (2,)
    x = _batch(jax.random.key(1), 6, (3,))
    y = _batch(jax.random.key(2), 6, (2,))
    loss = fnet.losses.squared_error
    value, grads = fnet.value_and_grad(net, loss)(params, x, y)
    ref_value, ref_grads = jax.value_and_grad(lambda p: loss(net.apply(p, x), y))(params)
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    assert abs(float(value) - float(ref_value)) <= RTOL * abs(float(ref_value))
    assert _rel_err(grads, ref_grads) <= RTOL
    # every parameter leaf receives a non-zero gradient (nothing silently dropped)
    for leaf in jax.tree.leaves(grads):
        assert float(jnp.max(jnp.abs(leaf))) > 0


def test_user_layer_input_cotangent_matches_jax_grad(key):
    net = _user_net()
    params, _ = net.init(key, (3,))
    x = _batch(jax.random.key(1), 6, (3,))
    y = _batch(jax.random.key(2), 6, (2,))
    loss = fnet.losses.squared_error
    record = fnet.backprop(net, loss, params, x, y)
    ref = jax.grad(lambda x_: loss(net.apply(params, x_), y))(x)
    assert _rel_err(record.cotangents[0], ref) <= RTOL
    assert len(record.cotangents) == len(net.layers) + 1
    assert len(record.activations) == len(net.layers) + 1
