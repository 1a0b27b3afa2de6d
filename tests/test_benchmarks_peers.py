"""Smoke runs of benchmarks/peers.py and benchmarks/epoch.py at toy size.

Structure and agreement only: the JSON and Markdown are written (atomically), every
configuration has a funcnet row, ratios are finite and positive, every contender that runs
starts from funcnet's weights (its first-step loss agrees with funcnet's, on the MLPs, the
CNN and the transformer block), a peer that cannot be imported is reported as "absent"
(with its targets not met) rather than dropped. No timing threshold is asserted: timings
are the benchmarks' business, on a quiet machine.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

from scripts import BENCHMARKS, cpu_env, load_script  # noqa: E402



def _load(name):
    saved = os.environ.get("OMP_WAIT_POLICY")
    try:
        return load_script(BENCHMARKS, name)
    finally:
        if saved is None:  # peers.py sets it for torch; leave this process as it was
            os.environ.pop("OMP_WAIT_POLICY", None)


def _positive_finite(value):
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def _written(folder, name):
    results = json.loads((folder / f"{name}.json").read_text())
    markdown = (folder / f"{name}.md").read_text()
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]  # atomic writes
    assert results["benchmark"] == name and results["environment"]["jax"]
    assert results["targets"] and all(isinstance(t["met"], bool) for t in results["targets"])
    assert "| target | measured | threshold | met |" in markdown
    return results, markdown


@pytest.mark.parametrize("name", ["peers", "epoch"])
def test_help(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        _load(name).main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "--quick" in out and "--results" in out


def test_peer_status_absent_when_import_fails(monkeypatch):
    peers = _load("peers")
    monkeypatch.setitem(sys.modules, "equinox", None)  # `import equinox` raises ImportError
    status, detail = peers.peer_status("equinox")
    assert status == "absent" and "not installed" in detail
    assert peers.peer_status("jax")[0] == "ok"


def test_shuffled_times_blocks_and_order():
    peers = _load("peers")
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abcd"}
    times, switches = peers.shuffled_times(fns, repeats=6, warmup=1, seed=0, block=3)
    assert len(calls) == (1 + 6) * 4 * 3
    assert all(len(times[n]) == 6 * 2 and len(switches[n]) == 6 for n in fns)
    rounds = ["".join(calls[i:i + 12:3]) for i in range(12, len(calls), 12)]
    assert all(sorted(r) == list("abcd") for r in rounds) and len(set(rounds)) > 1  # shuffled
    times, switches = peers.shuffled_times(fns, repeats=2, warmup=0, block=1)
    assert all(len(times[n]) == 2 and not switches[n] for n in fns)



def _run_peers(tmp_path, args, block_torch=False):
    """peers.py in a fresh process (float32: this suite's conftest turns float64 on)."""
    code = ("import runpy, sys; " + ("sys.modules['torch'] = None; " if block_torch else "")
            + f"sys.argv = [{str(BENCHMARKS / 'peers.py')!r}] + sys.argv[1:]; "
            f"runpy.run_path({str(BENCHMARKS / 'peers.py')!r}, run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", code, *args, "--results", str(tmp_path)],
                          capture_output=True, text=True, timeout=300,
                          env=cpu_env())
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Machine:" in done.stdout and "| library |" in done.stdout
    return _written(tmp_path, "peers")


def test_peers_quick_reports_absent_torch(tmp_path):
    """The MLP configurations at --quick size, torch made unimportable in a subprocess."""
    results, markdown = _run_peers(
        tmp_path, ["--quick", "--configs", "mlp", "--only", "funcnet", "jax.value_and_grad",
                   "torch (eager)", "--repeats", "2", "--warmup", "0"], block_torch=True)

    labels = [c["label"] for c in results["configs"]]
    assert len(labels) == 3 and {c["kind"] for c in results["configs"]} == {"mlp"}
    rows = results["rows"]
    for label in labels:
        by = {r["library"]: r for r in rows if r["config"] == label}
        assert set(by) == {"funcnet", "jax.value_and_grad", "torch (eager)"}
        assert by["funcnet"]["status"] == "ok" and by["funcnet"]["ratio_to_funcnet"] == 1
        for library in ("funcnet", "jax.value_and_grad"):
            row = by[library]
            for key in ("step_ms", "step_ms_min", "ratio_to_funcnet", "paired_ratio_to_funcnet",
                        "gflops", "fraction_of_xla_peak"):
                assert _positive_finite(row[key]), (label, library, key, row.get(key))
            assert row["compile_s"] >= 0 and row["loss_step1_diff"] < 1e-4
        torch_row = by["torch (eager)"]
        assert torch_row["status"] == "absent" and "not installed" in torch_row["detail"]
        assert "step_ms" not in torch_row and math.isnan(torch_row["ratio_to_funcnet"])
    torch_targets = [t for t in results["targets"] if "torch" in t["target"]]
    assert len(torch_targets) == len(labels)
    assert all("(absent)" in t["target"] and t["met"] is False for t in torch_targets)
    assert "torch (eager) absent" in markdown
    assert {r["library"] for r in results["tiny_rows"]} == {"funcnet", "jax.value_and_grad",
                                                            "torch (eager)"}
    assert any("Python overhead" in t["target"] for t in results["targets"])
    for peak in results["matmul_peaks"]:
        assert _positive_finite(peak["xla_gflops"]) and _positive_finite(peak["numpy_over_xla"])


PEER_MODULES = {"equinox": "equinox", "flax.linen": "flax", "flax.nnx": "flax",
                "torch (eager)": "torch"}


def test_peers_quick_cnn_and_transformer(tmp_path):
    """The CNN and the transformer block at --quick size with every contender: those that
    run start from funcnet's weights (kernels, attention projections and flatten orders
    copied into each library's layout), so their first-step losses agree with funcnet's;
    those not installed are reported absent, their targets not met."""
    results, markdown = _run_peers(
        tmp_path, ["--quick", "--configs", "cnn", "transformer", "--repeats", "1",
                   "--warmup", "0", "--block", "1", "--peak-sizes", "64"])
    assert [c["kind"] for c in results["configs"]] == ["cnn", "transformer"]
    assert results["tiny_rows"] == []  # the tiny net runs with the MLPs only
    assert not any("tiny" in t["target"] for t in results["targets"])
    targets = {t["target"]: t for t in results["targets"]}
    for summary in results["configs"]:
        label = summary["label"]
        assert _positive_finite(summary["flops_per_step"]) and summary["n_params"] > 0
        by = {r["library"]: r for r in results["rows"] if r["config"] == label}
        assert set(by) == {"funcnet", "jax.value_and_grad", *PEER_MODULES}
        loss0 = by["funcnet"]["loss_step1"]
        assert math.isfinite(loss0) and loss0 > 0
        reference = targets[f"{label}: funcnet / jax.value_and_grad step time"]
        assert reference["threshold"] == "<= 1.05" and _positive_finite(reference["measured"])
        for library, row in by.items():
            installed = library not in PEER_MODULES or (
                importlib.util.find_spec(PEER_MODULES[library]) is not None)
            assert row["status"] == ("ok" if installed else "absent"), (label, library, row)
            if row["status"] == "ok":
                assert row["loss_step1_diff"] <= 1e-5 * max(1.0, abs(loss0)), (
                    label, library, row["loss_step1"], loss0)
                for key in ("step_ms", "ratio_to_funcnet", "gflops"):
                    assert _positive_finite(row[key]), (label, library, key, row.get(key))
            else:
                assert "not installed" in row["detail"] and "step_ms" not in row
                assert f"{library} absent" in markdown
            if library in PEER_MODULES:
                target = [t for name, t in targets.items()
                          if name.startswith(f"{label}: {library} / funcnet")]
                assert len(target) == 1
                assert row["status"] == "ok" or (
                    "(absent)" in target[0]["target"] and target[0]["met"] is False)


@pytest.mark.standard_promotion  # optax promotes Python floats against its int32 count
def test_epoch_quick(tmp_path):
    epoch = _load("epoch")
    returned = epoch.main(["--quick", "--epochs", "2", "--sklearn-threads", "1", "--no-hand-loop",
                           "--results", str(tmp_path)])
    results, _ = _written(tmp_path, "epoch")
    assert json.loads(json.dumps(returned, default=float))["targets"] == results["targets"]
    by = {r["contender"]: r for r in results["rows"]}
    assert set(by) >= {epoch.SCAN, epoch.LOOP, epoch.SKLEARN_1}
    for row in by.values():
        assert _positive_finite(row["epoch_ms"]) and _positive_finite(row["epoch_over_scan"])
        assert 0 <= row["test_accuracy"] <= 1
    assert by[epoch.SCAN]["epoch_over_scan"] == 1
    assert results["same_steps"]["step_loss_max_abs_diff"] < 1e-5  # the same steps
    assert len(results["targets"]) == 3
