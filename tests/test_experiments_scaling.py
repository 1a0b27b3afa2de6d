"""experiments/scaling.py: a --quick run (1 and 2 host devices in one process, 2 processes
of 1 device) as a subprocess, and its failure paths (refused arguments, a worker that
fails, a timeout), which must end the run with a clear message, never skip a
configuration.

The subprocesses run with ``JAX_PLATFORMS=cpu``: the experiment's device counts are host
CPU devices, and the script itself leaves the platform alone."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest

from scripts import EXPERIMENTS, ROOT, experiment, experiment_outputs

SCRIPT = EXPERIMENTS / "scaling.py"


def _run(*args, timeout=240):
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))


def test_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        experiment("scaling").main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "--seed" in out and "--processes-devices" in out


def test_quick_run(tmp_path):
    done = _run("--quick", "--no-progress", "--results", str(tmp_path))
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    results = experiment_outputs(tmp_path, "scaling.png")
    rows = results["configurations"]
    assert [(r["processes"], r["devices_per_process"], r["devices"]) for r in rows] == [
        (1, 1, 1), (1, 2, 2), (2, 1, 2)]
    assert results["settings"]["batch"] == 64 and results["settings"]["hidden"] == [32]
    for row in rows:
        assert row["platform"] == "cpu"
        assert 0 < row["examples_per_second_min"] <= row["examples_per_second"] \
            <= row["examples_per_second_max"]
        assert len(row["round_seconds"]) == 3 and row["step_ms"] > 0
        assert row["steps_total"] == 2 + 3 * 5
        # every configuration trained the same steps: the same loss to float32 rounding,
        # and lower than at the start
        assert math.isfinite(row["loss"]) and row["loss"] < row["first_loss"]
        assert row["loss_relative_difference"] < 1e-4
    assert rows[0]["speedup"] == 1.0 and rows[0]["loss_relative_difference"] == 0.0
    assert results["max_loss_relative_difference"] < 1e-4
    # the batch is split: each of 2 devices does about half of the one device's FLOPs
    for row in rows[1:]:
        assert 0.4 < row["flops_per_device"] / rows[0]["flops_per_device"] < 0.7
    machine = results["machine"]
    assert machine["cpu_count"] >= 1 and len(machine["load_average_before"]) == 3
    assert len(machine["load_average_after"]) == 3 and machine["jax"]
    assert "not a GPU or cluster speed-up" in results["note"]
    assert "| processes | devices_per_process | devices |" in done.stdout


@pytest.mark.parametrize("argv, message", [
    (["--devices", "2", "4"], "--devices must include 1"),
    (["--batch", "100"], "does not split evenly over [8] devices"),
    (["--steps", "0"], "at least 1"),
])
def test_arguments_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        experiment("scaling").main(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_failing_worker_is_reported_with_its_output(tmp_path, monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    module = experiment("scaling")
    args = module.parse_arguments(["--quick"])
    args.batch = 6  # past the argument checks: 6 rows cannot be split over 4 devices
    with pytest.raises(module.WorkerFailed) as failure:
        module.run_configuration(args, 1, 4, tmp_path)
    message = str(failure.value)
    assert "1 process(es) x 4 device(s): exited with status 1" in message
    assert "6 cannot be split evenly over the mesh's 4 batch shards" in message


def test_timeout_fails_the_run(tmp_path):
    done = _run("--quick", "--no-progress", "--timeout", "0.5", "--results", str(tmp_path),
                timeout=120)
    assert done.returncode == 1
    assert "scaling: 1 process(es) x 1 device(s): timed out after 0.5 s" in done.stderr
    assert not (tmp_path / "results.json").exists()


def test_host_device_count_replaced(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=3 --xla_foo=1")
    env = experiment("scaling").host_devices_environment(8)
    assert env["XLA_FLAGS"].split() == ["--xla_foo=1",
                                        "--xla_force_host_platform_device_count=8"]
