"""Smoke runs of benchmarks/curvature.py at toy size, in a subprocess (float32, as the
benchmark runs; this suite's conftest turns float64 on).

Structure and correctness only: the JSON and Markdown are written (atomically), every
funcnet contender and the jax.jvp(jax.grad) reference run ("ok") and agree with the
plain-JAX references (diag_ggn, the ggn_vp unit-vector entries, the kflr factors, hvp,
the gradients), a peer that cannot be imported (PyTorch, so BackPACK; kfac-jax) is
reported as "absent" with its targets not met rather than crashing the run, and, where
BackPACK is installed, its DiagGGNExact and KFLR agree with funcnet's on the MLP and on the
CNN. The target rows are present; no timing threshold is asserted: timings are the
benchmark's business, on a quiet machine.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

from scripts import BENCHMARKS, cpu_env, load_script  # noqa: E402
from test_benchmark_extensions import BLOCKER, _positive_finite  # noqa: E402

SCRIPT = BENCHMARKS / "curvature.py"
FUNCNET_ROWS = {"fnet value_and_grad", "fnet backprop diag_ggn",
                "ggn_vp x unit vectors (extrapolated)", "fnet backprop kflr", "fnet.hvp"}
JAX_ROWS = {"jax.jvp(jax.grad)"}
TORCH_ROWS = {"torch backward", "backpack DiagGGNExact", "backpack KFLR"}
CNN_TORCH_ROWS = TORCH_ROWS | {"backpack KFLR, conv layers too"}
KFAC_JAX = "kfac-jax exact-GGN factors"
FUNCNET_CHECKS = ["fnet value_and_grad grads vs jax.grad", "fnet diag_ggn vs plain-JAX reference",
                  "fnet backprop diag_ggn grads vs jax.grad",
                  "ggn_vp unit vectors (8 entries) vs plain-JAX reference",
                  "ggn_vp unit vectors (8 entries) vs fnet diag_ggn",
                  "fnet kflr: None exactly outside the dense layers with vector inputs",
                  "fnet kflr A vs plain-JAX reference", "fnet kflr G vs plain-JAX reference",
                  "fnet kflr grads vs jax.grad", "fnet.hvp vs jax.jvp(jax.grad)"]
PEER_CHECKS = ["torch backward: grads vs jax.grad",
               "backpack DiagGGNExact: diag_ggn_exact vs fnet diag_ggn",
               "backpack KFLR: A (weight) vs fnet kflr A[:fan_in, :fan_in]",
               "backpack KFLR: G (weight) vs fnet kflr G", "backpack KFLR: G (bias) vs fnet kflr G"]
CNN_PEER_CHECKS = PEER_CHECKS + [
    "backpack KFLR, conv layers too: A (weight) vs fnet kflr A[:fan_in, :fan_in]",
    "backpack KFLR, conv layers too: G (weight) vs fnet kflr G",
    "backpack KFLR, conv layers too: G (bias) vs fnet kflr G"]
PEERS_INSTALLED = all(importlib.util.find_spec(m) is not None for m in ("torch", "backpack"))
# the funcnet rows of the CNN run in test_quick_with_peers where the peers are installed;
# without them, here
ABSENT_CONFIGS = ["mlp"] if PEERS_INSTALLED else ["mlp", "cnn"]


def _run(tmp_path, args, blocked=()):
    """The script at --quick size in a fresh process, ``blocked`` modules unimportable."""
    code = f"BLOCKED = {set(blocked)!r}; SCRIPT = {str(SCRIPT)!r}\n" + BLOCKER
    done = subprocess.run(
        [sys.executable, "-c", code, "--quick", "--repeats", "2", "--warmup", "0",
         "--results", str(tmp_path), *args],
        capture_output=True, text=True, timeout=300, env=cpu_env())
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "curvature.json").read_text())
    markdown = (tmp_path / "curvature.md").read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # atomic writes
    assert results["benchmark"] == "curvature" and results["environment"]["jax"]
    assert "| target | measured | threshold | met |" in markdown
    assert "Machine:" in done.stdout and "| contender |" in done.stdout
    assert "EXTRAPOLATED" in markdown
    return results, markdown


def _funcnet_ok(results, kinds):
    """Every configuration of ``kinds`` ran every contender, the funcnet and JAX ones ok and
    agreeing with the references; its six target rows are there (booleans)."""
    assert [c["kind"] for c in results["configs"]] == kinds
    for summary in results["configs"]:
        label, checks = summary["label"], summary["checks"]
        for check in FUNCNET_CHECKS:
            assert checks[check] < 1e-3, (label, check, checks[check])
        assert summary["directions"] == 8 and summary["n_params"] > 8
        assert summary["kflr_slots"] == ([0, 2, 4] if summary["kind"] == "mlp" else [7])
        by = {r["contender"]: r for r in results["rows"] if r["config"] == label}
        torch_rows = CNN_TORCH_ROWS if summary["kind"] == "cnn" else TORCH_ROWS
        assert set(by) == FUNCNET_ROWS | JAX_ROWS | torch_rows | {KFAC_JAX}
        for name in FUNCNET_ROWS | JAX_ROWS:
            row = by[name]
            assert row["status"] == "ok", (label, name, row["detail"])
            for key in ("step_ms", "step_ms_min", "over_plain", "over_funcnet",
                        "temp_over_plain"):
                assert _positive_finite(row[key]), (label, name, key, row.get(key))
            # timed apart (--slow-seconds): no paired ratio
            assert _positive_finite(row["paired_over_funcnet"]) != bool(row.get("timed_apart"))
            assert row["temp_bytes"] >= 0 and row["compile_s"] >= 0
        loop = by["ggn_vp x unit vectors (extrapolated)"]
        assert loop["directions"] == 8
        assert math.isclose(loop["extrapolation_factor"], summary["n_params"] / 8)
        assert loop["step_ms"] > loop["measured_ms"]  # the extrapolated time
        targets = [t for t in results["targets"] if t["target"].startswith(label + ":")]
        assert len(targets) == 6, targets
        assert all(isinstance(t["met"], bool) for t in targets)
        funcnet_targets = [t for t in targets if "backpack" not in t["target"]]
        assert len(funcnet_targets) == 4
        assert all(_positive_finite(t["measured"]) for t in funcnet_targets)



def test_help(capsys):
    saved = os.environ.get("OMP_WAIT_POLICY")
    try:
        module = load_script(BENCHMARKS, "curvature")
    finally:
        if saved is None:  # the script sets it for torch; leave this process as it was
            os.environ.pop("OMP_WAIT_POLICY", None)
    with pytest.raises(SystemExit) as exit_:
        module.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for option in ("--quick", "--results", "--repeats", "--warmup", "--configs", "--batch",
                   "--hidden", "--directions"):
        assert option in out
    assert "BackPACK" in out and "EXTRAPOLATED" in out


def test_quick_reports_absent_peers(tmp_path):
    """PyTorch (so BackPACK) and kfac-jax made unimportable; --slow-seconds 0 times every
    contender but funcnet's own apart (after the rounds)."""
    results, markdown = _run(tmp_path, ["--configs", *ABSENT_CONFIGS, "--slow-seconds", "0"],
                             blocked=("torch", "backpack", "kfac_jax"))
    _funcnet_ok(results, ABSENT_CONFIGS)
    apart = {r["contender"] for r in results["rows"] if r.get("timed_apart")}
    assert apart == {"ggn_vp x unit vectors (extrapolated)", "jax.jvp(jax.grad)"}
    assert "Timed apart (not interleaved; no paired ratio)" in markdown
    for library in ("torch", "backpack", "kfac-jax"):
        entry = results["libraries"][library]
        assert entry["status"] == "absent" and "not installed" in entry["detail"]
    for row in results["rows"]:
        if row["library"] in ("torch", "backpack", "kfac-jax"):
            assert row["status"] == "absent" and "step_ms" not in row
            assert math.isnan(row["over_funcnet"])
    for summary in results["configs"]:
        peer_checks = {k: v for k, v in summary["checks"].items()
                       if k.startswith(("backpack", "torch"))}
        assert set(PEER_CHECKS) <= set(peer_checks)  # reported, as n/a
        assert all(math.isnan(v) for v in peer_checks.values())
    peer_targets = [t for t in results["targets"] if "backpack" in t["target"]]
    assert len(peer_targets) == 2 * len(ABSENT_CONFIGS)
    assert all("(absent)" in t["target"] and t["met"] is False for t in peer_targets)
    assert "backpack DiagGGNExact absent" in markdown and f"{KFAC_JAX} absent" in markdown


@pytest.mark.skipif(not PEERS_INSTALLED,
                    reason="PyTorch or BackPACK not installed (the bench extra)")
def test_quick_with_peers(tmp_path):
    """With BackPACK installed: it runs and agrees with funcnet on the MLP and on the CNN
    (channels-first layouts, the permuted rows of the dense after flatten, KFLR of the
    dense layer alone and of the whole CNN)."""
    results, _ = _run(tmp_path, ["--configs", "mlp", "cnn"])
    _funcnet_ok(results, ["mlp", "cnn"])
    for summary in results["configs"]:
        checks = summary["checks"]
        for check in CNN_PEER_CHECKS if summary["kind"] == "cnn" else PEER_CHECKS:
            assert checks[check] < 1e-3, (summary["label"], check, checks[check])
        by = {r["contender"]: r for r in results["rows"] if r["config"] == summary["label"]}
        for name in CNN_TORCH_ROWS if summary["kind"] == "cnn" else TORCH_ROWS:
            assert by[name]["status"] == "ok", (name, by[name]["detail"])
            assert _positive_finite(by[name]["step_ms"])
            assert _positive_finite(by[name]["over_funcnet"])
        assert by[KFAC_JAX]["status"] in ("absent", "not run")  # never a crash
    peer_targets = [t for t in results["targets"] if "backpack" in t["target"]]
    assert len(peer_targets) == 4 and all("absent" not in t["target"] for t in peer_targets)
