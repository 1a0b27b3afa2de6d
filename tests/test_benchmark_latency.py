"""Smoke run of benchmarks/latency.py at toy size (fresh processes, one epoch, one run).

Structure only: every contender has positive times and a ratio against scikit-learn, one
fit compiles a positive number of XLA programs, the cache serves the cached contenders,
and the JSON and Markdown are written. No timing threshold is asserted: timings are the
benchmark's business, on a quiet machine.
"""

import json
import math

import pytest

from scripts import BENCHMARKS, load_script  # noqa: E402

pytestmark = pytest.mark.standard_promotion  # it loads experiments/digits.py (optax)


def _positive_finite(value):
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        load_script(BENCHMARKS, "latency").main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "--quick" in out and "--results" in out and "--runs" in out


def test_latency_smoke(tmp_path, capsys):
    latency = load_script(BENCHMARKS, "latency")
    returned = latency.main(["--quick", "--results", str(tmp_path)])
    out = capsys.readouterr().out
    assert "| target | measured | threshold | met |" in out
    results = json.loads((tmp_path / "latency.json").read_text())
    assert (tmp_path / "latency.md").read_text().startswith("# Latency")
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # atomic writes
    assert results["benchmark"] == "latency" and results["environment"]["jax"]
    assert results["settings"]["matches_main_job"]  # the main job's batch and epochs
    assert json.loads(json.dumps(returned, default=float))["targets"] == results["targets"]

    rows = {row["contender"]: row for row in results["rows"]}
    assert set(rows) == set(latency.FUNCNET) | set(latency.SKLEARNS)
    for row in rows.values():
        for field in ("from_start_s", "wall_s", "fit_s", "over_sklearn", "wall_over_sklearn"):
            assert _positive_finite(row[field]), (row["contender"], field)
        assert row["wall_s"] > row["from_start_s"]  # the wall time adds interpreter start
        assert 0.5 < row["test_accuracy"] <= 1.0  # one epoch already learns
    assert rows[results["sklearn_reference"]]["over_sklearn"] == 1.0  # the faster setting

    count = results["compile_count_per_fit"]
    assert isinstance(count, int) and not isinstance(count, bool) and count > 0
    compiles = {c["contender"]: c for c in results["compiles"]}
    assert set(compiles) == set(latency.FUNCNET)
    for name in (latency.LOOP, latency.SCAN):
        assert compiles[name]["programs_per_fit"] == compiles[name]["compiled_per_fit"] > 0
        assert len(compiles[name]["fit_programs"]) == compiles[name]["programs_per_fit"]
    for name in latency.CACHED:  # warmed cache: every program of the fit comes from it
        assert compiles[name]["from_cache_per_fit"] == compiles[name]["programs_per_fit"] > 0
        assert compiles[name]["compiled_per_fit"] == 0

    imports = {row["statement"]: row for row in results["imports"]}
    assert {"import funcnet", "import sklearn.neural_network"} <= set(imports)
    assert all(_positive_finite(row["seconds"]) for row in imports.values())
    assert _positive_finite(results["import_ratio_funcnet_over_sklearn"])
    assert len(results["targets"]) == 4
    assert all(isinstance(t["met"], bool) and _positive_finite(t["measured"])
               for t in results["targets"])
