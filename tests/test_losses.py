"""Losses: values against numpy formulas, shape rules, stability for huge logits, the
analytic seed q_{L+1} of the backward pass, user losses, and out-of-range labels."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import funcnet as fnet

L = fnet.losses
RTOL = 1e-12


def _normal(seed, shape):
    return np.asarray(jax.random.normal(jax.random.key(seed), shape))


# --------------------------------------------------------------------------------------
# numpy references (independent of jax)


def np_squared_error(out, y):
    b = out.shape[0]
    return np.mean(0.5 * np.sum(((out - y) ** 2).reshape(b, -1), axis=1))


def np_log_sigmoid(o):
    return -np.logaddexp(0.0, -o)


def np_sigmoid(o):
    # stable for |o| large: exp never overflows
    e = np.exp(-np.abs(o))
    return np.where(o >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def np_logistic(out, y):
    b = out.shape[0]
    per = -(y * np_log_sigmoid(out) + (1.0 - y) * np_log_sigmoid(-out))
    return np.mean(np.sum(per.reshape(b, -1), axis=1))


def np_log_softmax(out):
    m = out.max(axis=1, keepdims=True)
    return out - m - np.log(np.sum(np.exp(out - m), axis=1, keepdims=True))


def np_softmax(out):
    return np.exp(np_log_softmax(out))


def np_softmax_ce_labels(out, labels):
    return np.mean(-np_log_softmax(out)[np.arange(out.shape[0]), labels])


def np_softmax_ce_probs(out, probs):
    return np.mean(-np.sum(probs * np_log_softmax(out), axis=1))


# --------------------------------------------------------------------------------------
# values


@pytest.mark.parametrize("shape", [(5,), (5, 3), (4, 2, 3)])
def test_squared_error_values(shape):
    out, y = _normal(0, shape), _normal(1, shape)
    value = L.squared_error(jnp.asarray(out), jnp.asarray(y))
    assert value.shape == ()
    np.testing.assert_allclose(float(value), np_squared_error(out, y), rtol=RTOL)


def test_squared_error_hand_computed():
    # per example 0.5 * ||out - y||^2 = 0.5 * (1 + 4) and 0.5 * 9; mean = (2.5 + 4.5) / 2
    out = jnp.array([[1.0, 2.0], [0.0, 3.0]])
    y = jnp.array([[0.0, 0.0], [0.0, 0.0]])
    assert float(L.squared_error(out, y)) == pytest.approx(3.5, rel=1e-15)


@pytest.mark.parametrize("loss", [L.squared_error, L.logistic])
def test_losses_are_batch_means(loss):
    """Repeating the batch leaves a mean unchanged (a sum would double)."""
    out = jnp.asarray(_normal(0, (4, 3)))
    y = jnp.asarray((_normal(1, (4, 3)) > 0).astype(np.float64))
    single = float(loss(out, y))
    double = float(loss(jnp.concatenate([out, out]), jnp.concatenate([y, y])))
    assert double == pytest.approx(single, rel=1e-13)


def test_softmax_ce_is_batch_mean():
    out, y = jnp.asarray(_normal(0, (4, 3))), jnp.array([0, 2, 1, 1])
    double = L.softmax_cross_entropy(jnp.concatenate([out, out]), jnp.concatenate([y, y]))
    assert float(double) == pytest.approx(float(L.softmax_cross_entropy(out, y)), rel=1e-13)


@pytest.mark.parametrize("shape", [(6,), (6, 3)])
def test_logistic_values_binary_targets(shape):
    out = 3.0 * _normal(0, shape)
    y = (_normal(1, shape) > 0).astype(np.float64)
    value = L.logistic(jnp.asarray(out), jnp.asarray(y))
    np.testing.assert_allclose(float(value), np_logistic(out, y), rtol=RTOL)


def test_logistic_refuses_targets_other_than_zero_and_one():
    out, y = _normal(0, (6, 2)), np.array(np_sigmoid(_normal(1, (6, 2))))
    y[:2] = 1.0
    y[2, 0] = 0.0
    with pytest.raises(fnet.ArgumentError, match=r"y: logistic takes binary labels, 0 or 1, "
                                                 r"but y\[2, 1\] is 0\.\d+"):
        L.logistic(jnp.asarray(out), jnp.asarray(y))
    with pytest.raises(fnet.ArgumentError, match=r"y\[1\] is 2"):
        L.logistic(jnp.zeros((3,)), jnp.array([0, 2, 1]))


def test_logistic_target_outside_zero_one_is_nan_under_jit():
    out = jnp.zeros((3,))
    assert np.isnan(float(jax.jit(L.logistic)(out, jnp.array([0.0, 0.5, 1.0]))))
    grads = jax.jit(jax.grad(L.logistic))(out, jnp.array([0.0, -1.0, 1.0]))
    assert np.isnan(np.asarray(grads)[1]) and np.isfinite(np.asarray(grads)[[0, 2]]).all()
    assert float(jax.jit(L.logistic)(out, jnp.array([0.0, 1.0, 1.0]))) == pytest.approx(
        math.log(2.0), rel=1e-15)


def test_logistic_at_zero_logits_is_log2():
    value = L.logistic(jnp.zeros((3,)), jnp.array([0.0, 1.0, 1.0]))
    assert float(value) == pytest.approx(math.log(2.0), rel=1e-15)


def test_logistic_accepts_column_outputs_with_flat_targets():
    out = _normal(0, (6, 1))
    y = (_normal(1, (6,)) > 0).astype(np.float64)
    column = L.logistic(jnp.asarray(out), jnp.asarray(y))
    flat = L.logistic(jnp.asarray(out[:, 0]), jnp.asarray(y))
    np.testing.assert_allclose(float(column), np_logistic(out[:, 0], y), rtol=RTOL)
    np.testing.assert_allclose(float(column), float(flat), rtol=RTOL)
    # integer targets work too
    as_int = L.logistic(jnp.asarray(out), jnp.asarray(y.astype(np.int32)))
    np.testing.assert_allclose(float(as_int), float(column), rtol=RTOL)


def test_logistic_column_exception_is_only_for_one_unit():
    with pytest.raises(fnet.LayerError, match=r"\(6,\).*\(6, 2\)"):
        L.logistic(jnp.zeros((6, 2)), jnp.zeros((6,)))


def test_softmax_ce_integer_labels_values():
    out, labels = 2.0 * _normal(0, (7, 4)), np.array([0, 3, 1, 2, 2, 0, 3])
    value = L.softmax_cross_entropy(jnp.asarray(out), jnp.asarray(labels))
    np.testing.assert_allclose(float(value), np_softmax_ce_labels(out, labels), rtol=RTOL)


def test_softmax_ce_probability_rows_values():
    out, probs = _normal(0, (5, 3)), np_softmax(_normal(1, (5, 3)))
    value = L.softmax_cross_entropy(jnp.asarray(out), jnp.asarray(probs))
    np.testing.assert_allclose(float(value), np_softmax_ce_probs(out, probs), rtol=RTOL)


@pytest.mark.parametrize("int_dtype", [jnp.int32, jnp.int64])
def test_softmax_ce_integer_labels_equal_one_hot_rows(int_dtype):
    out, labels = _normal(0, (7, 4)), np.array([0, 3, 1, 2, 2, 0, 3])
    one_hot = np.eye(4)[labels]
    by_label = L.softmax_cross_entropy(jnp.asarray(out), jnp.asarray(labels, int_dtype))
    by_rows = L.softmax_cross_entropy(jnp.asarray(out), jnp.asarray(one_hot))
    np.testing.assert_allclose(float(by_label), float(by_rows), rtol=RTOL)
    g_label = jax.grad(L.softmax_cross_entropy)(jnp.asarray(out), jnp.asarray(labels, int_dtype))
    g_rows = jax.grad(L.softmax_cross_entropy)(jnp.asarray(out), jnp.asarray(one_hot))
    np.testing.assert_allclose(g_label, g_rows, rtol=RTOL, atol=1e-15)


def test_softmax_ce_uniform_logits_is_log_k():
    value = L.softmax_cross_entropy(jnp.zeros((3, 5)), jnp.array([0, 4, 2]))
    assert float(value) == pytest.approx(math.log(5.0), rel=1e-15)


# --------------------------------------------------------------------------------------
# shape rules


def test_squared_error_does_not_broadcast():
    with pytest.raises(fnet.LayerError, match=r"squared_error.*\(5,\).*\(5, 1\).*Reshape y"):
        L.squared_error(jnp.zeros((5, 1)), jnp.zeros((5,)))


def test_softmax_ce_needs_2d_logits():
    with pytest.raises(fnet.LayerError, match=r"\(batch, classes\).*\(5,\)"):
        L.softmax_cross_entropy(jnp.zeros((5,)), jnp.zeros((5,), jnp.int32))


def test_softmax_ce_integer_labels_need_one_per_example():
    with pytest.raises(fnet.LayerError, match=r"shape \(5,\).*\(5, 1\)"):
        L.softmax_cross_entropy(jnp.zeros((5, 3)), jnp.zeros((5, 1), jnp.int32))


# --------------------------------------------------------------------------------------
# numerical stability and the analytic gradient (the backward pass's seed q_{L+1})

BIG = 1e4


def test_logistic_is_finite_for_huge_logits():
    out = np.array([[BIG], [-BIG], [BIG], [-BIG], [0.5]])
    y = np.array([1.0, 0.0, 0.0, 1.0, 1.0])
    value = L.logistic(jnp.asarray(out), jnp.asarray(y))
    assert np.isfinite(float(value))
    # right answers: 0, 0, 1e4, 1e4 and log(1 + e^-0.5), meaned over 5
    expected = (2 * BIG + math.log1p(math.exp(-0.5))) / 5
    assert float(value) == pytest.approx(expected, rel=1e-12)
    np.testing.assert_allclose(float(value), np_logistic(out[:, 0], y), rtol=1e-12)
    grad = jax.grad(L.logistic)(jnp.asarray(out), jnp.asarray(y))
    assert np.all(np.isfinite(grad))
    analytic = (np_sigmoid(out) - y[:, None]) / out.shape[0]
    np.testing.assert_allclose(grad, analytic, rtol=1e-12, atol=1e-300)


def test_softmax_ce_is_finite_for_huge_logits():
    out = np.array([[BIG, 0.0, -BIG], [-BIG, BIG, 0.0], [-BIG, -BIG, -BIG], [BIG, BIG, 0.0]])
    labels = np.array([0, 2, 1, 1])
    value = L.softmax_cross_entropy(jnp.asarray(out), jnp.asarray(labels))
    assert np.isfinite(float(value))
    np.testing.assert_allclose(float(value), np_softmax_ce_labels(out, labels), rtol=1e-12)
    # by hand: 0, 1e4, log 3, log 2; meaned over 4
    assert float(value) == pytest.approx((BIG + math.log(3) + math.log(2)) / 4, rel=1e-12)
    grad = jax.grad(L.softmax_cross_entropy)(jnp.asarray(out), jnp.asarray(labels))
    assert np.all(np.isfinite(grad))
    analytic = (np_softmax(out) - np.eye(3)[labels]) / out.shape[0]
    np.testing.assert_allclose(grad, analytic, rtol=1e-12, atol=1e-300)
    # probability rows take the same (stable) route
    rows = jax.grad(L.softmax_cross_entropy)(jnp.asarray(out), jnp.asarray(np.eye(3)[labels]))
    np.testing.assert_allclose(rows, analytic, rtol=1e-12, atol=1e-300)


def test_huge_logits_through_the_hand_written_backward_pass():
    """The loss is the last step of backprop: the chain stays finite with huge logits."""
    net = fnet.chain(fnet.dense(3))
    params = ({"w": jnp.array([[BIG, 0.0, -BIG]]), "b": jnp.zeros(3)},)
    x = jnp.array([[1.0], [-1.0]])
    y = jnp.array([2, 0])
    value, grads = fnet.value_and_grad(net, L.softmax_cross_entropy)(params, x, y)
    assert np.isfinite(float(value))
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(grads))
    ref_value, ref_grads = jax.value_and_grad(
        lambda p: L.softmax_cross_entropy(net.apply(p, x), y))(params)
    np.testing.assert_allclose(float(value), float(ref_value), rtol=1e-12)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-300)


@pytest.mark.parametrize("name", ["squared_error", "logistic", "softmax_cross_entropy"])
def test_backprop_seed_is_the_analytic_loss_gradient(key, name):
    """q_{L+1}: (out - y)/B, (sigmoid(out) - y)/B, (softmax(out) - onehot(y))/B."""
    net = fnet.chain(fnet.dense(4), fnet.tanh, fnet.dense(3))
    params, _ = net.init(key, (2,))
    x = jnp.asarray(_normal(1, (5, 2)))
    if name == "squared_error":
        y = _normal(2, (5, 3))
    elif name == "logistic":
        y = (_normal(2, (5, 3)) > 0).astype(np.float64)
    else:
        y = np.array([0, 2, 1, 1, 0])
    record = fnet.backprop(net, getattr(L, name), params, x, jnp.asarray(y))
    out = np.asarray(record.activations[-1])
    if name == "squared_error":
        seed = (out - y) / 5
    elif name == "logistic":
        seed = (np_sigmoid(out) - y) / 5
    else:
        seed = (np_softmax(out) - np.eye(3)[y]) / 5
    np.testing.assert_allclose(record.cotangents[-1], seed, rtol=1e-12, atol=1e-15)


# --------------------------------------------------------------------------------------
# user losses


def _log_cosh(out, y):
    return jnp.mean(jnp.sum(jnp.log(jnp.cosh(out - y)), axis=1))


def test_user_callable_loss_with_value_and_grad(key):
    net = fnet.chain(fnet.dense(5), fnet.softplus, fnet.dense(2))
    params, _ = net.init(key, (3,))
    x, y = jnp.asarray(_normal(1, (6, 3))), jnp.asarray(_normal(2, (6, 2)))
    value, grads = fnet.value_and_grad(net, _log_cosh)(params, x, y)
    ref_value, ref_grads = jax.value_and_grad(lambda p: _log_cosh(net.apply(p, x), y))(params)
    np.testing.assert_allclose(float(value), float(ref_value), rtol=1e-12)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)
    # the value is the numpy formula
    out = np.asarray(net.apply(params, x))
    np.testing.assert_allclose(float(value),
                               np.mean(np.sum(np.log(np.cosh(out - np.asarray(y))), axis=1)),
                               rtol=1e-12)
    # a jitted user loss, too
    jv, _ = jax.jit(fnet.value_and_grad(net, _log_cosh))(params, x, y)
    np.testing.assert_allclose(float(jv), float(ref_value), rtol=1e-12)


def test_user_loss_with_pytree_targets(key):
    """Targets are passed through untouched: any pytree the user's loss understands."""
    net = fnet.chain(fnet.dense(2))
    params, _ = net.init(key, (3,))
    x = jnp.asarray(_normal(1, (4, 3)))
    y = {"target": jnp.asarray(_normal(2, (4, 2))), "weight": jnp.asarray(np.arange(1.0, 5.0))}

    def weighted(out, t):
        return jnp.mean(t["weight"] * jnp.sum((out - t["target"]) ** 2, axis=1))

    value, grads = fnet.value_and_grad(net, weighted)(params, x, y)
    ref_value, ref_grads = jax.value_and_grad(lambda p: weighted(net.apply(p, x), y))(params)
    np.testing.assert_allclose(float(value), float(ref_value), rtol=1e-12)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)


# --------------------------------------------------------------------------------------
# out-of-range integer labels


@pytest.mark.parametrize("bad, index", [(4, 1), (-1, 2), (100, 0)])
def test_out_of_range_label_is_a_clear_error_when_concrete(bad, index):
    labels = [0, 1, 2]
    labels[index] = bad
    with pytest.raises(fnet.ArgumentError) as info:
        L.softmax_cross_entropy(jnp.zeros((3, 4)), jnp.array(labels))
    message = str(info.value)
    assert f"label {bad} at example {index}" in message
    assert "[0, 3]" in message and "4 output classes" in message
    assert "as many outputs as there are classes" in message  # the fix


def test_out_of_range_label_is_an_error_through_value_and_grad(key):
    net = fnet.chain(fnet.dense(3))
    params, _ = net.init(key, (2,))
    x = jnp.ones((2, 2))
    with pytest.raises(fnet.ArgumentError, match=r"label 3 at example 1"):
        fnet.value_and_grad(net, L.softmax_cross_entropy)(params, x, jnp.array([0, 3]))


def test_out_of_range_label_is_nan_under_jit():
    labels = jnp.array([0, 4, 1])
    value = jax.jit(L.softmax_cross_entropy)(jnp.zeros((3, 4)), labels)
    assert np.isnan(float(value))
    good = jax.jit(L.softmax_cross_entropy)(jnp.zeros((3, 4)), jnp.array([0, 3, 1]))
    assert float(good) == pytest.approx(math.log(4.0), rel=1e-15)


def test_out_of_range_label_is_nan_under_jitted_value_and_grad(key):
    net = fnet.chain(fnet.dense(3))
    params, _ = net.init(key, (2,))
    x = jnp.ones((2, 2))
    value, _ = jax.jit(fnet.value_and_grad(net, L.softmax_cross_entropy))(
        params, x, jnp.array([0, -1]))
    assert np.isnan(float(value))


def test_out_of_range_label_is_an_error_in_per_example_grads(key):
    """Concrete labels passed to per_example_grads are checked like anywhere else.

    Expected behaviour per DESIGN/losses docs ("labels out of range raise an error when y
    is concrete"). Under the per-example vmap the labels become tracers, so the check in
    softmax_cross_entropy is skipped: the bad example silently gets an all-zero gradient
    and (since per_example_grads returns no loss value) no NaN ever shows.
    """
    net = fnet.chain(fnet.dense(3))
    params, _ = net.init(key, (2,))
    x = jnp.ones((2, 2))
    with pytest.raises(fnet.ArgumentError, match=r"out of range"):
        fnet.per_example_grads(net, L.softmax_cross_entropy)(params, x, jnp.array([0, 7]))


# --------------------------------------------------------------------------------------
# class targets that are not labels or probabilities, and empty batches


def test_float_class_labels_must_be_integers():
    with pytest.raises(fnet.ArgumentError, match=r"y: softmax_cross_entropy: labels must be "
                                                 r"integers, got float\d+ labels of shape "
                                                 r"\(3,\).*astype\(jnp.int32\).*\(3, 4\)"):
        L.softmax_cross_entropy(jnp.zeros((3, 4)), jnp.array([0.0, 1.0, 2.0]))


def test_probability_rows_must_be_non_negative():
    y = np.full((3, 4), 0.25)
    y[1] = [0.5, 0.6, -0.1, 0.0]
    with pytest.raises(fnet.ArgumentError, match=r"non-negative, but y\[1, 2\] is -0\.1"):
        L.softmax_cross_entropy(jnp.zeros((3, 4)), jnp.asarray(y))


def test_probability_rows_must_sum_to_one():
    y = np.full((3, 4), 0.25)
    y[2] = [1.0, 2.0, 0.0, 1.0]  # scores, not probabilities
    with pytest.raises(fnet.ArgumentError, match=r"row 2 sums to 4 \(1 of 3 rows"):
        L.softmax_cross_entropy(jnp.zeros((3, 4)), jnp.asarray(y))
    # rounding in float32 is not a mistake
    rows = np.asarray(jax.nn.softmax(jnp.asarray(_normal(0, (50, 7)), jnp.float32)))
    assert np.isfinite(float(L.softmax_cross_entropy(jnp.zeros((50, 7), jnp.float32), rows)))


def test_probability_rows_are_checked_before_training(key):
    net = fnet.chain(fnet.dense(3))
    params, _ = net.init(key, (2,))
    y = jnp.array([[0.5, 0.5, 0.5], [1.0, 0.0, 0.0]])
    with pytest.raises(fnet.ArgumentError, match=r"row 0 sums to 1\.5"):
        fnet.value_and_grad(net, L.softmax_cross_entropy)(params, jnp.ones((2, 2)), y)


@pytest.mark.parametrize("loss", [L.squared_error, L.logistic, L.softmax_cross_entropy])
def test_losses_refuse_an_empty_batch(loss):
    y = jnp.zeros((0,), jnp.int32) if loss is L.softmax_cross_entropy else jnp.zeros((0, 3))
    with pytest.raises(fnet.ArgumentError, match=r"0 examples"):
        loss(jnp.zeros((0, 3)), y)
