"""Smoke runs of the cost experiments (Jacobian accumulation, memory) at toy size: they
run, write JSON and PNG, and their numbers say what the experiments claim. No timing is
asserted (the machine is shared); FLOPs and bytes are deterministic."""


import pytest

from scripts import experiment, experiment_outputs  # noqa: E402


@pytest.mark.parametrize("name", ["jacobian_accumulation", "memory"])
def test_help(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        experiment(name).main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "--seed" in out and "--quick" in out and "--no-progress" in out


@pytest.fixture(scope="module")
def accumulation(tmp_path_factory):
    folder = tmp_path_factory.mktemp("jacobian_accumulation")
    rows = experiment("jacobian_accumulation").main(["--results", str(folder), "--quick",
                                                "--no-progress"])
    return rows, experiment_outputs(folder, "time_vs_flops.png", "time_per_shape.png")


def test_jacobian_accumulation_writes_every_shape_and_mode(accumulation):
    rows, results = accumulation
    runs = results["runs"]
    assert sorted(row["shape"] for row in rows) == sorted(runs)  # JSON sorts the keys
    assert {"bottleneck 4", "bottleneck 16", "monotone up", "monotone down"} <= set(runs)
    for run in runs.values():
        assert set(run["seconds"]) == {"forward", "reverse", "optimal", "jax.jacfwd", "jax.jacrev"}
        assert all(t > 0 for t in run["seconds"].values())
        assert run["plan"]["order"] and run["plan"]["segments"]
        # the optimal plan is never worse than either plain mode under the model
        flops = run["predicted_flops"]
        assert flops["optimal"] <= min(flops["forward"], flops["reverse"])
    assert results["fit"]["points"] == 5 * len(runs)


def test_bottlenecks_get_a_split_plan_cheaper_than_both_plain_modes(accumulation):
    _, results = accumulation
    bottlenecks = {name: run for name, run in results["runs"].items()
                   if name.startswith("bottleneck")}
    assert len(bottlenecks) == 2
    for run in bottlenecks.values():
        flops = run["predicted_flops"]
        assert flops["optimal"] < flops["forward"] and flops["optimal"] < flops["reverse"]
        assert run["n_segments"] >= 2
        modes = [segment["mode"] for segment in run["plan"]["segments"]]
        assert modes == ["reverse", "forward"]  # reverse up to the bottleneck, forward after
    # monotone chains: the plan is the plain mode on the narrow side
    runs = results["runs"]
    assert [s["mode"] for s in runs["monotone up"]["plan"]["segments"]] == ["forward"]
    assert [s["mode"] for s in runs["monotone down"]["plan"]["segments"]] == ["reverse"]


def test_every_mode_matches_jax_jacfwd_in_float32(accumulation):
    _, results = accumulation
    for name, run in results["runs"].items():
        n_in, n_out = run["widths"][0], run["widths"][-1]
        assert run["jacobian_shape"] == [n_out, n_in], name
        for mode, diff in run["max_abs_diff_vs_jacfwd"].items():
            assert diff < 1e-4, (name, mode, diff)


@pytest.fixture(scope="module")
def memory(tmp_path_factory):
    folder = tmp_path_factory.mktemp("memory")
    rows = experiment("memory").main(["--results", str(folder), "--quick", "--no-progress"])
    return rows, experiment_outputs(folder, "memory_vs_width.png", "memory_vs_depth.png")


def test_memory_count_matches_layer_jacobians(memory):
    _, results = memory
    assert results["verified"] is True
    for check in results["verification"]:
        assert check["analytic_A"] == check["actual_A"] > 0
        assert check["analytic_B"] == check["actual_B"] > 0


def test_materialised_jacobians_grow_faster_with_width_than_activations(memory):
    rows, results = memory
    points = results["sweeps"]["width"]
    assert len(rows) == len(points) + len(results["sweeps"]["depth"])
    widths = [p["width"] for p in points]
    assert widths == sorted(widths) and len(widths) >= 3
    ratios = [p["jacobians_over_activations"] for p in points]
    assert all(a < b for a, b in zip(ratios, ratios[1:]))
    assert ratios[-1] > 10 * ratios[0]  # widths grow 8-fold: at least quadratic against linear
    for p in points:
        assert p["jacobians"] == p["jacobians_A"] + p["jacobians_B"]
        assert p["activations"] == p["batch"] * 2 * p["depth"] * p["width"] * 4


def test_keep_memory_grows_with_depth_and_remat_saves_it(memory):
    _, results = memory
    points = results["sweeps"]["depth"]
    depths = [p["depth"] for p in points]
    assert depths == sorted(depths) and len(depths) >= 3
    keep = [p["measured"]["keep"]["temp"] for p in points]
    assert all(a < b for a, b in zip(keep, keep[1:]))
    deepest = points[-1]["measured"]
    assert deepest["recompute"]["temp"] <= deepest["sqrt"]["temp"] <= deepest["keep"]["temp"]
    assert deepest["recompute"]["temp"] < deepest["keep"]["temp"]
