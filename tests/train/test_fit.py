"""Training: the jitted step, evaluate, and fit over the lecture notes' four optimisers."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import funcnet as fnet

pytestmark = pytest.mark.standard_promotion  # optax promotes Python floats against int32

LOSS = fnet.losses.softmax_cross_entropy


def _problem(n=48, width=5, classes=3, seed=0):
    net = fnet.chain(fnet.dense(16), fnet.tanh, fnet.dense(classes))
    params, _ = net.init(jax.random.key(seed), (width,))
    x = jax.random.normal(jax.random.key(seed + 1), (n, width))
    y = (jnp.argmax(x[:, :classes], axis=1)).astype(jnp.int32)  # learnable labels
    return net, params, x, y


def _max_diff(a, b):
    return max(float(jnp.max(jnp.abs(u - v))) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_train_step_equals_optax_step_with_jax_grad():
    net, params, x, y = _problem()
    optimizer = optax.adam(1e-2)
    step = fnet.train_step(net, LOSS, optimizer)
    state = fnet.init_train_state(params, optimizer)
    opt_state = optimizer.init(params)
    reference = params
    for _ in range(3):
        state, value = step(state, x, y)
        ref_value, grads = jax.value_and_grad(lambda p: LOSS(net.apply(p, x), y))(reference)
        updates, opt_state = optimizer.update(grads, opt_state, reference)
        reference = optax.apply_updates(reference, updates)
        assert abs(float(value) - float(ref_value)) <= 1e-12
    assert _max_diff(state.params, reference) <= 1e-12
    assert int(state.step) == 3


def test_train_step_donates_the_state():
    net, params, x, y = _problem()
    optimizer = optax.sgd(0.1)
    step = fnet.train_step(net, LOSS, optimizer)
    state = fnet.init_train_state(jax.tree.map(jnp.copy, params), optimizer)
    old_w = state.params[0]["w"]
    new_state, _ = step(state, x, y)
    assert old_w.is_deleted()  # the buffer was handed to XLA for the new params
    assert not new_state.params[0]["w"].is_deleted()


def test_evaluate_loss_and_accuracy_match_numpy():
    net, params, x, y = _problem()
    metrics = fnet.evaluate(net, LOSS, params, x, y)
    out = np.asarray(net.apply(params, x))
    assert metrics["accuracy"] == pytest.approx(np.mean(out.argmax(1) == np.asarray(y)))
    assert metrics["loss"] == pytest.approx(float(LOSS(jnp.asarray(out), y)), rel=1e-12)
    regression = fnet.evaluate(net, fnet.losses.squared_error, params, x, jnp.zeros((48, 3)))
    assert set(regression) == {"loss"}


def test_binary_accuracy_thresholds_logits_at_zero():
    out = jnp.array([[2.0], [-1.0], [0.5], [-3.0]])
    y = jnp.array([1, 0, 0, 0])
    assert float(fnet.accuracy(out, y)) == 0.75


@pytest.mark.parametrize(
    "optimizer, batch_size, epochs",
    [(optax.sgd(0.5), None, 30),   # full-batch gradient descent
     (optax.sgd(0.05), 1, 2),      # SGD, one example per step
     (optax.sgd(0.2), 8, 8),       # mini-batch SGD
     (optax.adam(1e-2), 8, 8)],    # Adam
    ids=["full-batch GD", "SGD", "mini-batch SGD", "Adam"],
)
def test_fit_configurations_learn(optimizer, batch_size, epochs):
    net, params, x, y = _problem()
    result = fnet.fit(net, LOSS, optimizer, params, x, y, key=jax.random.key(3),
                      epochs=epochs, batch_size=batch_size, eval_data=(x, y), progress=False)
    steps_per_epoch = 48 // (batch_size or 48)
    assert result.history.step_loss.shape == (epochs * steps_per_epoch,)
    assert len(result.history.epochs) == epochs
    assert int(result.state.step) == epochs * steps_per_epoch
    first, last = result.history.epochs[0], result.history.epochs[-1]
    assert last["train_loss"] < first["train_loss"]
    assert last["eval_accuracy"] > 0.6
    assert [row["epoch"] for row in result.history.epochs] == list(range(epochs))
    times = [row["time"] for row in result.history.epochs]
    assert times == sorted(times)


def test_fit_is_deterministic_in_its_key_and_shuffles():
    net, params, x, y = _problem()
    def run(seed):
        return fnet.fit(net, LOSS, optax.sgd(0.1), params, x, y, key=jax.random.key(seed),
                        epochs=2, batch_size=4, progress=False)
    a, b, c = run(0), run(0), run(1)
    np.testing.assert_array_equal(a.history.step_loss, b.history.step_loss)
    assert _max_diff(a.params, b.params) == 0.0
    assert not np.array_equal(a.history.step_loss, c.history.step_loss)


def test_fit_resumed_in_two_halves_equals_one_run_bit_for_bit():
    net, params, x, y = _problem()
    optimizer = optax.adam(1e-2)
    kwargs = dict(key=jax.random.key(7), batch_size=8, progress=False)
    whole = fnet.fit(net, LOSS, optimizer, params, x, y, epochs=4, **kwargs)
    first = fnet.fit(net, LOSS, optimizer, params, x, y, epochs=2, **kwargs)
    second = fnet.fit(net, LOSS, optimizer, None, x, y, epochs=2, state=first.state,
                      first_epoch=2, **kwargs)
    assert _max_diff(whole.params, second.params) == 0.0
    np.testing.assert_array_equal(
        whole.history.step_loss,
        np.concatenate([first.history.step_loss, second.history.step_loss]))


def test_non_finite_loss_stops_with_the_step_and_last_finite_loss():
    net, params, x, y = _problem(n=8)
    x = x.at[5].set(jnp.nan)  # one poisoned example; batch size 1 and a known order
    key = jax.random.key(0)
    order = np.asarray(jax.random.permutation(jax.random.fold_in(key, 0), 8))
    bad_step = int(np.flatnonzero(order == 5)[0]) + 1
    with pytest.raises(fnet.TrainingError, match=rf"at step {bad_step};") as info:
        fnet.fit(net, LOSS, optax.sgd(0.01), params, x, y, key=key, epochs=1,
                 batch_size=1, progress=False)
    if bad_step > 1:
        assert "last finite loss was" in str(info.value)
        assert f"at step {bad_step - 1}" in str(info.value)


def test_fit_rejects_a_batch_size_larger_than_the_data():
    net, params, x, y = _problem(n=8)
    with pytest.raises(fnet.ArgumentError, match=r"batch_size: must lie in \[1, 8\]"):
        fnet.fit(net, LOSS, optax.sgd(0.1), params, x, y, key=jax.random.key(0),
                 batch_size=9, progress=False)


def test_fit_resumes_from_its_checkpoint_bit_identically(tmp_path):
    net, params, x, y = _problem()
    optimizer = optax.adam(1e-2)
    kwargs = dict(key=jax.random.key(5), batch_size=8, progress=False)
    whole = fnet.fit(net, LOSS, optimizer, params, x, y, epochs=4,
                     checkpoint_path=str(tmp_path / "whole.npz"), **kwargs)

    class Crash(Exception):
        pass

    def crash_after_epoch_1(epoch, state):
        if epoch == 1:
            raise Crash  # the checkpoint of epoch 1 is already on disk

    path = str(tmp_path / "run.npz")
    with pytest.raises(Crash):
        fnet.fit(net, LOSS, optimizer, params, x, y, epochs=4, checkpoint_path=path,
                 on_epoch_end=crash_after_epoch_1, **kwargs)
    saved = fnet.checkpoint.info(path)
    assert saved["step"] == 2 * 6 and saved["metadata"]["epoch"] == 1
    # The same call again picks up after epoch 1 and runs epochs 2 and 3 only.
    resumed = fnet.fit(net, LOSS, optimizer, params, x, y, epochs=4, checkpoint_path=path,
                       **kwargs)
    assert [row["epoch"] for row in resumed.history.epochs] == [2, 3]
    assert int(resumed.state.step) == int(whole.state.step) == 24
    assert _max_diff(whole.params, resumed.params) == 0.0
    assert _max_diff(whole.state.opt_state, resumed.state.opt_state) == 0.0
    np.testing.assert_array_equal(whole.history.step_loss[12:], resumed.history.step_loss)
    # A finished run resumed again has nothing left to do.
    again = fnet.fit(net, LOSS, optimizer, params, x, y, epochs=4, checkpoint_path=path, **kwargs)
    assert again.history.epochs == [] and _max_diff(again.params, whole.params) == 0.0


def test_fit_refuses_a_checkpoint_of_another_network(tmp_path):
    net, params, x, y = _problem()
    path = str(tmp_path / "ckpt.npz")
    fnet.fit(net, LOSS, optax.sgd(0.1), params, x, y, key=jax.random.key(0), epochs=1,
             batch_size=8, checkpoint_path=path, progress=False)
    other = fnet.chain(fnet.dense(8), fnet.tanh, fnet.dense(3))
    other_params, _ = other.init(jax.random.key(0), (5,))
    with pytest.raises(fnet.checkpoint.CheckpointError, match="another network"):
        fnet.fit(other, LOSS, optax.sgd(0.1), other_params, x, y, key=jax.random.key(0),
                 epochs=1, batch_size=8, checkpoint_path=path, progress=False)


@pytest.mark.parametrize("remat", ["sqrt", "recompute"])
def test_train_step_and_fit_take_a_remat_policy_with_identical_results(remat):
    net = fnet.chain(*[fnet.chain(fnet.dense(8), fnet.tanh) for _ in range(6)], fnet.dense(3))
    params, _ = net.init(jax.random.key(0), (5,))
    x = jax.random.normal(jax.random.key(1), (32, 5))
    y = jnp.argmax(x[:, :3], axis=1).astype(jnp.int32)
    optimizer = optax.adam(1e-2)
    kwargs = dict(key=jax.random.key(2), epochs=2, batch_size=8, progress=False)
    kept = fnet.fit(net, LOSS, optimizer, params, x, y, **kwargs)
    other = fnet.fit(net, LOSS, optimizer, params, x, y, remat=remat, **kwargs)
    assert _max_diff(kept.params, other.params) <= 1e-12
    step = fnet.train_step(net, LOSS, optimizer, remat=remat)
    state, value = step(fnet.init_train_state(params, optimizer), x, y)
    assert abs(float(value) - float(LOSS(net.apply(params, x), y))) <= 1e-12
    with pytest.raises(fnet.ArgumentError, match="remat: must be one of"):
        fnet.train_step(net, LOSS, optimizer, remat="everything")


@pytest.mark.parametrize("steps_per_call", [4, "epoch", 5])
def test_scanned_calls_run_the_same_steps_as_the_python_loop(steps_per_call):
    net, params, x, y = _problem()
    optimizer = optax.adam(1e-2)
    kwargs = dict(key=jax.random.key(3), epochs=3, batch_size=4, progress=False)
    loop = fnet.fit(net, LOSS, optimizer, params, x, y, **kwargs)
    scanned = fnet.fit(net, LOSS, optimizer, params, x, y, steps_per_call=steps_per_call, **kwargs)
    assert scanned.history.step_loss.shape == loop.history.step_loss.shape == (36,)
    np.testing.assert_allclose(scanned.history.step_loss, loop.history.step_loss, rtol=1e-12)
    assert _max_diff(scanned.params, loop.params) <= 1e-12
    assert int(scanned.state.step) == 36


def test_steps_per_call_is_validated():
    net, params, x, y = _problem(n=8)
    with pytest.raises(fnet.ArgumentError, match="steps_per_call: must be at least 1, got 0"):
        fnet.fit(net, LOSS, optax.sgd(0.1), params, x, y, key=jax.random.key(0),
                 steps_per_call=0, progress=False)
