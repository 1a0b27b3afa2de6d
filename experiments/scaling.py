"""Scaling: data-parallel training throughput (examples per second of the train step)
against the number of devices, on one process and on two.

Strong scaling: one fixed GLOBAL batch (``--batch``, default 512) for every
configuration, split over the devices, so each device's share shrinks as devices are
added; ideal strong scaling would make the step that many times faster. The workload is
an MLP on scikit-learn's digits (``fnet.data.load_digits``: 64 -> 512 -> 512 -> 10,
relu, softmax cross-entropy, Adam 1e-3), the step is ``fnet.train_step(net, loss, opt,
mesh)`` on ``fnet.data_parallel_mesh()`` over every device, the state replicated with
``fnet.state_shardings``, every batch placed split over the mesh by
``fnet.global_batch`` (each process holds the full data, as fit's
processes do).

Configurations, each a fresh subprocess of this script in worker mode (``--worker``),
since a JAX process's devices are fixed when its backend starts:

- 1 process with K host CPU devices, K in ``--devices`` (default 1 2 4 8):
  ``XLA_FLAGS=--xla_force_host_platform_device_count=K``;
- 2 processes with K devices each, K in ``--processes-devices`` (default 1 2, i.e. 2 and
  4 devices in all): ``python -m funcnet.launch --processes 2 --devices-per-process K``,
  the processes joined by ``jax.distributed`` over loopback.

``JAX_PLATFORMS`` is left as it is: the host-device flag only affects the CPU platform,
so on a machine whose default backend is a GPU the single-process workers see the GPUs
instead, and the run fails with a message saying so (run it with ``JAX_PLATFORMS=cpu``).

Every worker places a few distinct batches on its devices before timing (so the times
are the step's, not the host-to-device copies), runs ``--warmup`` steps (the first one
compiles), then ``--rounds`` rounds of ``--steps`` steps, waiting for the state at the
end of each round. Reported: the median round's examples/s, the min and max over rounds,
the step time, how many cores the worker kept busy (its process CPU time over the wall
time of the timed rounds; with 2 processes, process 0's alone), and the compiled step's FLOPs per device (XLA's cost
analysis of the partitioned program). With 2 processes every process measures and
process 0 reports. Every configuration runs the same steps from the same initialisation
on the same batches, so the loss of the last step must agree with the 1-device run's to
float32 rounding (the batch mean is summed in a different order); the relative
difference is reported as a check that all configurations trained the same thing.

What to expect here: "host devices" are not hardware. On a 2-core machine 8 host devices
share the same 2 cores, so more devices cannot go faster than about 2x, and they will
likely go slower: each device runs a smaller product, and the step adds partitioning and
an all-reduce of the gradients (between processes: gloo over loopback TCP). The
``cpu_busy_cores`` column shows how many cores a configuration actually kept busy (on the
machine this was written on, one device's step ran on about one core, several devices on
up to two). The experiment shows that the multi-process path runs, trains the same
numbers, and what it costs; it is not a measurement of a GPU or cluster speed-up. Other
work on the machine disturbs the times: the load averages before and after the run (and
before each configuration) are recorded.

The loss check compares the last step's loss, after every warm-up and timed step. The
net fits the training part closely within those steps, so that loss is small (about
1e-3 at the default sizes) and float32 differences that Adam carries from step to step
show as a relative difference of up to about 1e-4; the absolute difference is recorded
too.

Writes ``results.json`` (every number, the machine, the note above) and ``scaling.png``
(throughput and speed-up against the total device count) to the results folder and
prints a Markdown table.

    python experiments/scaling.py --help
    python experiments/scaling.py --quick        # toy size: 1 and 2 devices, 2 x 1 devices
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import jax
import numpy as np
import optax
from tqdm.auto import tqdm

import funcnet as fnet
import funcnet.launch
from _common import mlp, pyplot, results_dir, save_figure, table, write_json
from funcnet.train._parallel import check_divisible

LEARNING_RATE = 1e-3
#: Distinct batches placed on the devices before timing; the steps cycle through them.
PLACED_BATCHES = 4
#: Lines of a failed worker's output quoted in the error.
TAIL_LINES = 40
#: Seconds the parent waits for the launcher beyond its own --timeout (it stops its
#: processes first).
LAUNCHER_GRACE = 30
_HOST_DEVICES = re.compile(r"--xla_force_host_platform_device_count=\S*")
COLUMNS = ["processes", "devices_per_process", "devices", "examples_per_second",
           "examples_per_second_min", "examples_per_second_max", "step_ms", "speedup",
           "cpu_busy_cores", "gflops_per_device", "loss", "loss_relative_difference"]


class WorkerFailed(RuntimeError):
    """A configuration's subprocess failed, timed out, or measured something else than
    asked; the message quotes the end of its output."""


# --- worker: one configuration, in this process (and its launcher siblings) ---------------

def placed_batches(mesh, data, batch: int, seed: int) -> List[Tuple[jax.Array, jax.Array]]:
    """:data:`PLACED_BATCHES` seeded random batches of the training part (without
    replacement within a batch where it has enough examples), split over the mesh."""
    rng = np.random.default_rng(seed)
    n = data.x_train.shape[0]
    batches = []
    for _ in range(PLACED_BATCHES):
        rows = rng.choice(n, size=batch, replace=batch > n)
        batches.append(fnet.global_batch(mesh, (data.x_train[rows], data.y_train[rows])))
    return batches


def flops_per_device(step, state, x, y) -> Optional[float]:
    """XLA's FLOP count of the compiled, partitioned step: the work of one device. The
    compilation is the one the first step then reuses."""
    cost = step.lower(state, x, y, None).compile().cost_analysis()
    return (cost or {}).get("flops")


def measure(args) -> Dict:
    """Builds the workload on a mesh over every device, warms up, times ``args.rounds``
    rounds of ``args.steps`` steps; returns the measurement (every process does this)."""
    mesh = fnet.data_parallel_mesh()
    check_divisible(mesh, args.batch)
    data = fnet.data.load_digits(seed=args.seed)
    net = mlp(args.hidden)
    params, _ = net.init(jax.random.key(args.seed), data.in_shape)
    optimizer = optax.adam(LEARNING_RATE)
    state = fnet.init_train_state(params, optimizer)
    state = jax.device_put(state, fnet.state_shardings(net, state, mesh))
    step = fnet.train_step(net, fnet.losses.softmax_cross_entropy, optimizer, mesh)
    batches = placed_batches(mesh, data, args.batch, args.seed)
    jax.block_until_ready(batches)

    start = time.perf_counter()
    flops = flops_per_device(step, state, *batches[0])
    values = []
    for i in range(args.warmup):
        state, value = step(state, *batches[i % PLACED_BATCHES])
        values.append(value)
    jax.block_until_ready((state, values))
    setup_seconds = time.perf_counter() - start

    seconds = []
    cpu_start, wall_start = time.process_time(), time.perf_counter()
    for round_ in range(args.rounds):
        round_start = time.perf_counter()
        for i in range(args.steps):
            batch = batches[(args.warmup + round_ * args.steps + i) % PLACED_BATCHES]
            state, value = step(state, *batch)
        jax.block_until_ready((state, value))
        seconds.append(time.perf_counter() - round_start)
    cpu_busy = (time.process_time() - cpu_start) / (time.perf_counter() - wall_start)

    throughput = [args.steps * args.batch / s for s in seconds]
    return {
        "processes": jax.process_count(), "devices_per_process": jax.local_device_count(),
        "devices": jax.device_count(), "platform": jax.default_backend(),
        "round_seconds": seconds, "examples_per_second_rounds": throughput,
        "examples_per_second": float(np.median(throughput)),
        "examples_per_second_min": min(throughput), "examples_per_second_max": max(throughput),
        "step_ms": float(np.median(seconds)) / args.steps * 1e3,
        "cpu_busy_cores": cpu_busy,
        "flops_per_device": flops,
        "gflops_per_device": None if flops is None else flops / 1e9,
        "setup_seconds_compile_included": setup_seconds,
        "first_loss": float(np.asarray(values[0])) if values else None,
        "loss": float(np.asarray(value)),
        "steps_total": args.warmup + args.rounds * args.steps,
    }


def worker(args) -> None:
    """Worker mode: joins the launcher's processes if started by it, measures, and
    process 0 writes the measurement to ``args.worker``."""
    if funcnet.launch.COORDINATOR in os.environ:
        funcnet.launch.initialize(timeout_seconds=max(1, math.ceil(args.timeout)))
    result = measure(args)
    if jax.process_index() == 0:
        write_json(Path(args.worker), result)


# --- parent: every configuration in its own subprocess -------------------------------------

def configurations(args) -> List[Tuple[int, int]]:
    """(processes, devices per process) of every run, single-process ones first."""
    return [(1, k) for k in args.devices] + [(2, k) for k in args.processes_devices]


def worker_arguments(args, path: Path) -> List[str]:
    """This script's command-line arguments for one worker writing to ``path``."""
    return [str(Path(__file__).resolve()), "--worker", str(path), "--batch", str(args.batch),
            "--steps", str(args.steps), "--rounds", str(args.rounds),
            "--warmup", str(args.warmup), "--seed", str(args.seed),
            "--timeout", str(args.timeout), "--hidden", *map(str, args.hidden)]


def host_devices_environment(devices: int) -> Dict[str, str]:
    """This process's environment with ``devices`` host CPU devices in ``XLA_FLAGS`` (a
    count already there replaced); nothing else changed."""
    flags = _HOST_DEVICES.sub("", os.environ.get("XLA_FLAGS", "")).split()
    flags.append(f"--xla_force_host_platform_device_count={devices}")
    return dict(os.environ, XLA_FLAGS=" ".join(flags))


def as_text(output) -> str:
    """A subprocess's captured output as text (a timeout's may be bytes, or None)."""
    if isinstance(output, bytes):
        return output.decode(errors="replace")
    return output or ""


def tail(text: str, lines: int = TAIL_LINES) -> str:
    """The last ``lines`` lines of ``text``."""
    return "\n".join(text.strip().splitlines()[-lines:])


def run_configuration(args, processes: int, per_process: int, folder: Path) -> Dict:
    """Runs one configuration's worker(s) as a subprocess and returns process 0's
    measurement; raises :class:`WorkerFailed` (with the end of their output) when they
    fail, time out, or see another number of devices than asked."""
    path = folder / f"worker_{processes}x{per_process}.json"
    if processes == 1:
        command = [sys.executable, *worker_arguments(args, path)]
        env, timeout = host_devices_environment(per_process), args.timeout
    else:
        command = [sys.executable, "-m", "funcnet.launch", "--processes", str(processes),
                   "--devices-per-process", str(per_process), "--timeout", str(args.timeout),
                   *worker_arguments(args, path)]
        env, timeout = dict(os.environ), args.timeout + LAUNCHER_GRACE
    name = f"{processes} process(es) x {per_process} device(s)"
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as error:
        raise WorkerFailed(f"{name}: timed out after {timeout} s (--timeout); its output "
                           f"ended with:\n{tail(as_text(error.stdout) + as_text(error.stderr))}"
                           ) from None
    if done.returncode != 0:
        raise WorkerFailed(f"{name}: exited with status {done.returncode}; command "
                           f"{' '.join(command)}\nits output ended with:\n"
                           f"{tail(done.stdout + done.stderr)}")
    result = json.loads(path.read_text())
    if result["devices"] != processes * per_process:
        raise WorkerFailed(
            f"{name}: the worker saw {result['devices']} {result['platform']} device(s), not "
            f"{processes * per_process}; the device counts here are host CPU devices "
            f"(XLA's --xla_force_host_platform_device_count): run with JAX_PLATFORMS=cpu.")
    return result


def compare(rows: List[Dict]) -> None:
    """Adds every row's speed-up and relative loss difference against the first row
    (1 process, 1 device)."""
    reference = rows[0]
    for row in rows:
        row["speedup"] = row["examples_per_second"] / reference["examples_per_second"]
        row["loss_absolute_difference"] = abs(row["loss"] - reference["loss"])
        row["loss_relative_difference"] = row["loss_absolute_difference"] / abs(reference["loss"])


def note(cores: int) -> str:
    """The honest reading of the numbers, for results.json and the printout."""
    return (f"Strong scaling on one machine with {cores} CPU core(s): K host devices are K "
            f"XLA CPU devices sharing the same {cores} core(s), so more devices cannot go "
            f"faster than about {cores}x and will likely go slower (smaller products per "
            f"device, partitioning, an all-reduce of the gradients; between processes gloo "
            f"over loopback TCP); cpu_busy_cores says how many cores each configuration kept "
            f"busy. This shows that the multi-process path runs, trains the same numbers, and "
            f"what it costs; it is not a GPU or cluster speed-up.")


def parse_arguments(argv: Optional[Sequence[str]] = None):
    """The parsed command line, ``--quick`` applied and checked (worker mode: as given)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8],
                        help="host devices of the single-process runs; must include 1, the "
                             "reference (default 1 2 4 8)")
    parser.add_argument("--processes-devices", type=int, nargs="*", default=[1, 2],
                        help="devices per process of the 2-process runs (default 1 2); "
                             "give no values to skip them")
    parser.add_argument("--batch", type=int, default=512,
                        help="the global batch of every configuration (strong scaling); a "
                             "multiple of every total device count")
    parser.add_argument("--steps", type=int, default=20, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=7,
                        help="timed rounds (the median round is reported)")
    parser.add_argument("--warmup", type=int, default=5,
                        help="untimed steps first (the first compiles)")
    parser.add_argument("--hidden", type=int, nargs="+", default=[512, 512],
                        help="the MLP's hidden widths")
    parser.add_argument("--seed", type=int, default=0,
                        help="PRNG seed (data split, init, batches)")
    parser.add_argument("--results", default="results/scaling", help="results folder")
    parser.add_argument("--timeout", type=float, default=300,
                        help="seconds each configuration's subprocess may take")
    parser.add_argument("--quick", action="store_true",
                        help="toy size for the test suite, overriding the sizes above: devices "
                             "1 2, 2 processes x 1 device, batch 64, 3 rounds of 5 steps, "
                             "hidden 32")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--worker", metavar="PATH", default=None,
                        help="internal: measure one configuration in this process (the "
                             "devices it was started with) and write the result to PATH")
    args = parser.parse_args(argv)
    if args.worker is not None:
        return args
    if args.quick:
        args.devices, args.processes_devices = [1, 2], [1]
        args.batch, args.steps, args.rounds, args.warmup, args.hidden = 64, 5, 3, 2, [32]
    if 1 not in args.devices:
        parser.error("--devices must include 1: the 1-device run is the reference of the "
                     "speed-up and of the loss check")
    if min(args.devices + args.processes_devices) < 1:
        parser.error("device counts must be at least 1")
    if min(args.steps, args.rounds, args.batch) < 1 or args.warmup < 0:
        parser.error("--steps, --rounds and --batch must be at least 1, --warmup at least 0")
    totals = sorted(set(args.devices) | {2 * k for k in args.processes_devices})
    uneven = [d for d in totals if args.batch % d]
    if uneven:
        parser.error(f"--batch {args.batch} does not split evenly over {uneven} devices; use a "
                     f"multiple of {int(np.lcm.reduce(totals))}")
    return args


def main(argv: Optional[Sequence[str]] = None):
    args = parse_arguments(argv)
    if args.worker is not None:
        return worker(args)
    folder = results_dir(args.results)
    cores = os.cpu_count()
    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for processes, per_process in tqdm(configurations(args), disable=args.no_progress,
                                           unit="config"):
            load = os.getloadavg()
            result = run_configuration(args, processes, per_process, Path(scratch))
            rows.append(dict(result, load_before=load))
    load_after = os.getloadavg()
    compare(rows)

    results = {
        "experiment": "scaling", "scaling": "strong: the same global batch for every "
                                            "configuration, split over its devices",
        "machine": {"cpu_count": cores, "usable_cpus": len(os.sched_getaffinity(0)),
                    "load_average_before": load_before, "load_average_after": load_after,
                    "jax": jax.__version__, "platform": rows[0]["platform"],
                    "python": sys.version.split()[0]},
        "settings": {"batch": args.batch, "steps_per_round": args.steps,
                     "rounds": args.rounds, "warmup_steps": args.warmup,
                     "hidden": args.hidden, "optimizer": f"adam({LEARNING_RATE})",
                     "loss": "softmax cross-entropy", "data": "scikit-learn digits (train part)",
                     "seed": args.seed, "placed_batches": PLACED_BATCHES},
        "note": note(cores),
        "max_loss_relative_difference": max(r["loss_relative_difference"] for r in rows),
        "configurations": rows,
    }
    write_json(folder / "results.json", results)
    save_figure(plot(rows, cores), folder / "scaling.png")
    print(table(rows, COLUMNS))
    print(f"\nload average before {load_before}, after {load_after} ({cores} cores); "
          f"max relative loss difference to 1 device "
          f"{results['max_loss_relative_difference']:.2e}")
    print(note(cores))
    print(f"\nwrote {folder / 'results.json'} and {folder / 'scaling.png'}")
    return results


def plot(rows: List[Dict], cores: int):
    """Examples/s and speed-up against the total device count: a line for 1 process,
    markers for 2 processes, bars from the slowest to the fastest round."""
    plt = pyplot()
    from matplotlib.ticker import FuncFormatter

    figure, (speed_axis, speedup_axis) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {1: ("tab:blue", "o-", "1 process"), 2: ("tab:orange", "s", "2 processes")}
    for processes, (color, style, label) in styles.items():
        mine = [r for r in rows if r["processes"] == processes]
        if not mine:
            continue
        devices = [r["devices"] for r in mine]
        median = np.array([r["examples_per_second"] for r in mine])
        spread = [median - [r["examples_per_second_min"] for r in mine],
                  [r["examples_per_second_max"] for r in mine] - median]
        speed_axis.errorbar(devices, median, yerr=spread, fmt=style, color=color,
                            capsize=3, markersize=7, label=label)
        speedup_axis.plot(devices, [r["speedup"] for r in mine], style, color=color,
                          markersize=7, label=label)
    ticks = sorted({r["devices"] for r in rows})
    speedup_axis.plot(ticks, ticks, "k--", linewidth=1, label="ideal")
    speedup_axis.axhline(cores, color="gray", linestyle=":", label=f"{cores} cores")
    speed_axis.set_ylim(bottom=0)
    speed_axis.set_ylabel("examples / s (median round; bars: min-max)")
    speed_axis.set_title("train-step throughput (one fixed global batch)")
    speedup_axis.set_yscale("log", base=2)
    speedup_axis.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    speedup_axis.set_ylabel("speed-up over 1 device (log scale)")
    speedup_axis.set_title("strong-scaling speed-up")
    for axis in (speed_axis, speedup_axis):
        axis.set_xscale("log", base=2)
        axis.set_xticks(ticks, [str(t) for t in ticks])
        axis.set_xlabel("devices in all")
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    return figure


if __name__ == "__main__":
    try:
        main()
    except WorkerFailed as failure:
        print(f"scaling: {failure}", file=sys.stderr)
        sys.exit(1)
