"""fnet.check_grads: the per-layer report, finite differences, and that it catches a wrong
backward rule (finite differences) and a disagreement with jax.grad (naming the layer)."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest

import funcnet as fnet
import funcnet.ad._check_grads

SE = fnet.losses.squared_error


def _net():
    return fnet.chain(fnet.dense(6), fnet.tanh, fnet.chain(fnet.dense(5), fnet.gelu),
                      fnet.residual(fnet.dense(5, bias=False)), fnet.dense(2))


@pytest.fixture
def setup(key):
    net = _net()
    params, _ = net.init(key, (3,))
    x = jax.random.normal(jax.random.key(1), (4, 3))
    y = jax.random.normal(jax.random.key(2), (4, 2))
    return net, params, x, y


NAMES = ["dense(6)", "tanh", "chain", "residual(dense(5), no bias)", "dense(2)"]


def test_report_has_one_check_per_top_level_layer(setup):
    net, params, x, y = setup
    report = fnet.check_grads(net, SE, params, x, y)
    assert isinstance(report, fnet.GradCheckReport)
    assert report.ok
    assert len(report.layers) == len(net.layers) == 5
    for index, (check, name) in enumerate(zip(report.layers, NAMES)):
        assert isinstance(check, fnet.LayerCheck)
        assert check.index == index
        assert check.name == name
        assert check.ok
        assert check.fd_rel_error is None  # not asked for
        assert check.max_abs_error <= 1e-12
        assert check.max_rel_error <= 1e-10
    assert report.rtol == 1e-10  # float64 default
    assert report.atol == 0.0
    assert report.fd_rtol is None


def test_report_str_is_a_table_naming_each_layer(setup):
    net, params, x, y = setup
    text = str(fnet.check_grads(net, SE, params, x, y))
    lines = text.splitlines()
    assert len(lines) == 1 + len(NAMES)  # header + one row per layer
    assert "max abs err" in lines[0] and "max rel err" in lines[0]
    for index, (line, name) in enumerate(zip(lines[1:], NAMES)):
        assert line.startswith(f"layer {index} ({name})")
        assert line.rstrip().endswith("yes")


def test_non_chain_net_is_one_layer(key):
    net = fnet.dense(2)
    params, _ = net.init(key, (3,))
    report = fnet.check_grads(net, SE, params, jnp.ones((4, 3)), jnp.zeros((4, 2)))
    assert [(c.index, c.name) for c in report.layers] == [(0, "dense(2)")]
    assert report.ok


def test_finite_differences_agree_in_float64(setup):
    net, params, x, y = setup
    report = fnet.check_grads(net, SE, params, x, y, finite_differences=True)
    assert report.ok
    assert report.fd_rtol == 1e-6
    for check in report.layers:
        if check.name == "tanh":
            assert check.fd_rel_error is None  # no params, nothing to perturb
        else:
            assert check.fd_rel_error is not None
            assert 0.0 <= check.fd_rel_error < 1e-6
    assert "-" in str(report).splitlines()[2]  # tanh row has no fd error


def test_finite_differences_need_float64(setup):
    net, params, x, y = setup
    params32 = jax.tree.map(lambda a: a.astype(jnp.float32), params)
    with pytest.raises(ValueError, match="float64") as info:
        fnet.check_grads(net, SE, params32, x.astype(jnp.float32), y.astype(jnp.float32),
                         finite_differences=True)
    assert "float32" in str(info.value)


def test_float32_check_uses_float32_tolerance(setup):
    net, params, x, y = setup
    params32 = jax.tree.map(lambda a: a.astype(jnp.float32), params)
    report = fnet.check_grads(net, SE, params32, x.astype(jnp.float32), y.astype(jnp.float32))
    assert report.ok
    assert report.rtol == 1e-5


# --------------------------------------------------------------------------------------
# a layer with a wrong backward rule: jax.grad uses the same rule, finite differences don't


@jax.custom_vjp
def _scale(w, z):
    return w[None, :] * z


def _scale_fwd(w, z):
    return _scale(w, z), (w, z)


def _scale_bwd_wrong(res, g):
    w, z = res
    return 2.0 * jnp.sum(g * z, axis=0), g * w[None, :]  # the w-gradient is doubled


_scale.defvjp(_scale_fwd, _scale_bwd_wrong)


def _scale_init(key, in_shape):
    return 1.0 + 0.1 * jax.random.normal(key, in_shape), in_shape


BAD = fnet.Layer(_scale_init, _scale, name="bad_scale")


def _bad_setup(key):
    net = fnet.chain(fnet.dense(4), BAD, fnet.tanh, fnet.dense(2))
    params, _ = net.init(key, (3,))
    x = jax.random.normal(jax.random.key(1), (5, 3))
    y = jax.random.normal(jax.random.key(2), (5, 2))
    return net, params, x, y


def test_wrong_backward_rule_agrees_with_jax_grad(key):
    """Both sides use the custom rule, so the jax.grad comparison alone cannot see it."""
    net, params, x, y = _bad_setup(key)
    assert fnet.check_grads(net, SE, params, x, y).ok


def test_wrong_backward_rule_is_caught_by_finite_differences(key):
    net, params, x, y = _bad_setup(key)
    with pytest.raises(fnet.GradientCheckError) as info:
        fnet.check_grads(net, SE, params, x, y, finite_differences=True)
    error = info.value
    assert isinstance(error, AssertionError)
    assert str(error).startswith("layer 1 (bad_scale): ")
    assert "finite-difference" in str(error)
    report = error.report
    assert report.worst.index == 1 and report.worst.name == "bad_scale"
    assert [c.ok for c in report.layers] == [True, False, True, True]
    assert report.layers[1].fd_rel_error > 0.1  # a factor 2 on the w-gradient
    assert report.layers[1].max_abs_error <= 1e-12  # jax.grad agrees with the wrong rule
    assert "NO" in str(report).splitlines()[2]


# --------------------------------------------------------------------------------------
# the jax.grad comparison itself catches a disagreement


def _perturbing_backprop(monkeypatch, changes):
    """Makes check_grads see funcnet grads with layer i's leaves shifted by changes[i]."""
    real = funcnet.ad._check_grads.backprop

    def fake(net, loss, params, x, y):
        record = real(net, loss, params, x, y)
        grads = list(record.grads)
        for index, delta in changes.items():
            grads[index] = jax.tree.map(lambda g: g + delta, grads[index])
        return dataclasses.replace(record, grads=tuple(grads))

    monkeypatch.setattr(funcnet.ad._check_grads, "backprop", fake)


def test_disagreement_with_jax_grad_names_the_layer(setup, monkeypatch):
    net, params, x, y = setup
    _perturbing_backprop(monkeypatch, {4: 1e-3})
    with pytest.raises(fnet.GradientCheckError) as info:
        fnet.check_grads(net, SE, params, x, y)
    message = str(info.value)
    assert message.startswith("layer 4 (dense(2)): ")
    assert "rtol 1e-10" in message
    report = info.value.report
    assert [c.ok for c in report.layers] == [True, True, True, True, False]
    assert report.layers[4].max_abs_error == pytest.approx(1e-3, rel=1e-6)
    assert not report.ok


def test_disagreement_error_names_the_worst_layer(setup, monkeypatch):
    net, params, x, y = setup
    _perturbing_backprop(monkeypatch, {0: 1e-7, 2: 1.0})
    with pytest.raises(fnet.GradientCheckError) as info:
        fnet.check_grads(net, SE, params, x, y)
    assert str(info.value).startswith("layer 2 (chain): ")
    report = info.value.report
    assert report.worst.index == 2
    assert [c.ok for c in report.layers] == [False, True, False, True, True]
    assert report.layers[2].max_rel_error > report.layers[0].max_rel_error


def test_tolerances_decide(setup, monkeypatch):
    net, params, x, y = setup
    _perturbing_backprop(monkeypatch, {0: 1e-7})
    with pytest.raises(fnet.GradientCheckError):
        fnet.check_grads(net, SE, params, x, y)
    assert fnet.check_grads(net, SE, params, x, y, rtol=1e-3).ok
    assert fnet.check_grads(net, SE, params, x, y, atol=1e-6).ok
