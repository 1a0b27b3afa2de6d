"""Bad inputs get a LayerError (or the documented exception) that says where (layer index
and name, or the argument), what was expected, what came, and how to fix it. The checks
work on static shapes, so a jitted function raises the same error at trace time."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import funcnet as fnet

SE = fnet.losses.squared_error


def _net():
    # layer 2 is a nested chain whose layer 0 is dense(4)
    return fnet.chain(fnet.dense(8), fnet.relu, fnet.chain(fnet.dense(4), fnet.tanh),
                      fnet.dense(1))


@pytest.fixture
def setup(key):
    net = _net()
    params, _ = net.init(key, (3,))
    x = jax.random.normal(jax.random.key(1), (5, 3))
    y = jax.random.normal(jax.random.key(2), (5, 1))
    return net, params, x, y


def _raises(exc, fn, *args, **kwargs):
    with pytest.raises(exc) as info:
        fn(*args, **kwargs)
    return info.value


def _assert_mentions(message, *parts):
    for part in parts:
        assert part in message, f"{part!r} not in message:\n{message}"


# --------------------------------------------------------------------------------------
# the error type


def test_layer_error_is_a_value_error_with_path_and_problem():
    error = fnet.LayerError("something is off", ((2, "chain"), (0, "dense(4)")))
    assert isinstance(error, ValueError)
    assert str(error) == "layer 2 (chain) > layer 0 (dense(4)): something is off"
    assert error.path == ((2, "chain"), (0, "dense(4)"))
    assert error.problem == "something is off"
    assert str(fnet.LayerError("plain")) == "plain"
    outer = error.inside(1, "trunk")
    assert outer.path == ((1, "trunk"), (2, "chain"), (0, "dense(4)"))
    assert str(outer).startswith("layer 1 (trunk) > layer 2 (chain) > layer 0 (dense(4)): ")


# --------------------------------------------------------------------------------------
# inputs and params that do not fit together


ENTRY_POINTS = {
    "value_and_grad": lambda net, p, x, y: fnet.value_and_grad(net, SE)(p, x, y),
    "grad": lambda net, p, x, y: fnet.grad(net, SE)(p, x, y),
    "backprop": lambda net, p, x, y: fnet.backprop(net, SE, p, x, y),
    "vjp": lambda net, p, x, y: fnet.vjp(net, p, x),
    "jvp": lambda net, p, x, y: fnet.jvp(net, p, x, None, jnp.ones_like(x)),
    "apply": lambda net, p, x, y: net.apply(p, x),
    "per_example_grads": lambda net, p, x, y: fnet.per_example_grads(net, SE)(p, x, y),
    "check_grads": lambda net, p, x, y: fnet.check_grads(net, SE, p, x, y),
    "jacobian": lambda net, p, x, y: fnet.jacobian(net, p, x[0]),
    "layer_jacobians": lambda net, p, x, y: fnet.layer_jacobians(net, p, x[0]),
}


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_input_width_differs_from_params(setup, entry):
    net, params, _, y = setup
    x = jnp.ones((5, 4))  # params were built for 3 features
    error = _raises(fnet.LayerError, ENTRY_POINTS[entry], net, params, x, y)
    assert error.path == ((0, "dense(8)"),)
    message = str(error)
    assert message.startswith("layer 0 (dense(8)): ")
    _assert_mentions(message, "(3, 8)", "(4, 8)", "(4,)")  # actual, expected, input shape
    _assert_mentions(message, "Rebuild them with net.init(key, ")  # the fix


def test_nested_layer_params_built_for_another_width(setup, key):
    net, params, x, y = setup
    other = fnet.chain(fnet.dense(6), fnet.relu, fnet.chain(fnet.dense(4), fnet.tanh),
                       fnet.dense(1))
    other_params, _ = other.init(key, (3,))
    mixed = params[:2] + other_params[2:]  # the nested dense(4) was built for width 6
    error = _raises(fnet.LayerError, fnet.value_and_grad(net, SE), mixed, x, y)
    assert error.path == ((2, "chain"), (0, "dense(4)"))
    message = str(error)
    assert message.startswith("layer 2 (chain) > layer 0 (dense(4)): ")
    _assert_mentions(message, "(6, 4)", "(8, 4)", "(8,)")


def test_nested_layer_error_hint_does_not_misdirect_the_fix(setup, key):
    """The fix offered for a mismatch deep inside the net must be one that works: (8,) is
    the nested layer's input shape, but `net` (what the user holds) takes (3,) inputs, so
    "net.init(key, (8,))" would build params for the wrong input and fail again."""
    net, params, x, y = setup
    other = fnet.chain(fnet.dense(6), fnet.relu, fnet.chain(fnet.dense(4), fnet.tanh),
                       fnet.dense(1))
    other_params, _ = other.init(key, (3,))
    message = str(_raises(fnet.LayerError, fnet.value_and_grad(net, SE),
                          params[:2] + other_params[2:], x, y))
    assert "net.init(key, (8,))" not in message
    assert "Rebuild them with net.init(key, " in message


def test_params_of_a_different_structure(setup):
    net, params, x, y = setup
    no_bias_last = params[:3] + ({"w": params[3]["w"]},)
    error = _raises(fnet.LayerError, fnet.value_and_grad(net, SE), no_bias_last, x, y)
    assert error.path == ((3, "dense(1)"),)
    message = str(error)
    assert message.startswith("layer 3 (dense(1)): ")
    _assert_mentions(message, "structure", "'w'", "'b'", "another network", "net.init")


def test_params_of_another_network(setup, key):
    net, _, x, y = setup
    other = fnet.chain(fnet.dense(8), fnet.tanh, fnet.dense(1))
    other_params, _ = other.init(key, (3,))
    message = str(_raises(fnet.LayerError, fnet.value_and_grad(net, SE), other_params, x, y))
    _assert_mentions(message, "4 layers", "tuple of 4 entries", "tuple of 3 entries",
                     "another network", "net.init(key, in_shape)")


@pytest.mark.parametrize("cut", [3, 5])
def test_params_tuple_of_wrong_length(setup, cut):
    net, params, x, y = setup
    wrong = params[:cut] if cut < 4 else params + ((),)
    message = str(_raises(fnet.LayerError, fnet.value_and_grad(net, SE), wrong, x, y))
    _assert_mentions(message, "tuple of 4 entries", f"got a tuple of {cut} entries")


@pytest.mark.parametrize("wrong", [list, dict])
def test_params_not_a_tuple(setup, wrong):
    net, params, x, y = setup
    bad = list(params) if wrong is list else params[0]
    message = str(_raises(fnet.LayerError, fnet.value_and_grad(net, SE), bad, x, y))
    _assert_mentions(message, "tuple of 4 entries", f"got a {wrong.__name__}")


def test_nested_chain_params_of_wrong_length(setup):
    net, params, x, y = setup
    bad = params[:2] + (params[2][:1],) + params[3:]
    error = _raises(fnet.LayerError, fnet.value_and_grad(net, SE), bad, x, y)
    assert error.path == ((2, "chain"),)
    _assert_mentions(str(error), "layer 2 (chain): ", "chain of 2 layers", "1 entries")


# --------------------------------------------------------------------------------------
# residuals


def test_residual_around_width_changing_layer_at_init(key):
    error = _raises(fnet.LayerError, fnet.residual(fnet.dense(3)).init, key, (4,))
    _assert_mentions(str(error), "residual", "dense(3)", "(4,)", "(3,)", "width 4",
                     "move the width change outside the residual")


def test_residual_around_width_changing_layer_nested_in_a_chain(key):
    net = fnet.chain(fnet.dense(8), fnet.tanh, fnet.residual(fnet.dense(3)))
    error = _raises(fnet.LayerError, net.init, key, (4,))
    assert error.path == ((2, "residual(dense(3))"),)
    message = str(error)
    assert message.startswith("layer 2 (residual(dense(3))): ")
    _assert_mentions(message, "(8,)", "(3,)", "width 8")


def test_residual_deeply_nested_path_at_init(key):
    net = fnet.chain(fnet.dense(4), fnet.chain(fnet.relu, fnet.residual(fnet.dense(2))))
    error = _raises(fnet.LayerError, net.init, key, (3,))
    assert error.path == ((1, "chain"), (1, "residual(dense(2))"))
    assert str(error).startswith("layer 1 (chain) > layer 1 (residual(dense(2))): ")


def test_residual_params_of_wrong_width_at_check(key):
    net = fnet.chain(fnet.dense(4), fnet.residual(fnet.chain(fnet.dense(4), fnet.tanh)))
    params, _ = net.init(key, (3,))
    bad = (params[0], ({"w": jnp.zeros((4, 5)), "b": jnp.zeros(4)}, ()))
    error = _raises(fnet.LayerError, fnet.value_and_grad(net, SE), bad, jnp.ones((2, 3)),
                    jnp.ones((2, 4)))
    assert error.path[0] == (1, "residual(chain)")
    assert error.path[-1][1] == "dense(4)"
    _assert_mentions(str(error), "(4, 5)", "(4, 4)")


# --------------------------------------------------------------------------------------
# targets and losses


def test_targets_batch_differs(setup):
    net, params, x, _ = setup
    y = jnp.zeros((4, 1))
    message = str(_raises(fnet.LayerError, fnet.value_and_grad(net, SE), params, x, y))
    _assert_mentions(message, "batch size 4", "batch size 5", "(4, 1)", "(5, 1)",
                     "one target per input example")


def test_targets_batch_differs_in_per_example_grads(setup):
    net, params, x, _ = setup
    message = str(_raises(fnet.LayerError, fnet.per_example_grads(net, SE), params, x,
                          jnp.zeros((4, 1))))
    _assert_mentions(message, "(4, 1)", "batch size 5", "one target per example")


def test_targets_width_differs_squared_error(setup):
    net, params, x, _ = setup
    y = jnp.zeros((5, 2))
    message = str(_raises(fnet.LayerError, fnet.value_and_grad(net, SE), params, x, y))
    _assert_mentions(message, "squared_error", "(5, 2)", "(5, 1)", "Reshape y")


def test_integer_labels_out_of_range(key):
    net = fnet.chain(fnet.dense(3))
    params, _ = net.init(key, (2,))
    message = str(_raises(fnet.ArgumentError,
                          fnet.value_and_grad(net, fnet.losses.softmax_cross_entropy),
                          params, jnp.ones((3, 2)), jnp.array([0, 1, 5])))
    _assert_mentions(message, "softmax_cross_entropy", "label 5 at example 2",
                     "3 output classes", "[0, 2]", "as many outputs as there are classes")


def test_loss_returning_a_non_scalar(setup):
    net, params, x, y = setup

    def per_example(out, t):
        return jnp.sum((out - t) ** 2, axis=1)

    message = str(_raises(fnet.LayerError, fnet.value_and_grad(net, per_example),
                          params, x, y))
    _assert_mentions(message, "per_example", "(5,)", "scalar", "mean over the batch")


# --------------------------------------------------------------------------------------
# tangents and cotangents


def test_x_dot_shape_differs(setup):
    net, params, x, _ = setup
    message = str(_raises(fnet.LayerError, fnet.jvp, net, params, x, None, jnp.ones((5, 4))))
    _assert_mentions(message, "x_dot", "(5, 4)", "(5, 3)")


def test_x_dot_dtype_differs(setup):
    net, params, x, _ = setup
    message = str(_raises(fnet.LayerError, fnet.jvp, net, params, x, None,
                          jnp.ones((5, 3), jnp.float32)))
    _assert_mentions(message, "x_dot", "float32", "float64")


def test_params_dot_shape_differs_names_the_layer(setup):
    net, params, x, _ = setup
    dot = jax.tree.map(jnp.zeros_like, params)
    dot = dot[:2] + (({"w": jnp.zeros((8, 5)), "b": jnp.zeros(4)}, ()),) + dot[3:]
    error = _raises(fnet.LayerError, fnet.jvp, net, params, x, dot, None)
    assert error.path == ((2, "chain"), (0, "dense(4)"))
    message = str(error)
    assert message.startswith("layer 2 (chain) > layer 0 (dense(4)): ")
    _assert_mentions(message, "params_dot", "(8, 5)", "(8, 4)")


def test_params_dot_dtype_differs_names_the_layer(setup):
    net, params, x, _ = setup
    dot = jax.tree.map(jnp.zeros_like, params)
    dot = dot[:3] + (jax.tree.map(lambda a: a.astype(jnp.float32), dot[3]),)
    error = _raises(fnet.LayerError, fnet.jvp, net, params, x, dot, None)
    assert error.path == ((3, "dense(1)"),)
    _assert_mentions(str(error), "params_dot", "float32", "float64")


def test_params_dot_wrong_structure(setup):
    net, params, x, _ = setup
    dot = jax.tree.map(jnp.zeros_like, params)[:3]
    message = str(_raises(fnet.LayerError, fnet.jvp, net, params, x, dot, None))
    _assert_mentions(message, "params_dot", "tuple of 4 entries", "3 entries")


def test_pullback_cotangent_of_wrong_shape(setup):
    net, params, x, _ = setup
    out, pullback = fnet.vjp(net, params, x)
    message = str(_raises(fnet.LayerError, pullback, jnp.ones((5, 2))))
    _assert_mentions(message, "cotangent", "(5, 2)", "(5, 1)", "shaped like the output")
    # the right shape still works
    ct_params, ct_x = pullback(jnp.ones_like(out))
    assert ct_x.shape == x.shape


# --------------------------------------------------------------------------------------
# arguments


def test_jacobian_unknown_mode(setup):
    net, params, x, _ = setup
    message = str(_raises(fnet.ArgumentError, fnet.jacobian, net, params, x[0], mode="sideways"))
    _assert_mentions(message, "mode", "'sideways'", "'forward'", "'reverse'")


def test_jacobian_unknown_wrt(setup):
    net, params, x, _ = setup
    message = str(_raises(fnet.ArgumentError, fnet.jacobian, net, params, x[0], wrt="weights"))
    _assert_mentions(message, "wrt", "'weights'", "'input'", "'params'")


def test_jacobian_optimal_mode_is_a_valid_choice(setup):
    """mode="optimal" is accepted (no error) and gives the same numbers as reverse mode."""
    net, params, x, _ = setup
    for wrt in ("input", "params"):
        optimal = fnet.jacobian(net, params, x[0], wrt=wrt, mode="optimal")
        reverse = fnet.jacobian(net, params, x[0], wrt=wrt, mode="reverse")
        assert jax.tree.structure(optimal) == jax.tree.structure(reverse)
        for a, b in zip(jax.tree.leaves(optimal), jax.tree.leaves(reverse)):
            assert a.shape == b.shape
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)


def test_x_without_batch_axis(setup):
    net, params, x, y = setup
    error = _raises(fnet.LayerError, fnet.value_and_grad(net, SE), params, x[0], y)
    assert error.path == ((0, "dense(8)"),)
    _assert_mentions(str(error), "layer 0 (dense(8))", "per-example shape ()",
                     "leading batch axis", "(batch, features)", "x[None]")


def test_scalar_x(setup):
    net, params, _, y = setup
    message = str(_raises(fnet.LayerError, fnet.value_and_grad(net, SE), params,
                          jnp.float64(1.0), y))
    _assert_mentions(message, "leading batch axis", "scalar", "(batch, *in_shape)")


def test_x_without_batch_axis_behind_shape_preserving_layers(key):
    net = fnet.chain(fnet.relu, fnet.dense(2))
    params, _ = net.init(key, (3,))
    error = _raises(fnet.LayerError, net.apply, params, jnp.ones(3))
    assert error.path == ((1, "dense(2)"),)
    _assert_mentions(str(error), "x[None]")


def test_chain_given_a_non_layer():
    def g(z):
        return z

    message = str(_raises(fnet.ArgumentError, fnet.chain, fnet.dense(3), g))
    _assert_mentions(message, "chain(...)", "argument 1", "function", "fnet.layer",
                     "fnet.Layer(init, apply, name)")
    message = str(_raises(fnet.ArgumentError, fnet.chain, 3))
    _assert_mentions(message, "argument 0", "int")


def test_entry_points_given_a_non_layer(setup):
    _, params, x, y = setup
    message = str(_raises(TypeError, fnet.value_and_grad(lambda p, z: z, SE), params, x, y))
    _assert_mentions(message, "funcnet Layer", "function")


# --------------------------------------------------------------------------------------
# the checks are on static shapes: jit raises the same error at trace time


def test_jitted_value_and_grad_raises_the_same_error_and_recovers(setup):
    net, params, x, y = setup
    eager_fn = fnet.value_and_grad(net, SE)
    jitted = jax.jit(eager_fn)
    bad_x = jnp.ones((5, 4))
    eager = _raises(fnet.LayerError, eager_fn, params, bad_x, y)
    traced = _raises(fnet.LayerError, jitted, params, bad_x, y)
    assert str(traced) == str(eager)
    assert traced.path == eager.path == ((0, "dense(8)"),)
    # targets are checked at trace time too
    bad_y = _raises(fnet.LayerError, jitted, params, x, jnp.zeros((4, 1)))
    assert "batch size 4" in str(bad_y)
    # and good inputs work afterwards, agreeing with the eager result
    value, grads = jitted(params, x, y)
    ref_value, ref_grads = eager_fn(params, x, y)
    np.testing.assert_allclose(float(value), float(ref_value), rtol=1e-12)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)


def test_jitted_jvp_and_vjp_raise_at_trace_time(setup):
    net, params, x, _ = setup
    with pytest.raises(fnet.LayerError, match=re.escape("layer 0 (dense(8))")):
        jax.jit(lambda p, z: fnet.vjp(net, p, z)[0])(params, jnp.ones((5, 4)))
    with pytest.raises(fnet.LayerError, match="x_dot"):
        jax.jit(lambda p, z, d: fnet.jvp(net, p, z, None, d))(params, x, jnp.ones((5, 2)))


def test_shape_check_needs_no_concrete_values(setup):
    """Inside jit everything is a tracer; a good call must not trip a value-based check."""
    net, params, x, y = setup
    value = jax.jit(lambda p, a, b: fnet.backprop(net, SE, p, a, b).value)(params, x, y)
    assert np.isfinite(float(value))
    # and under vmap of single-example jacobians
    jac = jax.vmap(lambda xi: fnet.jacobian(net, params, xi))(x)
    assert jac.shape == (5, 1, 3)
