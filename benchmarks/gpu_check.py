"""funcnet on an accelerator: the core tests and the benchmarks, one report.

On a machine with a GPU (or another accelerator JAX supports):

    pip install -e ".[dev,bench]"
    pip install -U "jax[cuda12]"            # JAX's CUDA plugin: the PyPI jax alone is CPU-only
    python benchmarks/gpu_check.py          # the core tests, then the benchmarks at full size
    python benchmarks/gpu_check.py --quick  # a few test files, the benchmarks at toy sizes
    python benchmarks/gpu_check.py --timeout 900 --benchmarks repeat_depth curvature

In order, each stage a progress line on stdout:

1. the environment, probed in a short subprocess (this process never starts a JAX backend,
   so it holds no accelerator memory while the stages run): Python, jax and jaxlib,
   ``jax.default_backend()``, ``jax.devices()`` (kind and count), JAX's own environment
   report (with nvidia-smi's where there is one) and the JAX_, XLA_ and CUDA_ variables.
   Without an accelerator the script refuses (exit status 3), having written only the
   report, unless ``--allow-cpu`` is given (to try the script at toy size on a CPU);
2. the core correctness tests (``--tests``; by default the backward walk, forward mode,
   Jacobians, extensions and curvature in tests/ad, the layers in tests/nn, training,
   DP-SGD and the losses), ``python -m pytest -q -p no:cacheprovider -x`` in a subprocess
   with this interpreter; the counts come from its JUnit XML;
3. the benchmarks (``--benchmarks``; by default peers, extensions, repeat_depth and
   curvature), each ``python benchmarks/NAME.py --results FOLDER/NAME [--quick]`` in a
   subprocess; the JSON each writes (``FOLDER/NAME/NAME.json``) is embedded in the report.
   Targets not met do not fail the check (the targets were set on a CPU); a benchmark that
   exits nonzero, times out or writes no JSON does. Peers that are not installed (the
   ``bench`` extra) are reported absent by the benchmarks themselves.

Written to FOLDER (default results/gpu_check): ``gpu_check.json`` (the environment, the
test counts, each benchmark's exit status, time and JSON) and ``gpu_check.md`` (a readable
summary), rewritten after every stage, so an interrupted run leaves a partial report whose
``stage`` says what was running; ``tests.junit.xml``; the stdout and stderr of every
subprocess as ``LABEL.stdout.log`` and ``LABEL.stderr.log``; each benchmark's own files in
``FOLDER/NAME/``. Exit status: 0 when every test passed and every benchmark ran, 1 when
not, 3 when refused, 130 when interrupted.

Nothing here assumes the CPU: JAX_PLATFORMS and the other variables are passed on as they
are, no CPU-only option (such as the benchmarks' ``--threads``, PyTorch's CPU threads) is
given, and a subprocess past ``--timeout`` is killed with its process group. (The PyTorch
peers inside the benchmarks run on the CPU; see each benchmark's docstring.) On recent
NVIDIA GPUs JAX computes float32 matmuls and convolutions in TF32 by default; where a
float32 check fails, a rerun with ``JAX_DEFAULT_MATMUL_PRECISION=highest`` tells whether
that is why.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE_TESTS = ("tests/ad", "tests/nn", "tests/train/test_fit.py", "tests/train/test_privacy.py",
              "tests/test_losses.py")
QUICK_TESTS = ("tests/ad/test_walk.py", "tests/ad/test_dtypes.py", "tests/train/test_fit.py")
BENCHMARKS = ("peers", "extensions", "repeat_depth", "curvature", "epoch", "eager",
              "jacobian_accumulation", "remat_memory", "latency")
DEFAULT_BENCHMARKS = ("peers", "extensions", "repeat_depth", "curvature")
DEFAULT_TIMEOUT_S = 3600
PROBE_TIMEOUT_S = 300
TAIL_LINES = 60
NO_ACCELERATOR = 3
INTERRUPTED = 130

PROBE = """
import json, jax, jaxlib
devices = jax.devices()
print(json.dumps({
    "jax": jax.__version__, "jaxlib": jaxlib.__version__, "backend": jax.default_backend(),
    "devices": [{"id": d.id, "platform": d.platform, "kind": d.device_kind} for d in devices],
    "jax_info": jax.print_environment_info(return_string=True)}))
"""


def progress(message: str) -> None:
    """One progress line on stdout."""
    print(f"[gpu_check] {message}", flush=True)


# --- subprocesses ---------------------------------------------------------------------------


def run_logged(command, label: str, folder: Path, timeout: float) -> dict:
    """Runs ``command`` from the repository root, its stdout and stderr into
    ``folder/label.stdout.log`` and ``folder/label.stderr.log``; past ``timeout`` seconds
    it is killed with its process group (a pytest's or a benchmark's own subprocesses too).

    Returns the command, its exit status (``rc``; negative: killed by that signal), the
    wall seconds, whether it timed out and the two log paths."""
    logs = {stream: folder / f"{label}.{stream}.log" for stream in ("stdout", "stderr")}
    with open(logs["stdout"], "w") as out, open(logs["stderr"], "w") as err:
        start = time.perf_counter()
        process = subprocess.Popen(command, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out,
                                   stderr=err, start_new_session=True)
        timed_out = False
        try:
            rc = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            kill_group(process)
            rc = process.wait()
        except BaseException:  # interrupted: its own session does not get the Ctrl-C
            kill_group(process)
            process.wait()
            raise
    return {"command": [str(part) for part in command], "rc": rc,
            "seconds": time.perf_counter() - start, "timed_out": timed_out,
            "stdout_log": str(logs["stdout"]), "stderr_log": str(logs["stderr"])}


def kill_group(process: subprocess.Popen) -> None:
    """SIGKILL to the process group of ``process`` (started in a session of its own)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:  # already gone
        pass


def tail(path, lines: int = TAIL_LINES) -> str:
    """The last ``lines`` lines of a text file ('' when it is missing)."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def failure_tails(run: dict) -> dict:
    """The tails of a failed run's stdout and stderr, to read in the report."""
    return {"stdout_tail": tail(run["stdout_log"]), "stderr_tail": tail(run["stderr_log"])}


# --- stage 1: the environment ---------------------------------------------------------------


def probe_environment() -> dict:
    """What JAX finds, from a subprocess (this process never starts a backend, so it holds
    no accelerator memory while the tests and benchmarks run), with this interpreter's and
    machine's details and the JAX_, XLA_ and CUDA_ variables passed on to every stage.
    ``error`` says why when JAX did not start."""
    env = {"python": platform.python_version(), "executable": sys.executable,
           "platform": platform.platform(), "cpu_count": os.cpu_count(),
           "commit": git_describe(),
           "variables": {k: v for k, v in sorted(os.environ.items())
                         if k.startswith(("JAX_", "XLA_", "CUDA_"))}}
    try:
        done = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True,
                              text=True, timeout=PROBE_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return {**env, "error": f"probing JAX took over {PROBE_TIMEOUT_S} s"}
    try:
        found = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):  # it failed before printing its JSON line
        return {**env, "error": f"probing JAX failed (exit status {done.returncode}): "
                                f"{done.stderr.strip()[-2000:]}"}
    kinds = {}
    for device in found["devices"]:
        kinds[device["kind"]] = kinds.get(device["kind"], 0) + 1
    return {**env, **found, "device_count": len(found["devices"]), "device_kinds": kinds,
            "accelerator": found["backend"] != "cpu", "probe_stderr": done.stderr[-2000:]}


def git_describe():
    """``git describe --always --dirty`` of the repository, or None."""
    try:
        done = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT,
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None


def devices_text(env: dict) -> str:
    """'1 x NVIDIA H200' style, from the probed device kinds."""
    return ", ".join(f"{count} x {kind}" for kind, count in env.get("device_kinds", {}).items())


def refusal(env: dict, allow_cpu: bool):
    """Why the check cannot go on (JAX did not start, or no accelerator and no
    ``--allow-cpu``), or None."""
    if "error" in env:
        return f"JAX did not start, so nothing can run: {env['error']}"
    if env["accelerator"] or allow_cpu:
        return None
    forced = env["variables"].get("JAX_PLATFORMS")
    return (f"no accelerator found: JAX's default backend is {env['backend']!r} "
            f"(devices: {devices_text(env)})"
            + (f", and JAX_PLATFORMS={forced!r} is set" if forced else "")
            + ". Install JAX with its GPU plugin (pip install -U \"jax[cuda12]\") on a machine "
              "with a GPU, or pass --allow-cpu to try this script on the CPU (with --quick: "
              "toy sizes). Nothing was run.")


# --- stage 2: the tests ---------------------------------------------------------------------


def run_tests(paths, folder: Path, timeout: float) -> dict:
    """pytest on ``paths`` (relative to the repository root) in a subprocess, stopping at the
    first failure; its counts from the JUnit XML, with the failed tests and the output's
    tail when it did not pass."""
    junit = folder / "tests.junit.xml"
    junit.unlink(missing_ok=True)  # never the counts of an earlier run
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
               f"--junitxml={junit}", *paths]
    run = {"paths": list(paths), "junit": str(junit),
           **run_logged(command, "tests", folder, timeout)}
    run.update(junit_counts(junit))
    run["ok"] = run["rc"] == 0 and not run["timed_out"]
    if not run["ok"]:
        run.update(failure_tails(run))
    return run


def junit_counts(path: Path) -> dict:
    """``counts`` (tests, passed, failed, errors, skipped, summed over the test suites) and
    ``failed_tests`` (their ids) from a pytest JUnit XML file; ``counts`` None when the
    file is missing (pytest killed) or unreadable."""
    try:
        root = ElementTree.parse(path).getroot()
    except (OSError, ElementTree.ParseError):
        return {"counts": None, "failed_tests": []}
    counts = {key: 0 for key in ("tests", "failures", "errors", "skipped")}
    for suite in root.iter("testsuite"):
        for key in counts:
            counts[key] += int(suite.get(key, 0))
    failed = [f"{case.get('classname')}::{case.get('name')}" for case in root.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    return {"counts": {"tests": counts["tests"],
                       "passed": counts["tests"] - counts["failures"] - counts["errors"]
                       - counts["skipped"],
                       "failed": counts["failures"], "errors": counts["errors"],
                       "skipped": counts["skipped"]},
            "failed_tests": failed}


def tests_text(tests: dict) -> str:
    """'N passed, F failed, E errors, S skipped in T s' (or why there are no counts)."""
    counts = tests["counts"]
    what = ("no counts (no JUnit XML)" if counts is None else
            f"{counts['passed']} passed, {counts['failed']} failed, {counts['errors']} errors, "
            f"{counts['skipped']} skipped")
    timed_out = ", TIMED OUT" if tests["timed_out"] else ""
    return f"{what} in {tests['seconds']:.0f} s (exit status {tests['rc']}{timed_out})"


# --- stage 3: the benchmarks ----------------------------------------------------------------


def run_benchmark(name: str, folder: Path, quick: bool, timeout: float) -> dict:
    """``benchmarks/name.py --results folder/name [--quick]`` in a subprocess, with the
    JSON it writes there (``results``, None when it wrote none)."""
    results_folder = folder / name
    results_folder.mkdir(parents=True, exist_ok=True)
    json_path = results_folder / f"{name}.json"
    json_path.unlink(missing_ok=True)  # never the results of an earlier run
    command = [sys.executable, f"benchmarks/{name}.py", "--results", results_folder,
               *(["--quick"] if quick else [])]
    run = {"json": str(json_path), **run_logged(command, name, folder, timeout)}
    try:
        run["results"] = json.loads(json_path.read_text())
    except (OSError, ValueError):
        run["results"] = None
    run["ok"] = run["rc"] == 0 and not run["timed_out"] and run["results"] is not None
    if not run["ok"]:
        run.update(failure_tails(run))
    return run


def targets_met(results) -> str:
    """'met/all' of a benchmark's targets ('' without any)."""
    targets = (results or {}).get("targets") or []
    return f"{sum(bool(t.get('met')) for t in targets)}/{len(targets)}" if targets else ""


def benchmark_text(run: dict) -> str:
    """'exit status 0 in T s, targets met 3/5' (or what went wrong)."""
    text = f"exit status {run['rc']} in {run['seconds']:.0f} s"
    if run["timed_out"]:
        text += ", TIMED OUT"
    if run["results"] is None:
        text += ", no JSON written"
    met = targets_met(run["results"])
    return text + (f", targets met {met}" if met else "")


def not_run_contenders(results: dict):
    """'library (status)' of every contender a benchmark did not run (absent, error)."""
    rows = results.get("rows", []) + (results.get("tiny_rows") or [])
    return sorted({f"{row.get('library', row.get('contender'))} ({row['status']})"
                   for row in rows if isinstance(row, dict) and row.get("status", "ok") != "ok"})


def checks_over_tolerance(results: dict):
    """'config: check = value' of every correctness check of a benchmark (extensions,
    curvature: a relative difference from a reference) at or over its tolerance."""
    tolerance = (results.get("settings") or {}).get("check_tolerance")
    if tolerance is None:
        return []
    return [f"{config['label']}: {name} = {value:.3g}"
            for config in results.get("configs", []) for name, value in config["checks"].items()
            if isinstance(value, float) and math.isfinite(value) and value >= tolerance]


# --- the report -----------------------------------------------------------------------------


def write_atomic(path: Path, text: str) -> None:
    """``text`` to ``path`` through a temporary file beside it and ``os.replace``, so that
    a reader (or an interrupted run) never finds half a report."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def save(report: dict, folder: Path) -> None:
    """``gpu_check.json`` and ``gpu_check.md`` in ``folder``, as the report stands."""
    report["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    write_atomic(folder / "gpu_check.json", json.dumps(report, indent=2, default=str))
    write_atomic(folder / "gpu_check.md", markdown(report))


def markdown(report: dict) -> str:
    """The readable summary of the report."""
    lines = ["# funcnet on an accelerator: tests and benchmarks", "",
             f"Status: **{report['status']}**"
             + (f" (stage: {report['stage']})" if report.get("stage") else "")
             + f"; started {report['started']}, updated {report['updated']}.", "",
             f"Command: `{' '.join(report['argv'])}`", ""]
    lines += environment_lines(report.get("environment"))
    if report.get("refusal"):
        lines += ["## Refused", "", report["refusal"], ""]
    if report.get("tests"):
        lines += tests_lines(report["tests"])
    for name, run in report["benchmarks"].items():
        lines += benchmark_lines(name, run)
    return "\n".join(lines)


def environment_lines(env) -> list:
    """The report's environment section."""
    if env is None:
        return ["## Environment", "", "(not probed yet)", ""]
    lines = ["## Environment", "", "| | |", "|---|---|",
             f"| Python | {env['python']} ({env['executable']}) |",
             f"| platform | {env['platform']}, {env['cpu_count']} CPUs |",
             f"| commit | {env['commit']} |"]
    if "error" in env:
        return lines + ["", f"JAX did not start: {env['error']}", ""]
    variables = ", ".join(f"{k}={v}" for k, v in env["variables"].items()) or "(none set)"
    lines += [f"| jax / jaxlib | {env['jax']} / {env['jaxlib']} |",
              f"| default backend | {env['backend']} |",
              f"| devices | {devices_text(env)} |",
              f"| variables | {variables} |",
              "", "```", env["jax_info"].strip(), "```", ""]
    return lines


def tests_lines(tests: dict) -> list:
    """The report's tests section."""
    lines = ["## Tests", "", f"`pytest -x {' '.join(tests['paths'])}`: {tests_text(tests)}.",
             ""]
    if tests["failed_tests"]:
        lines += ["Failed: " + ", ".join(f"`{t}`" for t in tests["failed_tests"]), ""]
    return lines + ([] if tests["ok"] else output_lines(tests))


def benchmark_lines(name: str, run: dict) -> list:
    """The report's section of one benchmark: how it ended, its targets, what it did not
    run, its own report; the tails of its output when it failed."""
    lines = [f"## Benchmark {name}", "", f"{benchmark_text(run)}.", ""]
    results = run["results"]
    if results is not None:
        if results.get("targets"):
            lines += ["| target | measured | threshold | met |", "|---|---|---|---|"]
            lines += [f"| {t['target']} | {t['measured']:.3g} | {t['threshold']} | "
                      f"{'yes' if t['met'] else '**NO**'} |" for t in results["targets"]]
            lines += [""]
        over = checks_over_tolerance(results)
        if over:
            lines += [f"**Correctness checks over the tolerance "
                      f"({results['settings']['check_tolerance']:g})**: " + "; ".join(over)
                      + ".", ""]
        not_run = not_run_contenders(results)
        if not_run:
            lines += ["Not run: " + ", ".join(not_run) + ".", ""]
        own = Path(run["json"]).with_suffix(".md")
        if own.exists():
            lines += [f"Its full report: {own.parent.name}/{own.name}.", ""]
    return lines + ([] if run["ok"] else output_lines(run))


def output_lines(run: dict) -> list:
    """The tails of a failed run's stdout and stderr, each in a code block."""
    lines = []
    for stream in ("stdout", "stderr"):
        text = run[f"{stream}_tail"].strip()
        if text:
            lines += [f"Its {stream} (last lines):", "", "```", text, "```", ""]
    return lines or ["(It wrote nothing on stdout or stderr.)", ""]


# --- main -----------------------------------------------------------------------------------


def parse_args(argv):
    """The command line; the module docstring is its help's epilog."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=os.path.join("results", "gpu_check"),
                        help="the report's folder (default results/gpu_check)")
    parser.add_argument("--quick", action="store_true",
                        help=f"toy sizes for the benchmarks, and the tests "
                             f"{' '.join(QUICK_TESTS)} (unless --tests says otherwise)")
    parser.add_argument("--tests", nargs="+", metavar="PATH",
                        help=f"pytest paths or node ids, relative to the repository root "
                             f"(default {' '.join(CORE_TESTS)})")
    parser.add_argument("--no-tests", action="store_true", help="run no tests")
    parser.add_argument("--benchmarks", nargs="+", metavar="NAME", choices=BENCHMARKS,
                        default=list(DEFAULT_BENCHMARKS),
                        help=f"which benchmarks (default {' '.join(DEFAULT_BENCHMARKS)}); "
                             f"choices: {', '.join(BENCHMARKS)}")
    parser.add_argument("--no-benchmarks", action="store_true", help="run no benchmark")
    parser.add_argument("--allow-cpu", action="store_true",
                        help="run on the CPU when JAX finds no accelerator (to try the script)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
                        help=f"limit of the test run and of each benchmark, killed past it "
                             f"(default {DEFAULT_TIMEOUT_S})")
    return parser.parse_args(argv)


def failed(report: dict) -> bool:
    """Whether a test failed or a benchmark did not run through."""
    runs = list(report["benchmarks"].values()) + ([report["tests"]] if report.get("tests")
                                                  else [])
    return any(not run["ok"] for run in runs)


def run_stages(args, report: dict, folder: Path) -> int:
    """The tests, then the benchmarks, the report saved after each; the exit status."""
    if not args.no_tests:
        paths = args.tests or (QUICK_TESTS if args.quick else CORE_TESTS)
        report["stage"] = "tests"
        save(report, folder)
        progress(f"tests: pytest -x {' '.join(paths)} (timeout {args.timeout:g} s)")
        report["tests"] = run_tests(paths, folder, args.timeout)
        progress(f"tests: {tests_text(report['tests'])}")
    for name in [] if args.no_benchmarks else args.benchmarks:
        report["stage"] = f"benchmark {name}"
        save(report, folder)
        progress(f"benchmark {name}: running (timeout {args.timeout:g} s)")
        report["benchmarks"][name] = run_benchmark(name, folder, args.quick, args.timeout)
        progress(f"benchmark {name}: {benchmark_text(report['benchmarks'][name])}")
    report["stage"] = None
    report["status"] = "failed" if failed(report) else "passed"
    save(report, folder)
    return 1 if report["status"] == "failed" else 0


def terminate(signum, frame):
    """SIGTERM handled as Ctrl-C: the running subprocess (in a session of its own, which
    the signal does not reach) is killed and the partial report written."""
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, terminate)
    folder = Path(args.results).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    arguments = sys.argv[1:] if argv is None else list(argv)
    report = {"script": "gpu_check", "argv": ["benchmarks/gpu_check.py", *arguments],
              "options": vars(args), "status": "running", "stage": "environment",
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "environment": None,
              "tests": None, "benchmarks": {}}
    save(report, folder)
    progress("environment: probing JAX in a subprocess")
    env = report["environment"] = probe_environment()
    if "error" not in env:
        progress(f"environment: jax {env['jax']}, jaxlib {env['jaxlib']}, backend "
                 f"{env['backend']}, devices {devices_text(env)}")
    reason = refusal(env, args.allow_cpu)
    if reason:
        report.update(status="refused", stage=None, refusal=reason)
        save(report, folder)
        print(f"gpu_check: {reason}", file=sys.stderr)
        return NO_ACCELERATOR
    try:
        status = run_stages(args, report, folder)
    except KeyboardInterrupt:
        report["status"] = "interrupted"
        save(report, folder)
        progress(f"interrupted during {report['stage']}; partial report in {folder}")
        return INTERRUPTED
    progress(f"{report['status']}: wrote {folder / 'gpu_check.json'} and gpu_check.md")
    return status


if __name__ == "__main__":
    sys.exit(main())
