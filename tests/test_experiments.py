"""Smoke runs of every experiment at toy size: they run, write JSON and PNG, and their
numbers say what the experiment claims."""

import json
from pathlib import Path

import pytest

from scripts import EXPERIMENTS, load_script  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

pytestmark = pytest.mark.standard_promotion  # the experiments drive optax


def _load(name):
    return load_script(EXPERIMENTS, name)


def _outputs(folder, png):
    results = json.loads((folder / "results.json").read_text())
    assert (folder / png).read_bytes()[:8] == PNG_MAGIC
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]  # no half-written files
    return results


@pytest.mark.parametrize("name", ["digits", "breast_cancer", "diabetes", "gradient_flow"])
def test_help(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        _load(name).main(["--help"])
    assert exit_.value.code == 0
    assert "--seed" in capsys.readouterr().out


def test_digits_smoke(tmp_path):
    rows = _load("digits").main(["--results", str(tmp_path), "--scale", "0.05",
                                 "--hidden", "32", "--no-progress"])
    results = _outputs(tmp_path, "loss.png")
    names = [row["method"] for row in results["rows"]]
    assert names[:4] == ["funcnet full-batch GD", "funcnet SGD (batch 1)",
                         "funcnet mini-batch SGD", "funcnet Adam"]
    assert names[4].startswith("scikit-learn MLPClassifier")
    assert all(0.0 <= row["test_accuracy"] <= 1.0 for row in rows)
    assert results["rows"][3]["test_accuracy"] > 0.5  # even a short Adam run learns
    for run in results["runs"].values():
        assert len(run["step_loss"]) >= 1 and run["epochs"]


def test_breast_cancer_smoke(tmp_path):
    summary = _load("breast_cancer").main(["--results", str(tmp_path), "--epochs", "3",
                                           "--no-progress"])
    results = _outputs(tmp_path, "curves.png")
    assert len(results["epochs"]) == 3
    assert summary["test_accuracy"] > 0.85


def test_diabetes_gradient_descent_reaches_lstsq_to_1e_6(tmp_path):
    summary = _load("diabetes").main(["--results", str(tmp_path), "--no-progress"])
    results = _outputs(tmp_path, "convergence.png")
    assert summary["max_abs_diff_w"] <= 1e-6 and summary["max_abs_diff_b"] <= 1e-6
    assert results["summary"]["matches_lstsq_to_1e-6"] is True
    distances = [gap for _, gap in results["distance"]]
    assert distances[-1] < distances[0]


def test_gradient_flow_shows_vanishing_sigmoid_gradients(tmp_path):
    runs = _load("gradient_flow").main(["--results", str(tmp_path), "--epochs", "1",
                                        "--width", "16", "--no-progress"])
    _outputs(tmp_path, "gradient_flow.png")
    sigmoid, tanh = runs["sigmoid"], runs["tanh"]
    assert len(sigmoid["p_norms"][0]) == 13  # 12 hidden dense layers and the output layer
    assert len(sigmoid["q_norms"][0]) == 26  # z_1 .. z_{L+1}, L = 25
    assert sigmoid["p_first_over_last_at_init"] < 1e-4
    assert sigmoid["p_first_over_last_at_init"] < tanh["p_first_over_last_at_init"] / 100
