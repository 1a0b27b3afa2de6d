"""Start N processes of one script on this machine, wired for ``jax.distributed``.

    python -m funcnet.launch --processes 2 [--devices-per-process 2] script.py [args ...]

runs ``python script.py args ...`` N times at once, process i with

- ``FUNCNET_COORDINATOR_ADDRESS=127.0.0.1:<a free port>``, ``FUNCNET_NUM_PROCESSES=N``,
  ``FUNCNET_PROCESS_ID=i``, which :func:`initialize` hands to
  ``jax.distributed.initialize``;
- K devices (``--devices-per-process K``, default 1): K host CPU devices
  (``--xla_force_host_platform_device_count=K`` in ``XLA_FLAGS``) and, for a machine with
  GPUs, ``JAX_LOCAL_DEVICE_IDS`` = GPUs i K .. (i + 1) K - 1, which JAX reads.

Every line a process prints comes out prefixed ``[i]``. When a process fails, the others
are stopped (they would wait for it forever in their next collective) and the launcher
exits with its exit status; ``--timeout`` stops them all after that many seconds (exit
status 124). The script itself calls :func:`initialize` before any other JAX call; on a
cluster, where the launcher is not used, the same call lets JAX detect the cluster itself
(SLURM, Open MPI, Kubernetes, Cloud TPU: see ``jax.distributed.initialize``).

This is for trying the multi-process path on one machine: the processes talk over
loopback (CPU collectives by gloo, JAX's default), so it shows correctness and overheads,
not a speed-up on one machine's cores.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import jax

COORDINATOR = "FUNCNET_COORDINATOR_ADDRESS"
NUM_PROCESSES = "FUNCNET_NUM_PROCESSES"
PROCESS_ID = "FUNCNET_PROCESS_ID"
#: Seconds a stopped process gets between SIGTERM and SIGKILL.
GRACE_SECONDS = 5.0
_HOST_DEVICES = re.compile(r"--xla_force_host_platform_device_count=\S*")


def initialize(timeout_seconds: int = 300) -> None:
    """``jax.distributed.initialize`` for this process; call it once, first.

    Started by ``python -m funcnet.launch``: joins the launcher's other processes (from
    the ``FUNCNET_*`` variables it sets). Anywhere else: ``jax.distributed.initialize()``
    with JAX's own detection of the cluster (SLURM, Open MPI, Kubernetes, Cloud TPU), or
    its ``JAX_COORDINATOR_ADDRESS``. Waits at most ``timeout_seconds`` for the others.
    """
    if COORDINATOR in os.environ:
        jax.distributed.initialize(os.environ[COORDINATOR],
                                   num_processes=int(os.environ[NUM_PROCESSES]),
                                   process_id=int(os.environ[PROCESS_ID]),
                                   initialization_timeout=timeout_seconds)
    else:
        jax.distributed.initialize(initialization_timeout=timeout_seconds)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def process_environment(base: Dict[str, str], index: int, processes: int, devices: int,
                        port: int) -> Dict[str, str]:
    """The environment of process ``index`` of ``processes`` (see the module docstring);
    ``base`` is not modified. A host-device count already in ``XLA_FLAGS`` is replaced."""
    flags = _HOST_DEVICES.sub("", base.get("XLA_FLAGS", "")).split()
    flags.append(f"--xla_force_host_platform_device_count={devices}")
    return dict(base, **{
        COORDINATOR: f"127.0.0.1:{port}", NUM_PROCESSES: str(processes),
        PROCESS_ID: str(index), "XLA_FLAGS": " ".join(flags),
        "JAX_LOCAL_DEVICE_IDS": ",".join(str(index * devices + d) for d in range(devices)),
        "PYTHONUNBUFFERED": "1"})


def launch(script: str, args: Sequence[str] = (), *, processes: int,
           devices_per_process: int = 1, timeout: Optional[float] = None,
           port: Optional[int] = None, out=None) -> int:
    """Runs ``script`` with ``args`` in ``processes`` processes; returns the exit status
    (0 when all succeeded, else the first failure's, 124 on timeout). Output lines go to
    ``out`` (default stdout) prefixed with the process index."""
    if processes < 1 or devices_per_process < 1:
        raise ValueError(f"processes and devices_per_process must be at least 1, got "
                         f"{processes} and {devices_per_process}")
    if not Path(script).is_file():
        raise FileNotFoundError(f"no script at {script}")
    out = sys.stdout if out is None else out
    port = free_port() if port is None else port
    lock = threading.Lock()
    children: List[subprocess.Popen] = []
    relays: List[threading.Thread] = []
    try:
        for index in range(processes):
            child = subprocess.Popen(
                [sys.executable, script, *args], stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, text=True, start_new_session=True,
                env=process_environment(dict(os.environ), index, processes,
                                        devices_per_process, port))
            children.append(child)
            relay = threading.Thread(target=_relay, args=(child, index, out, lock), daemon=True)
            relay.start()
            relays.append(relay)
        status = _wait(children, timeout, out, lock)
    finally:
        _stop(children)
        for relay in relays:
            relay.join(timeout=GRACE_SECONDS)
    return status


def _relay(child: subprocess.Popen, index: int, out, lock: threading.Lock) -> None:
    for line in child.stdout:
        with lock:
            out.write(f"[{index}] {line}")
            out.flush()


def _wait(children: List[subprocess.Popen], timeout: Optional[float], out,
          lock: threading.Lock) -> int:
    """Waits for every child; the first failure's status (the others are stopped by the
    caller), or 124 once ``timeout`` seconds have passed."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        codes = [child.poll() for child in children]
        failed = [(index, code) for index, code in enumerate(codes) if code not in (None, 0)]
        if failed:
            index, code = failed[0]
            with lock:
                out.write(f"funcnet.launch: process {index} exited with status {code}; "
                          f"stopping the others\n")
            return code
        if all(code == 0 for code in codes):
            return 0
        if deadline is not None and time.monotonic() > deadline:
            with lock:
                out.write(f"funcnet.launch: timed out after {timeout} s; stopping every "
                          f"process\n")
            return 124
        time.sleep(0.05)


def _stop(children: List[subprocess.Popen]) -> None:
    """SIGTERM to every child still running (its whole process group), SIGKILL to any
    still there after :data:`GRACE_SECONDS`."""
    running = [child for child in children if child.poll() is None]
    for child in running:
        _signal_group(child, signal.SIGTERM)
    deadline = time.monotonic() + GRACE_SECONDS
    for child in running:
        try:
            child.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal_group(child, signal.SIGKILL)
            child.wait()


def _signal_group(child: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(child.pid, sig)
    except ProcessLookupError:
        pass


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m funcnet.launch",
        description="Start N processes of a script on this machine for jax.distributed "
                    "(the script calls funcnet.launch.initialize() first).")
    parser.add_argument("--processes", type=int, required=True, help="how many processes")
    parser.add_argument("--devices-per-process", type=int, default=1,
                        help="host CPU devices (or GPUs) per process (default 1)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="stop every process after this many seconds (exit status 124)")
    parser.add_argument("--port", type=int, default=None,
                        help="the coordinator's port (default: a free one)")
    parser.add_argument("script", help="the Python script every process runs")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the script's arguments")
    options = parser.parse_args(argv)
    try:  # (launch checks the counts and the script before it starts anything)
        return launch(options.script, options.args, processes=options.processes,
                      devices_per_process=options.devices_per_process,
                      timeout=options.timeout, port=options.port)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))


if __name__ == "__main__":
    sys.exit(main())
