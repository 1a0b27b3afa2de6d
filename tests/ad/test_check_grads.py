"""fnet.check_grads: the per-layer report, finite differences, and that it catches a wrong
backward rule (finite differences, naming the layer whose own derivative is wrong rather
than the layers below it) and a disagreement with jax.grad, leading with the failed metric."""

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


def _columns(line):
    """A table row's five cells after the layer label (which may contain spaces)."""
    return line.split()[-5:]


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
        assert check.fd_local_rel_error is None
        assert check.failed == () and check.fd_local_culprit == ()
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
        assert _columns(line)[2:4] == ["-", "-"]  # no finite differences asked for


def test_report_str_shows_the_fd_local_column(setup):
    net, params, x, y = setup
    report = fnet.check_grads(net, SE, params, x, y, finite_differences=True)
    lines = str(report).splitlines()
    assert lines[0].index("fd rel err") < lines[0].index("fd local err") < lines[0].index("ok")
    assert len(lines) == 1 + len(NAMES)
    for line, check in zip(lines[1:], report.layers):
        cells = _columns(line)
        assert len(cells) == 5
        assert cells[3] == f"{check.fd_local_rel_error:.2e}"  # every layer, tanh too
        assert cells[4] == "yes"
    assert _columns(lines[2])[2] == "-"  # tanh: no params for the end-to-end check


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
        # the own-derivative check runs for every layer (tanh: its input), and passes
        assert check.fd_local_rel_error is not None
        assert 0.0 <= check.fd_local_rel_error < 1e-6
        assert check.failed == () and check.fd_local_culprit == ()
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


def _lead(error):
    """The failure message's first line: the failed metric and the layer it names."""
    return str(error).splitlines()[0]


def test_wrong_parameter_cotangent_names_the_layer(key):
    net, params, x, y = _bad_setup(key)
    with pytest.raises(fnet.GradientCheckError) as info:
        fnet.check_grads(net, SE, params, x, y, finite_differences=True)
    error = info.value
    assert isinstance(error, AssertionError)
    assert _lead(error).startswith(
        "finite differences disagree with layer 1 (bad_scale)'s own derivative: "
        "relative error ")
    assert "> fd_rtol 1e-06" in _lead(error)
    assert "dense" not in _lead(error) and "tanh" not in _lead(error)
    report = error.report
    assert report.worst.index == 1 and report.worst.name == "bad_scale"
    assert [c.ok for c in report.layers] == [True, False, True, True]
    bad = report.layers[1]
    assert bad.failed == ("fd_local_rel_error", "fd_rel_error")
    assert bad.fd_rel_error > 0.1  # a factor 2 on the w-gradient
    assert bad.fd_local_rel_error > 1e-3  # normwise (Cauchy-Schwarz), so below 0.1; >> fd_rtol
    assert bad.fd_local_culprit == ((1, "bad_scale"),)
    assert bad.fd_local_culprit_error == bad.fd_local_rel_error  # a leaf: itself
    assert bad.max_abs_error <= 1e-12  # jax.grad agrees with the wrong rule
    for index in (0, 2, 3):
        assert report.layers[index].fd_local_rel_error < 1e-6
    assert "NO" in str(report).splitlines()[2]


# a wrong INPUT cotangent B^T u: every layer below it gets a wrong gradient as well


@jax.custom_vjp
def _scale_wrong_input(w, z):
    return w[None, :] * z


def _scale_bwd_wrong_input(res, g):
    w, z = res
    return jnp.sum(g * z, axis=0), 2.0 * g * w[None, :]  # the z-cotangent is doubled


_scale_wrong_input.defvjp(lambda w, z: (_scale_wrong_input(w, z), (w, z)),
                          _scale_bwd_wrong_input)

BAD_INPUT = fnet.layer(_scale_wrong_input,
                       lambda key, shape: 1.0 + 0.1 * jax.random.normal(key, shape),
                       name="bad_input")


def test_wrong_input_cotangent_names_the_layer_not_the_ones_below(key):
    net = fnet.chain(fnet.dense(4), BAD_INPUT, fnet.dense(2))
    params, _ = net.init(key, (3,))
    x = jax.random.normal(jax.random.key(1), (5, 3))
    y = jax.random.normal(jax.random.key(2), (5, 2))
    assert fnet.check_grads(net, SE, params, x, y).ok  # jax.grad shares the wrong rule
    with pytest.raises(fnet.GradientCheckError) as info:
        fnet.check_grads(net, SE, params, x, y, finite_differences=True)
    assert _lead(info.value).startswith(
        "finite differences disagree with layer 1 (bad_input)'s own derivative: "
        "relative error ")
    assert "dense" not in _lead(info.value)
    report = info.value.report
    below, bad, above = report.layers
    # the dense layer below inherits the error end to end, but its own derivative is right
    assert below.fd_rel_error > 1e-3 and below.fd_local_rel_error < 1e-6
    assert below.failed == ("fd_rel_error",)
    # the culprit: its own derivative is off; its parameter gradient is not
    assert bad.fd_local_rel_error > 1e-3 and bad.fd_rel_error < 1e-6
    assert bad.failed == ("fd_local_rel_error",)
    assert bad.fd_local_culprit == ((1, "bad_input"),)
    assert above.ok and above.failed == ()
    assert report.worst is bad
    assert all(c.max_abs_error <= 1e-12 for c in report.layers)


@jax.custom_vjp
def _bad_tanh(z):
    return jnp.tanh(z)


def _bad_tanh_bwd(out, g):
    return (g * (1.0 - out),)  # should be 1 - out ** 2


_bad_tanh.defvjp(lambda z: (_bad_tanh(z), jnp.tanh(z)), _bad_tanh_bwd)

BAD_TANH = fnet.layer(lambda w, z: _bad_tanh(z), name="bad_tanh")  # no params


def test_wrong_rule_inside_a_nested_chain_is_named_by_its_path(key):
    block = fnet.chain(fnet.dense(4), BAD_TANH, fnet.dense(4), name="block")
    net = fnet.chain(fnet.dense(4), block, fnet.dense(2))
    params, _ = net.init(key, (3,))
    x = jax.random.normal(jax.random.key(1), (5, 3))
    y = jax.random.normal(jax.random.key(2), (5, 2))
    with pytest.raises(fnet.GradientCheckError) as info:
        fnet.check_grads(net, SE, params, x, y, finite_differences=True)
    assert _lead(info.value).startswith(
        "finite differences disagree with layer 1 (block) > layer 1 (bad_tanh)'s own "
        "derivative: relative error ")
    assert "dense" not in _lead(info.value)
    report = info.value.report
    assert report.worst.index == 1
    assert report.layers[1].fd_local_culprit == ((1, "block"), (1, "bad_tanh"))
    assert report.layers[1].fd_local_culprit_error > 1e-3
    assert report.layers[1].fd_local_rel_error > 1e-6
    assert report.layers[0].fd_local_rel_error < 1e-6  # the dense layer below is fine
    assert report.layers[0].fd_rel_error > 1e-6  # though its gradient inherits the error


def test_wrong_loss_gradient_is_not_blamed_on_a_layer(setup):
    """Every layer's own derivative is right; the end-to-end check points at the loss."""
    net, params, x, y = setup

    @jax.custom_vjp
    def doubled(out, targets):
        return SE(out, targets)

    def doubled_bwd(res, g):
        out, targets = res
        return 2.0 * g * (out - targets) / out.shape[0], jnp.zeros_like(targets)

    doubled.defvjp(lambda out, targets: (doubled(out, targets), (out, targets)), doubled_bwd)
    assert fnet.check_grads(net, doubled, params, x, y).ok  # jax.grad shares the rule
    with pytest.raises(fnet.GradientCheckError) as info:
        fnet.check_grads(net, doubled, params, x, y, finite_differences=True)
    message = str(info.value)
    assert message.startswith("finite differences disagree with the end-to-end gradient of ")
    assert "loss" in message.splitlines()[1]
    report = info.value.report
    assert all(c.fd_local_rel_error < 1e-6 for c in report.layers)
    assert all(c.failed == ("fd_rel_error",) for c in report.layers if c.name != "tanh")


# --------------------------------------------------------------------------------------
# the jax.grad comparison itself catches a disagreement


def _perturbing_backprop(monkeypatch, changes):
    """Makes check_grads see funcnet grads with layer i's leaves shifted by changes[i]."""
    real = funcnet.ad._check_grads.backprop

    def fake(net, loss, params, x, y, key=None):
        record = real(net, loss, params, x, y, key=key)
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
    assert message.startswith(
        "jax.grad disagrees with the hand-written gradient of layer 4 (dense(2)): ")
    assert "rtol 1e-10" in _lead(info.value)
    report = info.value.report
    assert [c.ok for c in report.layers] == [True, True, True, True, False]
    assert report.layers[4].max_abs_error == pytest.approx(1e-3, rel=1e-6)
    assert not report.ok


def test_disagreement_error_names_the_worst_layer(setup, monkeypatch):
    net, params, x, y = setup
    _perturbing_backprop(monkeypatch, {0: 1e-7, 2: 1.0})
    with pytest.raises(fnet.GradientCheckError) as info:
        fnet.check_grads(net, SE, params, x, y)
    assert _lead(info.value).startswith(
        "jax.grad disagrees with the hand-written gradient of layer 2 (chain): ")
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


def test_jax_grad_failure_leads_even_with_finite_differences(setup, monkeypatch):
    """A wrong walk shows in the jax.grad comparison (and end to end); that metric leads."""
    net, params, x, y = setup
    _perturbing_backprop(monkeypatch, {4: 1e-3})
    with pytest.raises(fnet.GradientCheckError) as info:
        fnet.check_grads(net, SE, params, x, y, finite_differences=True)
    assert _lead(info.value).startswith(
        "jax.grad disagrees with the hand-written gradient of layer 4 (dense(2)): ")
    report = info.value.report
    assert report.layers[4].failed == ("max_abs_error", "fd_rel_error")
    assert all(c.fd_local_rel_error < 1e-6 for c in report.layers)  # the layers are right
