"""Smoke runs of benchmarks/extensions.py at toy size, in a subprocess (float32, as the
benchmark runs; this suite's conftest turns float64 on).

Structure and correctness only, on an MLP and on the CNN: the JSON and Markdown are
written (atomically), every funcnet and vmap contender runs ("ok") and agrees with the
vmap reference, a peer that cannot be imported (PyTorch, BackPACK, Opacus, jax-privacy) is
reported as "absent" with its targets not met rather than crashing the run, and, where the
peers are installed, their numbers (the CNN's per-example gradient norms by BackPACK and
Opacus among them) agree with funcnet's. No timing threshold is asserted: timings are the
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

SCRIPT = BENCHMARKS / "extensions.py"
FUNCNET_ROWS = {"fnet per_example_grad_norms", "fnet clipped_value_and_grad",
                "fnet backprop +3 ext", "fnet backprop +4 ext", "fnet value_and_grad"}
VMAP_ROWS = {"vmap(jax.grad) + norms", "vmap clipped grad", "jax.value_and_grad"}
TORCH_ROWS = {"torch backward", "backpack BatchL2Grad", "backpack +3 ext", "backpack +4 ext",
              "opacus clipping (hooks)", "opacus ghost clipping", "opacus per-sample norms"}
PEER_MODULES = ("torch", "backpack", "opacus", "jax_privacy")
FUNCNET_CHECKS = ["fnet norms vs vmap", "vmap norms (timed) vs vmap reference",
                  "fnet clipped grads vs vmap clipped", "fnet clipped value vs vmap (abs)",
                  "fnet backprop batch_l2 vs vmap", "fnet backprop second_moment vs vmap",
                  "fnet backprop variance vs vmap", "fnet backprop grads vs jax.value_and_grad",
                  "fnet value_and_grad grads vs jax.value_and_grad",
                  "fnet backprop batch_grad squared norms vs vmap"]
# the CNN runs the norms and the plain baselines only
CNN_FUNCNET_ROWS = {"fnet per_example_grad_norms", "fnet value_and_grad"}
CNN_VMAP_ROWS = {"vmap(jax.grad) + norms", "jax.value_and_grad"}
CNN_TORCH_ROWS = {"torch backward", "backpack BatchL2Grad", "opacus per-sample norms"}
CNN_FUNCNET_CHECKS = ["fnet norms vs vmap", "vmap norms (timed) vs vmap reference",
                      "fnet value_and_grad grads vs jax.value_and_grad"]
CNN_PEER_CHECKS = ["backpack BatchL2Grad: sqrt(sum batch_l2) * B vs vmap norms",
                   "opacus per-sample norms: norms vs vmap norms",
                   "torch backward: grads vs jax.value_and_grad"]


def _positive_finite(value):
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


# A finder that refuses the blocked modules as if they were not installed. (Setting
# sys.modules[name] = None instead leaves a None that SciPy's array-API helpers, imported
# through dp_accounting, dereference when they look for torch.Tensor.)
BLOCKER = """
import importlib.abc, runpy, sys

class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
        return None

sys.meta_path.insert(0, Blocked())
sys.argv = [SCRIPT] + sys.argv[1:]
runpy.run_path(SCRIPT, run_name="__main__")
"""



def _run(tmp_path, args, blocked=()):
    """The script at --quick size in a fresh process, ``blocked`` modules unimportable."""
    code = f"BLOCKED = {set(blocked)!r}; SCRIPT = {str(SCRIPT)!r}\n" + BLOCKER
    done = subprocess.run(
        [sys.executable, "-c", code, "--quick", "--repeats", "2", "--warmup", "0",
         "--results", str(tmp_path), *args],
        capture_output=True, text=True, timeout=300, env=cpu_env())
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "extensions.json").read_text())
    markdown = (tmp_path / "extensions.md").read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # atomic writes
    assert results["benchmark"] == "extensions" and results["environment"]["jax"]
    assert results["targets"] and all(isinstance(t["met"], bool) for t in results["targets"])
    assert "| target | measured | threshold | met |" in markdown
    assert "Machine:" in done.stdout and "| contender |" in done.stdout
    return results, markdown


def _kind_rows(kind):
    """(funcnet rows, vmap rows, rows of torch and its libraries) of a configuration kind."""
    if kind == "cnn":
        return CNN_FUNCNET_ROWS, CNN_VMAP_ROWS, CNN_TORCH_ROWS
    return FUNCNET_ROWS, VMAP_ROWS, TORCH_ROWS


def _funcnet_rows_ok(results):
    labels = [c["label"] for c in results["configs"]]
    for summary in results["configs"]:
        checks = summary["checks"]
        for check in CNN_FUNCNET_CHECKS if summary["kind"] == "cnn" else FUNCNET_CHECKS:
            assert checks[check] < 1e-3, (summary["label"], check, checks[check])
        assert _positive_finite(summary["max_norm"]) and 0 < summary["clipped_fraction"] < 1
    for summary in results["configs"]:
        label = summary["label"]
        funcnet_rows, vmap_rows, torch_rows = _kind_rows(summary["kind"])
        by = {r["contender"]: r for r in results["rows"] if r["config"] == label}
        # exactly the kind's contenders: none dropped, none that the kind does not run
        assert set(by) == funcnet_rows | vmap_rows | torch_rows | (
            {"jax-privacy clipped grad"} if summary["kind"] == "mlp" else set())
        for name in funcnet_rows | vmap_rows:
            row = by[name]
            assert row["status"] == "ok", (label, name, row["detail"])
            for key in ("step_ms", "step_ms_min", "over_plain", "over_funcnet",
                        "paired_over_funcnet", "temp_over_plain"):
                assert _positive_finite(row[key]), (label, name, key, row.get(key))
            assert row["temp_bytes"] >= 0 and row["compile_s"] >= 0
        for name in funcnet_rows:
            assert by[name]["over_funcnet"] == 1  # its own counterpart
    return labels


def test_help(capsys):
    saved = os.environ.get("OMP_WAIT_POLICY")
    try:
        module = load_script(BENCHMARKS, "extensions")
    finally:
        if saved is None:  # the script sets it for torch; leave this process as it was
            os.environ.pop("OMP_WAIT_POLICY", None)
    with pytest.raises(SystemExit) as exit_:
        module.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "--quick" in out and "--results" in out and "BackPACK" in out


def test_quick_reports_absent_peers(tmp_path):
    """PyTorch (so BackPACK and Opacus) and jax-privacy made unimportable; an MLP and the
    CNN."""
    results, markdown = _run(tmp_path, ["--configs", "1", "2"], blocked=PEER_MODULES)
    labels = _funcnet_rows_ok(results)
    assert labels == ["8->16x3->10, batch 4", "CNN 8x8x1, conv 4-8 (3x3), batch 8"]
    assert [c["kind"] for c in results["configs"]] == ["mlp", "cnn"]
    for library in ("torch", "backpack", "opacus", "jax-privacy"):
        entry = results["libraries"][library]
        assert entry["status"] == "absent" and "not installed" in entry["detail"]
    peer_rows = [r for r in results["rows"] if r["contender"] in TORCH_ROWS
                 or r["library"] == "jax-privacy"]
    assert len(peer_rows) == (len(TORCH_ROWS) + 1) + len(CNN_TORCH_ROWS)
    for row in peer_rows:
        assert row["status"] == "absent" and "step_ms" not in row
        assert math.isnan(row["over_funcnet"])
    for summary in results["configs"]:
        assert all(math.isnan(v) for k, v in summary["checks"].items()
                   if k.startswith(("backpack", "opacus", "torch", "jax-privacy")))
    assert set(CNN_PEER_CHECKS) <= set(results["configs"][1]["checks"])  # reported, as n/a
    peer_targets = [t for t in results["targets"] if t["target"].split(": ")[1].startswith(
        ("backpack", "opacus"))]
    assert len(peer_targets) == 6 + 2  # the MLP: 6; the CNN: BackPACK's and Opacus' norms
    assert all("(absent)" in t["target"] and t["met"] is False for t in peer_targets)
    funcnet_targets = [t for t in results["targets"] if t not in peer_targets]
    assert len(funcnet_targets) == 5 + 1  # the CNN: vmap norms / fnet norms >= 5
    assert all(_positive_finite(t["measured"]) for t in funcnet_targets)
    (cnn_norms,) = [t for t in funcnet_targets if t["target"].startswith(labels[1])]
    assert cnn_norms["threshold"] == ">= 5"
    assert "backpack +4 ext absent" in markdown and "opacus clipping (hooks) absent" in markdown
    assert "opacus per-sample norms absent" in markdown


@pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in PEER_MODULES[:3]),
                    reason="PyTorch, BackPACK or Opacus not installed (the bench extra)")
def test_quick_with_peers(tmp_path):
    """With the peers installed: they run, and agree with funcnet and the vmap reference,
    on an MLP and on the CNN (per-example gradient norms)."""
    results, _ = _run(tmp_path, ["--configs", "0", "2"])
    label, cnn_label = _funcnet_rows_ok(results)
    for config, names in ((label, TORCH_ROWS), (cnn_label, CNN_TORCH_ROWS)):
        by = {r["contender"]: r for r in results["rows"] if r["config"] == config}
        for name in names:
            assert by[name]["status"] == "ok", (config, name, by[name]["detail"])
            assert _positive_finite(by[name]["step_ms"])
            assert _positive_finite(by[name]["over_funcnet"])
    cnn_checks = results["configs"][1]["checks"]
    for check in CNN_PEER_CHECKS:
        assert cnn_checks[check] < 1e-3, (check, cnn_checks[check])
    by = {r["contender"]: r for r in results["rows"] if r["config"] == label}
    checks = results["configs"][0]["checks"]
    for check in ("backpack BatchL2Grad: batch_l2 * B^2 vs fnet batch_l2",
                  "backpack BatchL2Grad: sqrt(sum batch_l2) * B vs vmap norms",
                  "opacus per-sample norms: norms vs vmap norms",
                  "backpack +3 ext: batch_l2 * B^2 vs fnet batch_l2",
                  "backpack +3 ext: sum_grad_squared * B vs fnet second_moment",
                  "backpack +3 ext: variance * B^2 vs fnet variance",
                  "torch backward: grads vs jax.value_and_grad",
                  "opacus clipping (hooks): clipped grads vs vmap clipped",
                  "opacus ghost clipping: clipped grads vs vmap clipped"):
        assert checks[check] < 1e-3, (check, checks[check])
    privacy = by["jax-privacy clipped grad"]
    assert privacy["status"] in ("ok", "absent"), privacy["detail"]  # never a crash
    if privacy["status"] == "ok":
        assert checks["jax-privacy clipped grad: clipped grads vs vmap clipped"] < 1e-3
