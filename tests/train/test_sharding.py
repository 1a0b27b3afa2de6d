"""Which params a model-axis mesh splits (on this process's one device: a 1 x 1 mesh, so
no compile); the numbers and the memory on 8 devices are in test_parallel.py."""

import jax
import optax
import pytest

import funcnet as fnet


def _specs(tree):
    return jax.tree.map(lambda sharding: tuple(sharding.spec), tree)


def test_dense_and_conv_split_their_output_features_and_the_rest_is_replicated():
    net = fnet.chain(fnet.conv(4, 3), fnet.relu, fnet.flatten, fnet.layer_norm(),
                     fnet.repeat(fnet.dense(144, bias=False), 2), fnet.dense(5))
    params, _ = net.init(jax.random.key(0), (6, 6, 2))
    mesh = fnet.model_parallel_mesh(1)
    assert mesh.axis_names == ("batch", "model") and mesh.devices.shape == (1, 1)
    specs = _specs(fnet.param_shardings(net, params, mesh))
    assert specs[0] == {"w": (None, None, None, "model"), "b": ("model",)}
    assert specs[3] == jax.tree.map(lambda _: (), params[3])  # layer_norm: replicated
    assert specs[4] == {"w": (None, None, "model")}  # the repeat's copy axis is never split
    assert specs[5] == {"w": (None, "model"), "b": ("model",)}
    abstract = jax.eval_shape(lambda: params)
    assert _specs(fnet.param_shardings(net, abstract, mesh)) == specs
    # on a mesh without a model axis every leaf is replicated
    plain = jax.tree.leaves(fnet.param_shardings(net, params, fnet.data_parallel_mesh()))
    assert len(plain) == len(jax.tree.leaves(params))
    assert {tuple(sharding.spec) for sharding in plain} == {()}


def test_the_optimizer_state_follows_the_params_and_counts_are_replicated():
    net = fnet.chain(fnet.dense(8), fnet.tanh, fnet.dense(2))
    params, _ = net.init(jax.random.key(0), (3,))
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))
    state = fnet.init_train_state(params, optimizer)
    shardings = fnet.state_shardings(net, state, fnet.model_parallel_mesh(1))
    adam = shardings.opt_state[1][0]
    expected = _specs(fnet.param_shardings(net, params, fnet.model_parallel_mesh(1)))
    assert _specs(adam.mu) == expected and _specs(adam.nu) == expected
    assert tuple(adam.count.spec) == () and tuple(shardings.step.spec) == ()


def test_a_user_layer_splits_nothing_unless_it_says_so():
    scale = fnet.layer(lambda p, z: p["s"][None] * z, lambda key, shape: {"s": jax.numpy.ones(shape)})
    params, _ = scale.init(jax.random.key(0), (4,))
    assert scale.model_axes(params) is None
    assert _specs(fnet.param_shardings(scale, params, fnet.model_parallel_mesh(1))) == {"s": ()}


@pytest.mark.parametrize("model, message", [(0, "at least 1"), (True, "bool"),
                                            (2, "2 does not divide the 1 devices")])
def test_a_bad_model_axis_is_refused(model, message):
    with pytest.raises(fnet.ArgumentError, match="model") as error:
        fnet.model_parallel_mesh(model)
    assert message in str(error.value)
