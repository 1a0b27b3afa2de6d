"""Smoke runs of benchmarks/peers.py and benchmarks/epoch.py at toy size.

Structure only: the JSON and Markdown are written (atomically), every configuration has a
funcnet row, ratios are finite and positive, a peer that cannot be imported is reported as
"absent" (with its targets not met) rather than dropped. No timing threshold is asserted:
timings are the benchmarks' business, on a quiet machine.
"""

import json
import math
import os
import subprocess
import sys

import pytest

from scripts import BENCHMARKS, load_script  # noqa: E402



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


def test_peers_quick_reports_absent_torch(tmp_path):
    """The whole script at --quick size, torch made unimportable in a subprocess."""
    code = ("import runpy, sys; sys.modules['torch'] = None; "
            f"sys.argv = [{str(BENCHMARKS / 'peers.py')!r}] + sys.argv[1:]; "
            f"runpy.run_path({str(BENCHMARKS / 'peers.py')!r}, run_name='__main__')")
    args = ["--quick", "--only", "funcnet", "jax.value_and_grad", "torch (eager)",
            "--repeats", "2", "--warmup", "0", "--results", str(tmp_path)]
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results, markdown = _written(tmp_path, "peers")
    assert "Machine:" in done.stdout and "| library |" in done.stdout

    labels = [c["label"] for c in results["configs"]]
    assert len(labels) >= 3
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
