"""Smoke runs of the curvature experiments (laplace.py, kfac.py) at toy size, and exact
checks of the pieces they are built from: the GGN diagonal summed over batches, the
calibration metrics, and the Kronecker-factored preconditioner."""

import math

import numpy as np
import pytest

from scripts import experiment, experiment_outputs  # noqa: E402


pytestmark = pytest.mark.standard_promotion  # the experiments drive optax


@pytest.mark.parametrize("name", ["laplace", "kfac"])
def test_help(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        experiment(name).main(["--help"])
    assert exit_.value.code == 0
    assert "--seed" in capsys.readouterr().out


# --- laplace.py -------------------------------------------------------------------------------

def test_laplace_smoke(tmp_path):
    summary = experiment("laplace").main(["--results", str(tmp_path), "--quick", "--no-progress"])
    results = experiment_outputs(tmp_path, "reliability.png", "tuning.png")
    methods = ["MAP", "Laplace (GLM)", "Laplace (sampling)", "last-layer Laplace",
               "MAP + temperature"]
    assert results["seeds"] == [0] and results["train_prior_precisions"] == [0.01]
    (run,) = results["runs"]
    assert run["n_fit"] + run["n_validation"] == 1347 and run["n_test"] == 450
    assert run["params"] == (64 * 32 + 32) + (32 * 10 + 10)  # --quick: hidden [32]
    assert set(run["test"]) == set(methods)
    for method, m in run["test"].items():
        assert 0.0 <= m["accuracy"] <= 1.0 and 0.0 <= m["ece"] <= 1.0, method
        assert math.isfinite(m["nll"]) and 0 < m["nll"] < 5 and 0 <= m["brier"] <= 2, method
    assert run["test"]["MAP"]["accuracy"] > 0.5  # three epochs of Adam learn something
    # the GGN diagonal summed over the fitting part: positive, and zero only where no
    # example reaches (the always-blank pixels' first-layer weights, dead units)
    assert run["ggn_sum_total"] > 0 and 0 <= run["ggn_sum_zero_fraction"] < 0.5
    grid = run["prior_grid"]
    assert len(grid) == 5 and grid == sorted(grid)
    for method in ("Laplace (GLM)", "Laplace (sampling)", "last-layer Laplace"):
        curve = run["validation_nll_curves"][method]
        assert len(curve) == 5 and all(math.isfinite(v) and v > 0 for v in curve)
        chosen = run["chosen"][method]
        # the best of the grid and of the MAP itself (delta = infinity) on validation
        best = min(min(curve), run["map_validation"]["nll"])
        assert chosen["validation_nll"] == pytest.approx(best)
        if chosen["chose_map"]:
            assert chosen["prior_precision"] is None
            assert run["test"][method] == run["test"]["MAP"]
        else:
            assert chosen["prior_precision"] in grid
    # the pooled reliability bins hold every test image and give back the ECE
    bins = results["reliability_pooled"]["0.01"]["MAP"]
    assert len(bins) == 15 and sum(b["count"] for b in bins) == 450
    ece = sum(b["count"] / 450 * abs(b["accuracy"] - b["confidence"]) for b in bins if b["count"])
    assert ece == pytest.approx(run["test"]["MAP"]["ece"], abs=1e-12)
    target = results["target"]
    assert target["met"] == all(target["checks"].values()) == summary["met"]
    assert set(summary["mean"]["0.01"]) == set(methods)


def test_laplace_ggn_sum_is_the_sum_over_examples_for_any_batch_size():
    import jax
    import jax.numpy as jnp

    import funcnet as fnet

    module = experiment("laplace")
    net = fnet.chain(fnet.dense(5), fnet.tanh, fnet.dense(3))
    params, _ = net.init(jax.random.key(0), (4,))
    params = jax.tree.map(lambda a: a.astype(jnp.float64), params)
    x = jax.random.normal(jax.random.key(1), (10, 4), jnp.float64)
    y = jnp.arange(10) % 3
    loss = fnet.losses.softmax_cross_entropy
    # jitted: eagerly, every one of the walk's operations compiles on its own (seconds)
    expected = jax.jit(lambda p, x, y: jax.tree.map(
        lambda a: a.sum(axis=0),
        fnet.backprop(net, loss, p, x, y, extensions=(fnet.extensions.batch_diag_ggn(),))
        .extensions["batch_diag_ggn"]))(params, x, y)
    # batches of 4, 4 and 2: the last, smaller one must count for its own size
    total = module.ggn_diagonal_sum(net, loss, params, x, y, 4)
    for got, want in zip(jax.tree.leaves(total), jax.tree.leaves(expected)):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-14)
    # the posterior's standard deviations: 1 / sqrt(sum + delta), zero outside the layers asked
    std = module.posterior_std(total, 2.0, (2,))
    np.testing.assert_allclose(std[2]["w"], 1 / np.sqrt(np.asarray(total[2]["w"]) + 2.0))
    assert not np.any(np.asarray(std[0]["w"])) and not np.any(np.asarray(std[0]["b"]))


def test_laplace_calibration_metrics():
    module = experiment("laplace")
    y = np.array([0, 0, 0, 0, 1])
    # confidence 0.8 everywhere and 4 of 5 right: perfectly calibrated
    probs = np.array([[0.8, 0.2]] * 5)
    m = module.metrics(np.log(probs), y)
    assert m["accuracy"] == pytest.approx(0.8) and m["ece"] == pytest.approx(0.0, abs=1e-12)
    assert m["nll"] == pytest.approx(-(4 * np.log(0.8) + np.log(0.2)) / 5)
    assert m["brier"] == pytest.approx((4 * 0.08 + 1.28) / 5)
    # confidence 0.99 with 1 in 5 wrong: the one bin (0.933, 1] is off by 0.19
    probs = np.array([[0.99, 0.01]] * 5)
    assert module.metrics(np.log(probs), y)["ece"] == pytest.approx(0.19)
    bins = module.reliability_bins(np.array([0.5, 1.0, 1 / 15]), np.array([1.0, 0.0, 1.0]))
    assert [b["count"] for b in bins if b["count"]] == [1, 1, 1]
    assert bins[0]["count"] == 1 and bins[7]["count"] == 1 and bins[14]["count"] == 1


# --- kfac.py ---------------------------------------------------------------------------------

def test_kfac_smoke(tmp_path):
    summary = experiment("kfac").main(["--results", str(tmp_path), "--quick", "--datasets", "digits",
                                  "--no-progress"])
    results = experiment_outputs(tmp_path, "loss.png")
    assert list(results["datasets"]) == ["digits"] and results["steps"] == 30
    digits = results["datasets"]["digits"]
    assert set(digits["runs"]) == {"Adam", "K-FAC (kflr)", "K-FAC (kfac)"}
    for method, run in digits["runs"].items():
        assert [p["step"] for p in run["curve"]] == list(range(0, 31, 5)), method
        assert len(run["step_loss"]) == 30
        assert all(math.isfinite(p["train_loss"]) for p in run["curve"]), method
        seconds = [p["seconds"] for p in run["curve"]]
        assert seconds == sorted(seconds) and run["train_seconds"] > 0, method
        assert run["ms_per_step"] > 0 and run["compile_seconds"] > 0
        assert 0.0 <= run["test_accuracy"] <= 1.0
        # 30 steps from the same start: every method has learned something
        assert run["final_train_loss"] < run["curve"][0]["train_loss"] / 2, method
    adam = digits["runs"]["Adam"]
    assert digits["adam_final_train_loss"] == adam["final_train_loss"]
    assert digits["reach_adam_final"]["Adam"]["steps"] is not None  # Adam ends at its level
    target = results["target"]
    assert target["met"] == all(target["checks"].values()) == summary["met"]
    assert [row["method"] for row in results["rows"]] == ["Adam", "K-FAC (kflr)", "K-FAC (kfac)"]


def test_kfac_reaching_means_staying_below():
    module = experiment("kfac")
    curve = [{"step": s, "seconds": s / 10, "train_loss": v}
             for s, v in zip(range(0, 50, 10), [1.0, 0.1, 0.5, 0.2, 0.1])]
    assert module.first_reaching(curve, 0.2)["step"] == 30  # the dip at step 10 climbs back
    assert module.first_reaching(curve, 0.05) is None
    curve[-1]["train_loss"] = float("nan")
    assert module.first_reaching(curve, 10.0) is None


def test_kfac_preconditioner_is_the_damped_kronecker_solve():
    """A^-1 grad_W G^-1 on W = [w; b] (row-major) solves kron(A + pi s I, G + s/pi I) u = g,
    and for one example kron(A, G) is the layer's exact GGN block (the kflr contract)."""
    import jax
    import jax.numpy as jnp

    import funcnet as fnet

    module = experiment("kfac")
    net = fnet.chain(fnet.dense(3), fnet.tanh, fnet.dense(2))
    params, _ = net.init(jax.random.key(0), (4,))
    params = jax.tree.map(lambda a: a.astype(jnp.float64), params)
    x = jax.random.normal(jax.random.key(1), (6, 4), jnp.float64)
    y = jnp.array([0, 1, 1, 0, 1, 0])
    loss = fnet.losses.softmax_cross_entropy
    damping = 0.01

    @jax.jit  # eagerly, every one of the walk's operations compiles on its own (seconds)
    def pieces(params, x, y):
        record = fnet.backprop(net, loss, params, x, y, extensions=(fnet.extensions.kflr(),))
        factors = record.extensions["kflr"]
        update = module.precondition(record.grads,
                                     module.damped_inverses(factors, damping))
        return factors, record.grads, update

    factors, grads, update = pieces(params, x, y)
    assert factors[1] is None and factors[0][0].shape == (5, 5) and factors[2][1].shape == (2, 2)
    assert update[1] == grads[1] == ()
    for layer in (0, 2):
        a, g = (np.asarray(m) for m in factors[layer])
        pi = np.sqrt((np.trace(a) / a.shape[0]) / (np.trace(g) / g.shape[0]))
        root = np.sqrt(damping)
        big = np.kron(a + pi * root * np.eye(a.shape[0]), g + root / pi * np.eye(g.shape[0]))
        grad = grads[layer]
        flat = np.concatenate([np.asarray(grad["w"]), np.asarray(grad["b"])[None]]).reshape(-1)
        want = np.linalg.solve(big, flat)
        got = np.concatenate([np.asarray(update[layer]["w"]),
                              np.asarray(update[layer]["b"])[None]]).reshape(-1)
        np.testing.assert_allclose(got, want, rtol=1e-8)
