"""fit checks every argument before its first step, never consumes what it is given, keeps
the last finite state when training diverges, and resumes only the run a checkpoint holds.

Each bad argument is asserted by the ArgumentError's argument and the sizes or values in
its message; "before its first step" is asserted by counting compiled programs (none of
fit's step programs is built when an argument is refused).
"""

import os
import stat

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import funcnet as fnet

pytestmark = pytest.mark.standard_promotion  # optax promotes Python floats against int32

LOSS = fnet.losses.softmax_cross_entropy


def _problem(n=24, width=5, classes=3):
    net = fnet.chain(fnet.dense(8), fnet.tanh, fnet.dense(classes))
    params, _ = net.init(jax.random.key(0), (width,))
    x = jax.random.normal(jax.random.key(1), (n, width))
    y = jnp.argmax(x[:, :classes], axis=1).astype(jnp.int32)
    return net, params, x, y


def _fit(net, params, x, y, **kwargs):
    settings = dict(key=jax.random.key(0), epochs=1, batch_size=8, progress=False)
    settings.update(kwargs)
    optimizer = settings.pop("optimizer", optax.sgd(0.1))
    loss = settings.pop("loss", LOSS)
    return fnet.fit(net, loss, optimizer, params, x, y, **settings)


def _refused(argument, *parts, **kwargs):
    net, params, x, y = _problem()
    overrides = {k: kwargs.pop(k) for k in ("net", "params", "x", "y") if k in kwargs}
    net, params = overrides.get("net", net), overrides.get("params", params)
    x, y = overrides.get("x", x), overrides.get("y", y)
    with pytest.raises(fnet.ArgumentError) as info:
        _fit(net, params, x, y, **kwargs)
    assert info.value.argument == argument, str(info.value)
    for part in parts:
        assert part in str(info.value), f"{part!r} not in {info.value}"
    return info.value


# --------------------------------------------------------------------------------------
# 1. every argument, before the first step


def test_x_and_y_of_different_lengths_are_refused():
    _, _, x, y = _problem()
    _refused("y", "has shape (23,)", "x holds 24 examples", "one target per example",
             y=y[:-1])
    _refused("y", "has shape (30,)", "24 examples", y=jnp.concatenate([y, y[:6]]))


@pytest.mark.parametrize("argument, value, message", [
    ("batch_size", 8.0, "must be an int, got 8.0 (float)"),
    ("batch_size", True, "must be an int, got True (bool)"),
    ("batch_size", 0, "must be at least 1, got 0"),
    ("batch_size", 25, "must lie in [1, 24] (the training set size), got 25"),
    ("epochs", 2.5, "must be an int, got 2.5 (float)"),
    ("epochs", False, "must be an int, got False (bool)"),
    ("epochs", 0, "must be at least 1, got 0"),
    ("first_epoch", -1, "must be at least 0, got -1"),
    ("steps_per_call", 2.0, "must be an int, got 2.0 (float)"),
    ("steps_per_call", 0, "must be at least 1, got 0"),
    ("steps_per_call", "all", "must be a positive int or 'epoch', got 'all'"),
    ("progress", "yes", "must be True or False, got 'yes' (str)"),
    ("on_epoch_end", 3, "must be a function (epoch, state) -> None"),
    ("remat", "everything", "must be one of"),
    ("key", 0, "must be one PRNG key"),
    ("key", jax.random.split(jax.random.key(0), 2), "must be one PRNG key"),
    ("optimizer", "adam", "must be an optax.GradientTransformation"),
    ("loss", "softmax", "must be a function loss(outputs, targets) -> scalar"),
])
def test_settings_of_the_wrong_type_or_range_are_refused_not_truncated(argument, value, message):
    _refused(argument, message, **{argument: value})


def test_numpy_integers_are_accepted_as_settings():
    net, params, x, y = _problem()
    result = _fit(net, params, x, y, batch_size=np.int64(8), epochs=np.int32(2),
                  steps_per_call=np.int64(3))
    assert result.history.step_loss.shape == (6,)


def test_empty_training_set_and_python_lists_are_refused():
    net, params, x, y = _problem()
    _refused("x", "at least one example", "(0, 5)", x=x[:0], y=y[:0])
    _refused("x", "Python list", "jnp.asarray(x)", x=np.asarray(x).tolist())
    _refused("y", "convert it", y=np.asarray(y).tolist())


@pytest.mark.parametrize("eval_data, argument, parts", [
    ("pair", "eval_data", ["must be a pair (x_eval, y_eval), got str"]),
    ((1, 2, 3), "eval_data", ["got tuple of 3 entries"]),
    (lambda x, y: (x[:, :4], y), "eval_data[0]", ["(4,)", "(5,)", "must match"]),
    (lambda x, y: (x, y[:5]), "eval_data[1]", ["has shape (5,)", "24 examples"]),
    (lambda x, y: (x[:0], y[:0]), "eval_data[0]", ["at least one example"]),
    (lambda x, y: (x, y.at[3].set(7)), "eval_data[1]", ["label 7 at example 3", "[0, 2]"]),
    (lambda x, y: (x, y.astype(jnp.float32)), "eval_data[1]", ["labels must be integers"]),
])
def test_eval_data_is_checked_like_the_training_data(eval_data, argument, parts):
    _, _, x, y = _problem()
    value = eval_data(x, y) if callable(eval_data) else eval_data
    _refused(argument, *parts, eval_data=value)


def test_label_problems_are_found_before_training():
    _, _, x, y = _problem()
    _refused("y", "label 3 at example 2", "3 output classes", y=y.at[2].set(3))
    _refused("y", "labels must be integers", y=y.astype(jnp.float32))
    _refused("y", "logistic takes binary labels", loss=fnet.losses.logistic,
             net=fnet.chain(fnet.dense(1)), params=fnet.chain(fnet.dense(1)).init(
                 jax.random.key(0), (5,))[0], y=y)


def test_params_that_do_not_fit_the_network_name_the_layer():
    net, params, x, y = _problem()
    with pytest.raises(fnet.LayerError, match=r"layer 0 \(dense\(8\)\).*\(5, 8\), expected \(4, 8\)"):
        _fit(net, params, x[:, :4], y)


def test_integer_params_are_refused():
    net, params, x, y = _problem()
    as_int = jax.tree.map(lambda a: a.astype(jnp.int32), params)
    _refused("params[0]['b']", "int32", "floating-point", params=as_int)


def test_a_state_of_another_optimizer_is_refused():
    net, params, x, y = _problem()
    state = fnet.init_train_state(params, optax.adam(1e-2))
    error = _refused("state", "does not fit this optimizer", "init_train_state",
                     state=state, optimizer=optax.sgd(0.1, momentum=0.9))
    assert "ScaleByAdamState" in str(error)
    _refused("state", "must be a fnet.TrainState", state={"params": params})


def test_the_checkpoint_directory_must_exist_and_be_writable(tmp_path, monkeypatch):
    _refused("checkpoint_path", "does not exist", "os.makedirs",
             checkpoint_path=str(tmp_path / "missing" / "ckpt.npz"))
    _refused("checkpoint_path", "is a directory", checkpoint_path=str(tmp_path))
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    # root writes anywhere, so the permission check is asked as an unprivileged user would
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if os.fspath(path) == str(
        locked) else real_access(path, mode))
    _refused("checkpoint_path", f"its directory {locked} is not writable",
             checkpoint_path=str(locked / "c.npz"))


def test_a_mesh_argument_must_be_a_mesh():
    # (a mesh that does not divide the batch: tests/train/test_parallel.py, on 8 devices)
    _refused("mesh", "must be a jax.sharding.Mesh", mesh="cpu")


def test_refusals_come_before_any_step_is_compiled():
    """The refused fit compiles no step program (the cost of the checks is tracing only)."""
    net, params, x, y = _problem()
    fnet.clear_caches()
    with pytest.raises(fnet.ArgumentError):
        _fit(net, params, x, y.at[0].set(9))
    from funcnet.train import _fit as fit_module
    assert fit_module._compiled_indexed_step.cache_info().currsize == 0


# --------------------------------------------------------------------------------------
# 2. nothing the user passes in is destroyed


def test_fit_never_consumes_the_callers_params_or_state():
    net, params, x, y = _problem()
    first = _fit(net, params, x, y, optimizer=optax.adam(1e-2))
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(params))
    before = jax.tree.map(np.asarray, first.state)
    second = _fit(net, None, x, y, optimizer=optax.adam(1e-2), state=first.state,
                  first_epoch=1)
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(first.state))
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(first.state)):
        np.testing.assert_array_equal(a, b)
    assert int(second.state.step) == 2 * int(first.state.step)


def test_a_donated_state_passed_again_names_the_argument():
    net, params, x, y = _problem()
    optimizer = optax.sgd(0.1)
    step = fnet.train_step(net, LOSS, optimizer)
    state = fnet.init_train_state(params, optimizer)
    step(state, x, y)  # donates state
    with pytest.raises(fnet.ArgumentError, match=r"^state: was donated to an earlier train step"):
        step(state, x, y)
    with pytest.raises(fnet.ArgumentError, match=r"^state: was donated"):
        _fit(net, None, x, y, optimizer=optimizer, state=state)
    with pytest.raises(fnet.ArgumentError, match=r"^params: was donated"):
        fnet.init_train_state(state.params, optimizer)


def _diverging(tmp_path=None):
    net, params, x, y = _problem(n=32)
    kwargs = dict(optimizer=optax.sgd(1e3), batch_size=1, epochs=4,
                  loss=fnet.losses.squared_error)
    y = jnp.exp(20.0 * x[:, :3])  # huge targets: sgd with this step size overflows
    if tmp_path is not None:
        kwargs["checkpoint_path"] = str(tmp_path / "run.npz")
    return net, params, x, y, kwargs


def test_training_error_carries_the_last_finite_state_and_the_checkpoint(tmp_path):
    net, params, x, y, kwargs = _diverging(tmp_path)
    with pytest.raises(fnet.TrainingError) as info:
        _fit(net, params, x, y, **kwargs)
    error = info.value
    assert isinstance(error.state, fnet.TrainState)
    assert int(error.state.step) == error.step
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(error.state.params))
    assert f"state after step {error.step}, the last verified finite" in str(error)
    if error.checkpoint_path is None:
        assert "no checkpoint was written" in str(error)
    else:
        assert error.checkpoint_path == kwargs["checkpoint_path"]
        assert f"the last checkpoint is at {error.checkpoint_path}" in str(error)
    # the state is usable: training can go on from it with a smaller step
    result = _fit(net, None, x, y, optimizer=optax.sgd(1e-12), state=error.state,
                  loss=fnet.losses.squared_error, batch_size=1)
    assert np.isfinite(result.history.step_loss).all()


# --------------------------------------------------------------------------------------
# checkpoints remember the run's settings


def test_resuming_with_other_settings_says_what_differs(tmp_path):
    net, params, x, y = _problem()
    path = str(tmp_path / "run.npz")
    with pytest.raises(_Stop):
        _fit(net, params, x, y, epochs=3, checkpoint_path=path, optimizer=optax.adam(1e-2),
             on_epoch_end=lambda epoch, state: _stop_at(epoch, 0))
    cases = {
        "batch_size: 8 in the checkpoint, 4 here": dict(batch_size=4),
        "key: ": dict(key=jax.random.key(1)),
        "optimizer: ": dict(optimizer=optax.adam(2e-2)),
        "training examples: 24 in the checkpoint, 16 here": dict(x=x[:16], y=y[:16]),
        "last epoch (first_epoch + epochs - 1): 2 in the checkpoint, 4 here": dict(epochs=5),
    }
    for expected, change in cases.items():
        settings = dict(epochs=3, optimizer=optax.adam(1e-2), checkpoint_path=path)
        data = {"x": change.pop("x", x), "y": change.pop("y", y)}
        settings.update(change)
        with pytest.raises(fnet.checkpoint.CheckpointError) as info:
            _fit(net, params, data["x"], data["y"], **settings)
        assert "was written by a run with other settings" in str(info.value)
        assert expected in str(info.value), str(info.value)
        assert path in str(info.value)
    # the same settings resume
    resumed = _fit(net, params, x, y, epochs=3, optimizer=optax.adam(1e-2), checkpoint_path=path)
    assert [row["epoch"] for row in resumed.history.epochs] == [1, 2]


def test_asking_for_fewer_epochs_than_the_checkpoint_holds_says_so(tmp_path):
    net, params, x, y = _problem()
    path = str(tmp_path / "run.npz")
    _fit(net, params, x, y, epochs=3, checkpoint_path=path)
    with pytest.raises(fnet.checkpoint.CheckpointError,
                       match=r"trained up to epoch 2 \(step 9\), past this call's last epoch 0"):
        _fit(net, params, x, y, epochs=1, checkpoint_path=path)


class _Stop(Exception):
    pass


def _stop_at(epoch, last):
    if epoch == last:
        raise _Stop
