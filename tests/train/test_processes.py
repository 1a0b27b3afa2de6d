"""Several processes over loopback: fit on 2 processes x 2 host devices equals fit on
1 process x 4 devices; checkpoints have one writer and every process resumes from them;
the launcher's environment, failures, timeouts and cleanup.

The runs are subprocesses (a JAX process's devices and its distributed runtime are fixed
when its backend starts): tests/train/distributed_fit.py, started by ``python -m
funcnet.launch`` on a free port, with timeouts.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from funcnet import launch

SCRIPT = Path(__file__).with_name("distributed_fit.py")
ROOT = SCRIPT.parents[2]


def _flat(leaves):
    return np.concatenate([np.ravel(np.asarray(leaf, np.float32)) for leaf in leaves])


def _run(command, env, timeout=240):
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done


def _start_both(folder: Path):
    """The JSON each process wrote: {"one": [process 0], "two": [process 0, process 1]}."""
    one, two = folder / "one", folder / "two"
    one.mkdir(), two.mkdir()
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    _run([sys.executable, "-m", "funcnet.launch", "--processes", "2",
          "--devices-per-process", "2", "--timeout", "200", str(SCRIPT), str(two)], env)
    _run([sys.executable, str(SCRIPT), str(one)],
         dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=4"))
    load = lambda folder, i: json.loads((folder / f"process_{i}.json").read_text())
    return {"one": [load(one, 0)], "two": [load(two, 0), load(two, 1)], "folder": two}


def test_two_processes_train_as_one_process_on_as_many_devices(tmp_path):
    # one test for both runs (about 30 s): pytest-xdist would run a shared fixture once
    # per worker
    runs = _start_both(tmp_path)
    _same_numbers_everywhere(runs)
    _split_weights_checkpointed_whole(runs)
    _one_writer_every_process_resumes_bit_identically(runs)
    _refused_on_every_process(runs)


def _same_numbers_everywhere(runs):
    (single,), (first, second) = runs["one"], runs["two"]
    assert (single["processes"], single["devices"]) == (1, 4)
    assert (first["processes"], first["devices"]) == (2, 4)
    for key in ("full_loss", "full_eval", "full_params", "resumed_params", "split_loss"):
        assert first[key] == second[key], key  # every process ends with the same numbers
    assert first["full_loss"] == pytest.approx(single["full_loss"], rel=1e-5, abs=1e-6)
    assert first["full_eval"] == pytest.approx(single["full_eval"], rel=1e-5, abs=1e-6)
    assert first["split_loss"] == pytest.approx(single["split_loss"], rel=1e-5, abs=1e-6)
    np.testing.assert_allclose(_flat(first["full_params"]), _flat(single["full_params"]),
                               rtol=1e-4, atol=1e-6)


def _split_weights_checkpointed_whole(runs):
    for process in runs["two"]:
        assert process["split_w_spec"] == "P(None, 'model')"
        assert process["split_w_shard"] == [12, 16]  # half of dense(32)'s columns per device
        assert process["split_restored_equal"]  # written whole, read back into the split


def _one_writer_every_process_resumes_bit_identically(runs):
    first, second = runs["two"]
    # (c.npz: the attempt in a missing folder, which only process 0 made)
    assert first["writes"] == ["full.npz"] * 4 + ["resumed.npz"] * 4 + ["split.npz"] * 2 + ["c.npz"]
    assert second["writes"] == []
    for process in runs["two"]:
        assert process["resumed_epochs"] == [2, 3]
        assert process["resumed_loss"] == process["full_loss"][-6:]
        assert process["resumed_params"] == process["full_params"]  # bit for bit
    leftovers = {p.name for p in runs["folder"].iterdir()}
    assert leftovers == {"full.npz", "resumed.npz", "split.npz", "process_0.json",
                         "process_1.json"}  # no temporary files, nothing refused written


def _refused_on_every_process(runs):
    first, second = (process["refused"] for process in runs["two"])
    for refused in (first, second):
        assert "x differs on process(es) [1] from process 0" in refused["x"]
        assert "the same full training set" in refused["x"]
        assert "this run has 2 processes" in refused["no mesh"]
        assert "holds no device of process(es) [" in refused["local mesh"]
    assert "does not exist; create it first" in first["unwritable"]  # the writer's reason
    assert "could not be written by process 0" in second["unwritable"]


# ------------------------------------------------------------------------ the launcher


def test_each_process_gets_its_coordinates_and_devices():
    base = {"XLA_FLAGS": "--xla_cpu_foo=1 --xla_force_host_platform_device_count=8",
            "PATH": "/bin"}
    env = launch.process_environment(base, 1, 3, 2, 4567)
    assert env[launch.COORDINATOR] == "127.0.0.1:4567"
    assert (env[launch.NUM_PROCESSES], env[launch.PROCESS_ID]) == ("3", "1")
    assert env["XLA_FLAGS"] == "--xla_cpu_foo=1 --xla_force_host_platform_device_count=2"
    assert env["JAX_LOCAL_DEVICE_IDS"] == "2,3"
    assert env["PATH"] == "/bin"
    assert base["XLA_FLAGS"].endswith("=8")  # the caller's dict is not modified


def _script(tmp_path, body: str) -> str:
    path = tmp_path / "script.py"
    path.write_text(textwrap.dedent(body))
    return str(path)


def test_a_failing_process_stops_the_others_and_its_status_is_returned(tmp_path):
    script = _script(tmp_path, """
        import os, sys, time
        index = int(os.environ["FUNCNET_PROCESS_ID"])
        print("started", os.environ["FUNCNET_NUM_PROCESSES"], flush=True)
        if index == 1:
            sys.exit(3)
        time.sleep(120)
        """)
    out, start = io.StringIO(), time.monotonic()
    status = launch.launch(script, processes=2, out=out)
    assert status == 3
    assert time.monotonic() - start < 60  # the sleeper was stopped, not waited for
    lines = out.getvalue().splitlines()
    assert "[0] started 2" in lines and "[1] started 2" in lines
    assert "process 1 exited with status 3; stopping the others" in out.getvalue()


def test_a_timeout_stops_every_process(tmp_path):
    script = _script(tmp_path, "import time\ntime.sleep(120)\n")
    out, start = io.StringIO(), time.monotonic()
    assert launch.launch(script, processes=2, timeout=1.0, out=out) == 124
    assert time.monotonic() - start < 60
    assert "timed out after 1.0 s" in out.getvalue()


def test_success_passes_the_arguments_to_every_process(tmp_path):
    script = _script(tmp_path, "import sys, os\nprint(os.environ['FUNCNET_PROCESS_ID'], "
                               "sys.argv[1:])\n")
    out = io.StringIO()
    assert launch.launch(script, ["a", "--b"], processes=2, out=out) == 0
    assert sorted(out.getvalue().splitlines()) == ["[0] 0 ['a', '--b']", "[1] 1 ['a', '--b']"]


def test_the_command_line_refuses_a_missing_script_and_bad_counts(tmp_path):
    for argv in (["--processes", "2", str(tmp_path / "missing.py")],
                 ["--processes", "0", _script(tmp_path, "")]):
        with pytest.raises(SystemExit) as exit_info:
            launch.main(argv)
        assert exit_info.value.code == 2
