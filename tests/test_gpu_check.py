"""benchmarks/gpu_check.py on this CPU-only machine, in a subprocess: with --allow-cpu at toy
size it runs one small test file and the cheapest benchmark and writes its report; without
it, it refuses and runs nothing; a benchmark past --timeout is killed and reported."""

import json
import subprocess
import sys

from scripts import BENCHMARKS, cpu_env

SCRIPT = BENCHMARKS / "gpu_check.py"
TESTS = "tests/nn/test_summary.py"  # five tests, a few seconds
NO_ACCELERATOR = 3


def _run(tmp_path, *args):
    """The script in a fresh process on the CPU (quick XLA compiles), its report in
    ``tmp_path``: (the finished process, the JSON report)."""
    done = subprocess.run([sys.executable, str(SCRIPT), *args, "--results", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, env=cpu_env())
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # atomic writes
    return done, report


def test_quick_on_cpu(tmp_path):
    done, report = _run(tmp_path, "--allow-cpu", "--quick", "--tests", TESTS,
                        "--benchmarks", "repeat_depth")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for stage in ("environment:", "tests:", "benchmark repeat_depth:", "passed: wrote"):
        assert f"[gpu_check] {stage}" in done.stdout
    assert report["status"] == "passed" and report["stage"] is None
    env = report["environment"]
    assert env["backend"] == "cpu" and env["accelerator"] is False
    assert env["jax"] and env["jaxlib"] and env["device_count"] >= 1
    assert env["variables"]["JAX_PLATFORMS"] == "cpu"  # passed on as it was

    tests = report["tests"]
    assert tests["ok"] and tests["rc"] == 0 and tests["paths"] == [TESTS]
    counts = tests["counts"]
    assert counts["passed"] > 0 and counts["failed"] == counts["errors"] == 0
    assert counts["tests"] == counts["passed"] + counts["skipped"]
    assert (tmp_path / "tests.junit.xml").exists() and tests["failed_tests"] == []

    assert list(report["benchmarks"]) == ["repeat_depth"]
    bench = report["benchmarks"]["repeat_depth"]
    assert bench["ok"] and bench["rc"] == 0 and not bench["timed_out"]
    assert "--quick" in bench["command"] and bench["seconds"] > 0
    results = bench["results"]
    assert results == json.loads((tmp_path / "repeat_depth" / "repeat_depth.json").read_text())
    assert results["benchmark"] == "repeat_depth" and results["config"]["width"] == 32  # quick
    assert results["targets"] and results["environment"]["backend"] == "cpu"
    assert (tmp_path / "repeat_depth.stdout.log").read_text()

    markdown = (tmp_path / "gpu_check.md").read_text()
    assert "Status: **passed**" in markdown and "| default backend | cpu |" in markdown
    assert f"`pytest -x {TESTS}`: {counts['passed']} passed, 0 failed" in markdown
    assert "## Benchmark repeat_depth" in markdown and "| target | measured |" in markdown
    for target in results["targets"]:
        assert target["target"] in markdown


def test_refuses_without_accelerator(tmp_path):
    done, report = _run(tmp_path, "--quick", "--tests", TESTS, "--benchmarks", "repeat_depth")
    assert done.returncode == NO_ACCELERATOR
    assert "gpu_check: no accelerator found: JAX's default backend is 'cpu'" in done.stderr
    assert "--allow-cpu" in done.stderr and "Nothing was run." in done.stderr
    assert report["status"] == "refused" and report["environment"]["backend"] == "cpu"
    assert report["tests"] is None and report["benchmarks"] == {}
    # nothing ran: only the report is there
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_check.json", "gpu_check.md"]
    assert "## Refused" in (tmp_path / "gpu_check.md").read_text()


def test_timeout_kills_and_reports(tmp_path):
    """A benchmark past --timeout is killed (it cannot even import JAX in 0.5 s), recorded
    as timed out without results, and the check fails after writing the report."""
    done, report = _run(tmp_path, "--allow-cpu", "--no-tests", "--timeout", "0.5",
                        "--benchmarks", "repeat_depth")
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert report["status"] == "failed" and report["tests"] is None
    bench = report["benchmarks"]["repeat_depth"]
    assert bench["timed_out"] and bench["rc"] != 0 and bench["results"] is None
    assert not bench["ok"]
    assert "TIMED OUT, no JSON written" in (tmp_path / "gpu_check.md").read_text()
