"""Smoke runs of every experiment at toy size: they run, write JSON and PNG, and their
numbers say what the experiment claims."""

import math

import pytest

from scripts import PNG_MAGIC, experiment, experiment_outputs  # noqa: E402


pytestmark = pytest.mark.standard_promotion  # the experiments drive optax


@pytest.mark.parametrize("name", ["digits", "breast_cancer", "diabetes", "gradient_flow",
                                  "private_digits", "gradient_noise", "cnn_digits",
                                  "sequence"])
def test_help(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        experiment(name).main(["--help"])
    assert exit_.value.code == 0
    assert "--seed" in capsys.readouterr().out


def test_digits_smoke(tmp_path):
    rows = experiment("digits").main(["--results", str(tmp_path), "--scale", "0.05",
                                 "--hidden", "32", "--no-progress"])
    results = experiment_outputs(tmp_path, "loss.png")
    names = [row["method"] for row in results["rows"]]
    assert names[:4] == ["funcnet full-batch GD", "funcnet SGD (batch 1)",
                         "funcnet mini-batch SGD", "funcnet Adam"]
    assert names[4].startswith("scikit-learn MLPClassifier")
    assert all(0.0 <= row["test_accuracy"] <= 1.0 for row in rows)
    assert results["rows"][3]["test_accuracy"] > 0.5  # even a short Adam run learns
    for run in results["runs"].values():
        assert len(run["step_loss"]) >= 1 and run["epochs"]


def test_breast_cancer_smoke(tmp_path):
    summary = experiment("breast_cancer").main(["--results", str(tmp_path), "--epochs", "3",
                                           "--no-progress"])
    results = experiment_outputs(tmp_path, "curves.png")
    assert len(results["epochs"]) == 3
    assert summary["test_accuracy"] > 0.85


def test_diabetes_gradient_descent_reaches_lstsq_to_1e_6(tmp_path):
    summary = experiment("diabetes").main(["--results", str(tmp_path), "--no-progress"])
    results = experiment_outputs(tmp_path, "convergence.png")
    assert summary["max_abs_diff_w"] <= 1e-6 and summary["max_abs_diff_b"] <= 1e-6
    assert results["summary"]["matches_lstsq_to_1e-6"] is True
    distances = [gap for _, gap in results["distance"]]
    assert distances[-1] < distances[0]


def test_gradient_flow_shows_vanishing_sigmoid_gradients(tmp_path):
    runs = experiment("gradient_flow").main(["--results", str(tmp_path), "--epochs", "1",
                                        "--width", "16", "--no-progress"])
    experiment_outputs(tmp_path, "gradient_flow.png")
    sigmoid, tanh = runs["sigmoid"], runs["tanh"]
    assert len(sigmoid["p_norms"][0]) == 13  # 12 hidden dense layers and the output layer
    assert len(sigmoid["q_norms"][0]) == 26  # z_1 .. z_{L+1}, L = 25
    assert sigmoid["p_first_over_last_at_init"] < 1e-4
    assert sigmoid["p_first_over_last_at_init"] < tanh["p_first_over_last_at_init"] / 100


def test_private_digits_smoke(tmp_path):
    # one private setting and no clipping-only row: every noise multiplier compiles its
    # own DP-SGD step (~6 s each here); the next test covers several privacy levels
    runs = experiment("private_digits").main(["--results", str(tmp_path), "--quick", "--epsilons",
                                         "2", "--no-clip-only", "--no-progress"])
    results = experiment_outputs(tmp_path, "accuracy_vs_epsilon.png")
    assert (tmp_path / "accuracy_vs_epoch.png").read_bytes()[:8] == PNG_MAGIC
    assert [run["setting"] for run in runs] == [row["setting"] for row in results["rows"]]
    baseline, private = results["runs"]
    assert baseline["setting"] == "non-private" and baseline["noise_multiplier"] is None
    assert baseline["epsilon"] is None and baseline["delta"] is None  # no privacy
    assert private["target_epsilon"] == 2.0 and private["delta"] == 1e-5
    # calibrated: the whole run spends at most the target, and not much less
    assert 0.95 * 2.0 <= private["epsilon"] <= 2.0 * (1 + 1e-9)
    budget = [row["epsilon"] for row in private["epochs"]]
    assert budget == sorted(budget) and 0 < budget[0] < budget[-1]  # spent epoch by epoch
    for run in results["runs"]:
        assert len(run["epochs"]) == 3 and run["steps"] == results["steps"]
        assert 0.0 <= run["test_accuracy"] <= 1.0
        assert run["seconds_per_epoch"] > 0 and run["eval_seconds"] > 0
    assert baseline["test_accuracy"] > 0.5  # three epochs of Adam learn something


def test_private_digits_calibration_spends_more_epsilon_with_less_noise():
    import funcnet as fnet

    module = experiment("private_digits")
    rate, steps = 256 / 1347, 3 * 5  # the quick run's sampling rate and steps
    sigmas = [module.calibrate(eps, 1.0, 1e-5, rate, steps) for eps in (0.5, 2.0, 8.0)]
    assert sigmas[0] > sigmas[1] > sigmas[2] > 0  # less noise, more epsilon
    for eps, sigma in zip((0.5, 2.0, 8.0), sigmas):
        spent = fnet.privacy_spent(fnet.dp_sgd(1.0, sigma, 1e-5), rate, steps)
        assert 0.98 * eps <= spent <= eps  # at most the target, and within the tolerance
        more_noise = fnet.privacy_spent(fnet.dp_sgd(1.0, sigma * 1.01, 1e-5), rate, steps)
        assert more_noise < spent


def test_gradient_noise_snr_is_finite_positive_and_falls(tmp_path):
    run = experiment("gradient_noise").main(["--results", str(tmp_path), "--quick", "--no-progress"])
    results = experiment_outputs(tmp_path, "gradient_noise.png")
    assert results["layers"] == run["layers"] == ["dense 1", "dense 2", "dense 3"]
    assert results["probe_size"] == results["n_train"]  # statistics over the whole training set
    snapshots = results["snapshots"]
    assert [s["step"] for s in snapshots] == list(range(0, 61, 10))
    for s in snapshots:
        for key in ("snr", "snr_entries", "variance_sum", "variance_mean", "grad_sq_norm"):
            assert len(s[key]) == 3
            assert all(math.isfinite(v) and v > 0 for v in s[key]), (key, s)
        for k in range(3):
            assert s["snr"][k] == pytest.approx(s["grad_sq_norm"][k] / s["variance_sum"][k], rel=1e-5)
            assert 0 <= s["unresolved"][k] < s["entries"][k]
    assert snapshots[-1]["train_loss"] < snapshots[0]["train_loss"]
    # the mean gradient shrinks faster than the per-example spread as the loss falls
    assert sum(snapshots[-1]["snr"]) < sum(snapshots[0]["snr"])


def test_cnn_digits_smoke(tmp_path):
    run = experiment("cnn_digits").main(["--results", str(tmp_path), "--quick", "--no-progress"])
    results = experiment_outputs(tmp_path, "curves.png")
    assert results["seeds"] == [0] and results["epochs"] == 2
    assert set(results["runs"]) == {"CNN", "MLP"}
    cnn, mlp = results["runs"]["CNN"][0], results["runs"]["MLP"][0]
    # conv(16, 3): 3*3*1*16 + 16; conv(32, 3): 3*3*16*32 + 32; dense(64) on 4*4*32; dense(10)
    assert cnn["params"] == 160 + 4640 + (512 * 64 + 64) + (64 * 10 + 10)
    assert mlp["params"] == (64 * 32 + 32) + (32 * 10 + 10)  # --quick: hidden [32]
    for model_run in (cnn, mlp):
        assert len(model_run["epochs"]) == 2 and model_run["steps"] == 2 * (1347 // 64)
        assert 0.0 <= model_run["test_accuracy"] <= 1.0 and model_run["seconds"] > 0
        assert model_run["test_errors"] == round((1 - model_run["test_accuracy"]) * 450)
        assert all("eval_accuracy" in row for row in model_run["epochs"])
    assert cnn["test_accuracy"] > 0.5  # two epochs of Adam learn something
    target = results["target"]
    assert target["threshold"] == 0.98 and target["met"] == (cnn["test_accuracy"] >= 0.98)
    assert run["met"] == target["met"]
    assert [row["model"] for row in results["rows"]] == ["CNN", "MLP"]


def test_sequence_smoke(tmp_path):
    summary = experiment("sequence").main(["--results", str(tmp_path), "--quick", "--no-progress"])
    results = experiment_outputs(tmp_path, "learning_curve.png")
    assert results["task"] == "sort" and results["summary"] == summary
    steps = results["epochs"] * (results["train_size"] // results["batch_size"])
    assert summary["steps"] == steps and len(results["step_loss"]) == steps
    curve = results["curve"]
    assert [row["step"] for row in curve] == [0, steps // 2, steps]  # init, then every epoch
    for row in curve:
        for key in ("test_exact_accuracy", "train_exact_accuracy", "test_token_accuracy"):
            assert 0.0 <= row[key] <= 1.0
        assert math.isfinite(row["test_loss"]) and row["test_loss"] > 0
    assert curve[-1]["test_loss"] < curve[0]["test_loss"]  # a few steps already learn
    assert summary["chance_exact_accuracy"] == pytest.approx(1e-8)
    assert summary["prompt_blind_best_exact_accuracy"] == pytest.approx(40320 / 1e8)
    assert summary["greedy_agrees_with_teacher_forced"] is True
    assert summary["met"] == (summary["test_exact_accuracy_greedy"] >= summary["target"])


def test_sequence_task_and_loss():
    import jax
    import numpy as np

    import funcnet as fnet

    module = experiment("sequence")
    x_train, y_train, x_test, y_test = module.make_data(0, "sort", 4, 3, 50, 20)
    assert x_train.shape == (50, 8) and y_train.shape == (50, 4) and x_test.shape == (20, 8)
    prompts = x_train[:, :4]
    assert (y_train == np.sort(prompts, axis=1)).all() and (x_train[:, 4] == 3).all()
    assert (x_train[:, 5:] == y_train[:, :-1]).all()  # teacher forcing: answer shifted by one
    assert not {r.tobytes() for r in x_test[:, :4]} & {r.tobytes() for r in prompts}  # held out
    _, y_reverse, _, _ = module.make_data(0, "reverse", 4, 3, 50, 20)
    assert (y_reverse == prompts[:, ::-1]).all()  # same prompts, other answer
    # exactly the prompt-blind optimum: 4 digits of 3 -> counts (2, 1, 1): 4! / (2! 1! 1!) / 3^4
    assert module.prompt_blind_best("sort", 4, 3) == 12 / 81
    assert module.prompt_blind_best("reverse", 4, 3) == 3.0 ** -4
    # the masked loss is softmax cross-entropy over the answer positions only (one jitted
    # call: eager ops compile one by one)
    logits = np.random.default_rng(0).normal(size=(5, 8, 3))
    y = y_train[:5]
    both = jax.jit(lambda out, y: (module.answer_cross_entropy(out, y),
                                   fnet.losses.softmax_cross_entropy(out[:, 4:].reshape(20, 3),
                                                                     y.reshape(20))))
    value, expected = both(logits, y)
    assert float(value) == pytest.approx(float(expected), rel=1e-12)


def test_sequence_greedy_decoding_feeds_back_its_own_tokens():
    import numpy as np

    module = experiment("sequence")
    n, vocab = 4, 3
    x, y, _, _ = module.make_data(1, "sort", n, vocab, 30, 1)

    def oracle(params, tokens):
        """A causal 'model' that answers from the prompt and its own earlier answer
        tokens: position n + i predicts the smallest prompt digit >= the token before it
        (at the separator: the smallest digit), counting repeats."""
        tokens = np.asarray(tokens)
        logits = np.zeros(tokens.shape + (vocab,))
        for b, row in enumerate(tokens):
            remaining = sorted(row[:n].tolist())
            for i in range(n):
                if i:
                    if row[n + i] not in remaining:
                        break  # a position not filled in yet: later outputs are not read
                    remaining.remove(row[n + i])  # an answer token fed back in
                logits[b, n + i, remaining[0]] = 1.0
        return logits

    assert (module.greedy_decode(oracle, None, x, n) == y).all()
    # the answer tokens in x are not used: the decoder writes its own
    scrambled = x.copy()
    scrambled[:, n + 1:] = (scrambled[:, n + 1:] + 1) % vocab
    assert (module.greedy_decode(oracle, None, scrambled, n) == y).all()
