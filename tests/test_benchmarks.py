"""Smoke runs of every benchmark at toy size: each runs, prints its Markdown tables and
targets, and writes a JSON of sane numbers (positive, finite ratios). No timing threshold
is asserted here: timings are the benchmarks' business, on a quiet machine."""

import json
import math
import time

import pytest

from scripts import BENCHMARKS, load_script  # noqa: E402

SCRIPTS = ["jacobian_accumulation", "remat_memory", "repeat_depth"]


def _load(name):
    return load_script(BENCHMARKS, name)


def _positive_finite(value):
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def _written(folder, name, returned):
    path = folder / f"{name}.json"
    results = json.loads(path.read_text())
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]  # written atomically
    assert results["benchmark"] == name
    assert results["environment"]["jax"]
    assert results["targets"] and all(isinstance(t["met"], bool) for t in results["targets"])
    assert json.loads(json.dumps(returned, default=float))["targets"] == results["targets"]
    return results


def _printed_tables(out):
    assert "| target | measured | threshold | met |" in out
    assert out.count("|---|") >= 2


@pytest.mark.parametrize("name", SCRIPTS)
def test_help(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        _load(name).main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "--quick" in out and "--results" in out


def test_timing_helpers(tmp_path):
    timing = _load("_timing")
    calls = []

    def contender(name, seconds):
        def run():
            calls.append(name)
            time.sleep(seconds)
        return run

    medians = timing.interleaved_medians({"a": contender("a", 0.001), "b": contender("b", 0.0)},
                                         repeats=4, warmup=1)
    assert set(medians) == {"a", "b"} and all(_positive_finite(m) for m in medians.values())
    assert len(calls) == 10 and sorted(calls[:2]) == ["a", "b"]
    rounds = [calls[i:i + 2] for i in range(2, 10, 2)]
    assert all(sorted(r) == ["a", "b"] for r in rounds)  # every round runs each once
    assert len({tuple(r) for r in rounds}) == 2  # in a seeded random order that varies

    path = timing.write_json(tmp_path / "sub" / "x.json", {"r": 1.5, "nan": float("nan")})
    assert json.loads(path.read_text())["r"] == 1.5
    assert [p.name for p in path.parent.iterdir()] == ["x.json"]

    text = timing.table([{"a": 1.23456, "b": True}, {"a": "s", "b": False}], ["a", "b"])
    assert text.splitlines() == ["| a | b |", "|---|---|", "| 1.23 | yes |", "| s | **NO** |"]


def test_jacobian_accumulation_smoke(tmp_path, capsys):
    name = "jacobian_accumulation"
    returned = _load(name).main(["--quick", "--shapes", "bottleneck", "--no-fnet-modes",
                                 "--repeats", "3", "--results", str(tmp_path), "-v"])
    out = capsys.readouterr().out
    _printed_tables(out)
    assert "Jacobian plan (wrt=input)" in out  # verbose: the plans
    results = _written(tmp_path, name, returned)
    assert [row["shape"] for row in results["rows"]] == ["bottleneck"]
    for row in results["rows"]:
        assert _positive_finite(row["speedup"]) and _positive_finite(row["predicted_speedup"])
        assert all(_positive_finite(t) for t in row["median_seconds"].values())
        assert all(_positive_finite(f) for f in row["predicted_flops"].values())
        assert row["jacobian_shape_ok"]
        assert max(row["max_abs_diff_vs_jacfwd"].values()) < 1e-4  # float32, tanh chain
    bottleneck = results["rows"][0]
    assert len(bottleneck["plan_segments"]) == 2  # reverse to the bottleneck, forward after
    assert bottleneck["predicted_flops"]["optimal"] < bottleneck["predicted_flops"]["reverse"]


def test_remat_memory_smoke(tmp_path, capsys):
    name = "remat_memory"
    returned = _load(name).main(["--layers", "4", "--width", "16", "--batch", "32",
                                 "--repeats", "2", "--results", str(tmp_path)])
    _printed_tables(capsys.readouterr().out)
    results = _written(tmp_path, name, returned)
    rows = {row["name"]: row for row in results["rows"]}
    assert {"fnet keep", "fnet sqrt", "fnet recompute", "jax.value_and_grad",
            "jax.checkpoint segments"} <= set(rows)
    for row in rows.values():
        assert _positive_finite(row["flops"]) and _positive_finite(row["flops_over_keep"])
        assert row["temp_size_in_bytes"] >= 0 and row["temp_over_keep"] >= 0
    for policy in ("keep", "sqrt"):  # timed at any size
        assert _positive_finite(rows[f"fnet {policy}"]["time_over_keep"])
        assert rows[f"fnet {policy}"]["grad_rel_diff_vs_jax"] < 1e-4
    assert rows["fnet recompute"]["flops_over_keep"] > 1  # recomputation survives XLA


def test_repeat_depth_smoke(tmp_path, capsys):
    name = "repeat_depth"
    returned = _load(name).main(["--quick", "--compile-depths", "2", "8", "--step-depths", "8",
                                 "--repeats", "3", "--no-jax-reference",
                                 "--results", str(tmp_path)])
    _printed_tables(capsys.readouterr().out)
    results = _written(tmp_path, name, returned)
    assert {(r["kind"], r["depth"]) for r in results["compile"]} == {
        (kind, depth) for kind in ("repeat", "unrolled") for depth in (2, 8)}
    assert all(_positive_finite(r["total_seconds"]) for r in results["compile"])
    assert all(_positive_finite(v) for v in results["compile_ratio"].values())
    (step,) = results["steps"]
    assert (step["width"], step["depth"]) == (32, 8)
    assert _positive_finite(step["repeat_over_unrolled"])
    assert step["grad_rel_diff"] < 1e-4
    assert _positive_finite(step["stacks_kept_repeat"])
    assert [r["policy"] for r in results["remat"]] == ["keep", "sqrt", "recompute"]
    assert all(_positive_finite(r["flops_over_keep"]) for r in results["remat"])


def test_eager_smoke(tmp_path, capsys):
    rows = _load("eager").main(["--quick", "--results", str(tmp_path)])
    out = capsys.readouterr().out
    assert {row["call"] for row in rows} == {"value_and_grad", "backprop", "jvp",
                                             "jax.value_and_grad (reference)"}
    assert all(_positive_finite(row["eager_over_jit"]) for row in rows)
    assert all(row["caches_stable"] for row in rows)
    saved = json.loads((tmp_path / "eager.json").read_text())
    assert len(saved["targets"]) == 4 and "eager / jit" in out


def test_all_runs_the_chosen_benchmarks(tmp_path, capsys):
    _load("all").main(["eager", "--quick", "--results", str(tmp_path)])
    out = capsys.readouterr().out
    assert "######## benchmarks/eager.py --quick" in out and "peers" not in out
    assert (tmp_path / "eager.json").exists()
