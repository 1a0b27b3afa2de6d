"""Plain argument mistakes at every entry point raise ArgumentError naming the argument,
what came and the fix, before any work; nothing is truncated, clamped or broadcast."""

import math
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import funcnet as fnet

SE = fnet.losses.squared_error


@pytest.fixture
def setup():
    net = fnet.chain(fnet.dense(4), fnet.tanh, fnet.dense(2))
    params, _ = net.init(jax.random.key(0), (3,))
    x = jax.random.normal(jax.random.key(1), (5, 3))
    y = jax.random.normal(jax.random.key(2), (5, 2))
    return net, params, x, y


def _refused(argument, call, *parts):
    with pytest.raises(fnet.ArgumentError) as info:
        call()
    assert info.value.argument == argument, str(info.value)
    for part in parts:
        assert part in str(info.value), f"{part!r} not in {info.value}"
    return info.value


def test_argument_error_is_a_value_and_type_error_that_pickles():
    error = fnet.ArgumentError("batch_size", "must be an int, got 2.5 (float).")
    assert isinstance(error, ValueError) and isinstance(error, TypeError)
    assert not isinstance(error, fnet.LayerError)
    assert str(error) == "batch_size: must be an int, got 2.5 (float)."
    again = pickle.loads(pickle.dumps(error))
    assert (again.argument, again.problem, str(again)) == (error.argument, error.problem, str(error))


# --------------------------------------------------------------------------------------
# the differentiating entry points


def _entry_points(net, params, x, y, loss=SE):
    return {
        "value_and_grad": lambda: fnet.value_and_grad(net, loss)(params, x, y),
        "grad": lambda: fnet.grad(net, loss)(params, x, y),
        "backprop": lambda: fnet.backprop(net, loss, params, x, y),
        "per_example_grads": lambda: fnet.per_example_grads(net, loss)(params, x, y),
        "check_grads": lambda: fnet.check_grads(net, loss, params, x, y),
        "evaluate": lambda: fnet.evaluate(net, loss, params, x, y),
        "vjp": lambda: fnet.vjp(net, params, x),
        "jvp": lambda: fnet.jvp(net, params, x, None, x),
    }


NEEDS_LOSS = ("value_and_grad", "grad", "backprop", "per_example_grads", "check_grads",
              "evaluate")
ALL = sorted(_entry_points(*[None] * 4))


@pytest.mark.parametrize("entry", ALL)
def test_integer_params_name_the_leaf(setup, entry):
    net, params, x, y = setup
    as_int = jax.tree.map(lambda a: jnp.round(a).astype(jnp.int32), params)
    _refused("params[0]['b']", _entry_points(net, as_int, x, y)[entry], "int32",
             "floating-point", ".astype(jnp.float32)")


@pytest.mark.parametrize("entry", NEEDS_LOSS)
def test_a_loss_that_is_not_callable_is_named(setup, entry):
    net, params, x, y = setup
    _refused("loss", _entry_points(net, params, x, y, loss="squared_error")[entry],
             "must be a function loss(outputs, targets) -> scalar", "'squared_error' (str)")


@pytest.mark.parametrize("entry", ALL)
def test_python_lists_as_inputs_are_refused_with_the_conversion(setup, entry):
    net, params, x, y = setup
    _refused("x", _entry_points(net, params, np.asarray(x).tolist(), y)[entry],
             "Python list", "jnp.asarray(x)")


@pytest.mark.parametrize("entry", NEEDS_LOSS)
def test_python_lists_as_targets_are_refused(setup, entry):
    net, params, x, y = setup
    _refused("y", _entry_points(net, params, x, np.asarray(y).tolist())[entry],
             "jnp.asarray(y)")


@pytest.mark.parametrize("entry", ALL)
def test_a_batch_of_zero_examples_is_refused(setup, entry):
    net, params, x, y = setup
    _refused("x", _entry_points(net, params, x[:0], y[:0])[entry], "0 examples", "(0, 3)")


def test_lists_are_refused_under_jit_too(setup):
    net, params, x, y = setup
    f = jax.jit(fnet.value_and_grad(net, SE))
    _refused("x", lambda: f(params, [x[0], x[1]], y[:2]), "Python list")


def test_integer_cotangents_and_tangents_are_refused(setup):
    net, params, x, _ = setup
    out, pullback = fnet.vjp(net, params, x)
    _refused("ct", lambda: pullback(jnp.ones(out.shape, jnp.int32)), "int32", "floating-point")
    _refused("ct", lambda: pullback(np.ones(out.shape).tolist()), "Python list")
    with pytest.raises(fnet.LayerError, match=r"x_dot .* dtype int32, but .* dtype float"):
        fnet.jvp(net, params, x, None, jnp.ones(x.shape, jnp.int32))


def test_evaluate_checks_labels_like_training(setup):
    net, params, x, _ = setup
    labels = jnp.array([0, 1, 2, 1, 0])  # the net has 2 outputs: label 2 is out of range
    _refused("y", lambda: fnet.evaluate(net, fnet.losses.softmax_cross_entropy, params, x,
                                        labels), "label 2 at example 2", "[0, 1]")
    _refused("y", lambda: fnet.evaluate(net, fnet.losses.softmax_cross_entropy, params, x,
                                        labels.astype(jnp.float32) % 2),
             "labels must be integers")


# --------------------------------------------------------------------------------------
# ONE example for the Jacobians


@pytest.mark.parametrize("jacobian", [fnet.jacobian, fnet.layer_jacobians],
                         ids=["jacobian", "layer_jacobians"])
def test_a_batch_given_to_the_jacobians_is_refused(setup, jacobian):
    net, params, x, _ = setup
    _refused("x", lambda: jacobian(net, params, x), "has shape (5, 3)", "ONE example",
             "fit examples of shape (3,)", "x[0]", "jax.vmap", "in_shape=(5, 3)")
    jacobian(net, params, x[0])  # one example is fine


def test_in_shape_confirms_a_sequence_example(setup):
    net, params, x, _ = setup  # x: a sequence of 5 steps of 3 features, ONE example
    jac = fnet.jacobian(net, params, x, in_shape=(5, 3))
    reference = jax.jacrev(lambda z: net.apply(params, z[None])[0])(x)
    np.testing.assert_allclose(jac, reference, rtol=1e-5, atol=1e-6)
    assert jac.shape == (5, 2, 5, 3)
    _refused("in_shape", lambda: fnet.jacobian(net, params, x, in_shape=(3,)),
             "is (3,) but x has shape (5, 3)")


def test_a_network_whose_params_do_not_pin_the_input_takes_any_example():
    """Without params that fix the input size, no x can look like a batch."""
    net = fnet.chain(fnet.tanh, fnet.layer(lambda w, z: w * z, lambda key, shape: jnp.ones(()),
                                           name="scale"))
    params, _ = net.init(jax.random.key(0), (4,))
    x = jnp.arange(8.0).reshape(2, 4) / 8
    jac = fnet.jacobian(net, params, x)
    assert jac.shape == (2, 4, 2, 4)


# --------------------------------------------------------------------------------------
# shapes, counts, flags and slopes


def test_an_int_in_shape_is_refused_with_the_tuple_fix(setup):
    net, _, _, _ = setup
    for call in (lambda: net.init(jax.random.key(0), 3), lambda: fnet.summary(net, 3),
                 lambda: fnet.jacobian_plan(net, 3), lambda: fnet.dense(2).init(
                     jax.random.key(0), 3)):
        _refused("in_shape", call, "got the int 3", "pass (3,)")
    _refused("in_shape[0]", lambda: net.init(jax.random.key(0), (3.0,)), "must be an int")


@pytest.mark.parametrize("width, problem", [
    (2.0, "must be an int, got 2.0 (float)"), (True, "must be an int, got True (bool)"),
    (0, "must be at least 1, got 0"), ("4", "must be an int, got '4' (str)")])
def test_dense_width_must_be_a_positive_int(width, problem):
    _refused("dense(out_features)", lambda: fnet.dense(width), problem)


@pytest.mark.parametrize("bias", ["no", 1, 0.0, None])
def test_dense_bias_must_be_a_bool(bias):
    _refused("dense(bias)", lambda: fnet.dense(3, bias=bias), "must be True or False")


def test_numpy_ints_and_bools_are_normalised():
    assert fnet.dense(np.int64(3), bias=np.bool_(False)) == fnet.dense(3, bias=False)
    assert hash(fnet.dense(np.int32(3))) == hash(fnet.dense(3))
    assert type(fnet.dense(np.int64(3)).out_features) is int


@pytest.mark.parametrize("alpha, problem", [
    (math.nan, "must be finite, got nan"), (math.inf, "must be finite, got inf"),
    ("0.1", "must be a real number, got '0.1' (str)"),
    (True, "must be a real number, got True (bool)")])
def test_leaky_relu_slope_must_be_a_finite_number(alpha, problem):
    _refused("leaky_relu(alpha)", lambda: fnet.leaky_relu(alpha), problem)


def test_training_entry_points_name_the_optimizer(setup):
    net, params, _, _ = setup
    _refused("optimizer", lambda: fnet.train_step(net, SE, "adam"),
             "must be an optax.GradientTransformation")
    _refused("optimizer", lambda: fnet.init_train_state(params, optax.adam),
             "must be an optax.GradientTransformation")


# --------------------------------------------------------------------------------------
# more entry points, found by trying bad inputs one by one


def test_containers_keys_and_names_are_checked(setup):
    net, params, x, y = setup
    _refused("residual(layer)", lambda: fnet.residual(3), "must be a funcnet Layer, got 3")
    _refused("name", lambda: fnet.chain(fnet.dense(2), name=3), "must be a str")
    _refused("key", lambda: net.init(0, (3,)), "must be one PRNG key", "got 0")
    _refused("key", lambda: fnet.layer(lambda w, z: z).init(7, (3,)), "must be one PRNG key")


def test_targets_that_are_none_are_named(setup):
    net, params, x, _ = setup
    _refused("y", lambda: fnet.value_and_grad(net, SE)(params, x, None),
             "squared_error: the targets are None")
    _refused("y", lambda: fnet.per_example_grads(net, SE)(params, x, None), "are None")
    # a user loss that takes no targets gets none
    value, _ = fnet.value_and_grad(net, lambda out, y: jnp.sum(out ** 2))(params, x, None)
    np.testing.assert_allclose(value, jnp.sum(net.apply(params, x) ** 2), rtol=1e-6)


def test_extensions_must_be_a_tuple_of_extension_objects(setup):
    net, params, x, y = setup
    _refused("extensions", lambda: fnet.backprop(net, SE, params, x, y,
                                                 extensions=fnet.extensions.batch_grad),
             "must be a tuple of fnet.extensions objects")


@pytest.mark.parametrize("argument, value, problem", [
    ("rtol", -1.0, "must be non-negative, got -1.0"), ("rtol", "a", "must be a real number"),
    ("atol", math.nan, "must be finite"), ("fd_step", 0.0, "must be positive, got 0.0"),
    ("finite_differences", "yes", "must be True or False")])
def test_check_grads_tolerances_are_checked(setup, argument, value, problem):
    net, params, x, y = setup
    _refused(argument, lambda: fnet.check_grads(net, SE, params, x, y, **{argument: value}),
             problem)


def test_metrics_and_steps_name_their_arguments(setup):
    net, params, x, y = setup
    _refused("with_accuracy", lambda: fnet.evaluate(net, SE, params, x, y, with_accuracy=3),
             "must be True or False")
    with pytest.raises(fnet.LayerError, match=r"accuracy: targets y of shape \(4,\)"):
        fnet.accuracy(jnp.zeros((5, 3)), jnp.zeros((4,), jnp.int32))
    step = fnet.train_step(net, SE, optax.sgd(0.1))
    _refused("state", lambda: step(params, x, y), "must be a fnet.TrainState", "got tuple")
    _refused("x_dot", lambda: fnet.jvp(net, params, x, None, np.ones((5, 3)).tolist()),
             "Python list")
