"""Small jobs start fast: a fresh process to a trained digits MLP, funcnet against scikit-learn.

Every run is a fresh Python process (this file in its child mode) that goes from its first
line to a trained MLP on scikit-learn's digits and its test accuracy: imports, the data
(``fnet.data.load_digits``'s split, standardised), init, training, one evaluation. The
network and training are those of the Adam run of the main job, ``experiments/digits.py``:
64 -> 256 -> 256 -> 10 (relu), softmax cross-entropy, Adam(1e-3), batch 64, 30 epochs,
float32. Contenders:

- funcnet, per-step: ``fnet.fit(..., steps_per_call=1, progress=False)``, as the main job;
- funcnet, scanned: the same with ``steps_per_call="epoch"`` (a whole epoch per call);
- each of the two again with JAX's persistent compilation cache on
  (``experiments/_common.py``'s ``enable_compilation_cache``: every program cached, however
  small), in a folder under a temporary directory warmed by one untimed run first, as a
  second run of the same job would find it;
- scikit-learn: ``MLPClassifier`` with the main job's reference-row settings
  (``hidden_layer_sizes=(256, 256), solver="adam", batch_size=64, learning_rate_init=1e-3,
  alpha=0, max_iter=30, tol=0, n_iter_no_change=31``) on the same split, loaded with
  scikit-learn alone (no JAX import), with its BLAS's default threads (as the main job)
  and with one (``OMP_NUM_THREADS=OPENBLAS_NUM_THREADS=MKL_NUM_THREADS=1``); the faster
  of the two medians is scikit-learn's time in the ratios.

Times per run: from the child script's first line to the test accuracy (measured in the
child: "from start"), and the wall time of the whole subprocess (interpreter start and
exit included). The contenders take turns, in a seeded random order every round, after
one untimed warm-up round (which also fills the cache folder); medians over ``--runs``
rounds. Also measured, in fresh processes taking turns the same way: ``import funcnet``
against ``import sklearn.neural_network`` (and ``import jax``, context), and how many XLA
programs one fit compiles (JAX's ``/jax/core/compile/backend_compile_duration`` events;
with the cache, those served from it are counted apart).

Target: funcnet from start at most 0.8x scikit-learn's time. On a busy machine the ratio
moves a lot (other processes slow scikit-learn's threaded BLAS much more than they slow
XLA's compiler): read it with the load average printed beside it.

    python benchmarks/latency.py --help
    python benchmarks/latency.py --quick     # 1 epoch, 1 run (a smoke run)
    python benchmarks/latency.py             # 30 epochs, 7 runs: about 8 minutes on 2 cores
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()  # a child's clock starts at this script's first statement

import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

NAME = "latency"
HIDDEN = (256, 256)      # experiments/digits.py: --hidden default
BATCH = 64               # experiments/digits.py: configurations()["Adam"]
LEARNING_RATE = 1e-3     # experiments/digits.py: optax.adam(1e-3)
EPOCHS = 30              # experiments/digits.py: configurations(1.0)["Adam"]
TARGET = 0.8             # funcnet time / scikit-learn time
RESULT_MARK = "__latency_result__ "
HERE = Path(__file__).resolve().parent
EXPERIMENTS = HERE.parent / "experiments"

LOOP, SCAN, LOOP_CACHE, SCAN_CACHE, SKLEARN, SKLEARN_1 = (
    "funcnet fit, per-step", "funcnet fit, scanned epoch", "funcnet fit, per-step, cache",
    "funcnet fit, scanned epoch, cache", "scikit-learn MLPClassifier",
    "scikit-learn MLPClassifier, 1 BLAS thread")
FUNCNET = (LOOP, SCAN, LOOP_CACHE, SCAN_CACHE)
CACHED = (LOOP_CACHE, SCAN_CACHE)
SKLEARNS = (SKLEARN, SKLEARN_1)
ONE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
IMPORTS = {"import funcnet": "import funcnet",
           "import sklearn.neural_network": "import sklearn.neural_network",
           "import jax (context)": "import jax"}


# --- the child: one fresh process, start to trained net -------------------------------------


def _child(config):
    marks = {}
    if config["kind"] == "sklearn":
        result = _child_sklearn(config, marks)
    else:
        result = _child_funcnet(config, marks)
    result.update(marks=marks, total=marks["evaluate"])
    print(RESULT_MARK + json.dumps(result), flush=True)


def _mark(marks, name):
    marks[name] = time.perf_counter() - _T0


def _child_funcnet(config, marks):
    import jax

    compiles, hits = [], []

    def on_duration(event, seconds, **kwargs):
        if "backend_compile" in event:
            compiles.append({"name": str(kwargs.get("fun_name", "?")), "seconds": seconds,
                             "at": time.perf_counter() - _T0})

    def on_event(event, **kwargs):
        if event == "/jax/compilation_cache/cache_hits":
            hits.append(time.perf_counter() - _T0)

    jax.monitoring.register_event_duration_secs_listener(on_duration)
    jax.monitoring.register_event_listener(on_event)
    _mark(marks, "import jax")
    if config["cache"]:
        sys.path.insert(0, str(EXPERIMENTS))
        from _common import enable_compilation_cache  # imports funcnet

        enable_compilation_cache(config["cache"])
    import optax

    import funcnet as fnet
    _mark(marks, "imports")
    data = fnet.data.load_digits(seed=config["seed"])
    _mark(marks, "data")
    layers = []
    for width in config["hidden"]:
        layers += [fnet.dense(width), fnet.relu]
    net = fnet.chain(*layers, fnet.dense(10), name="mlp")  # experiments/digits.py's mlp
    params, _ = net.init(jax.random.key(config["seed"]), data.x_train.shape[1:])
    jax.block_until_ready(params)
    _mark(marks, "init")
    loss = fnet.losses.softmax_cross_entropy
    for steps_per_call in config.get("warm_also", []):  # a warm-up filling the cache for more
        fnet.fit(net, loss, optax.adam(config["learning_rate"]), params, data.x_train,
                 data.y_train, key=jax.random.key(config["seed"] + 1), epochs=1,
                 batch_size=config["batch"], steps_per_call=steps_per_call, progress=False)
    result = fnet.fit(net, loss, optax.adam(config["learning_rate"]), params, data.x_train,
                      data.y_train, key=jax.random.key(config["seed"] + 1),
                      epochs=config["epochs"], batch_size=config["batch"],
                      steps_per_call=config["steps_per_call"], progress=False)
    jax.block_until_ready(result.params)
    _mark(marks, "fit")
    accuracy = fnet.evaluate(net, loss, result.params, data.x_test, data.y_test)["accuracy"]
    _mark(marks, "evaluate")
    return {"test_accuracy": accuracy, "compiles": compiles, "cache_hits": hits,
            "first_epoch_seconds": result.history.epochs[0]["time"],
            "steps": int(result.state.step)}


def _child_sklearn(config, marks):
    import warnings

    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier
    _mark(marks, "imports")
    # fnet.data.load_digits's split and standardisation, without importing funcnet (JAX)
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.25, random_state=config["seed"], stratify=y)
    mean, std = x_train.mean(axis=0), x_train.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    x_train = ((x_train - mean) / std).astype(np.float32)
    x_test = ((x_test - mean) / std).astype(np.float32)
    _mark(marks, "data")
    epochs = config["epochs"]
    model = MLPClassifier(hidden_layer_sizes=tuple(config["hidden"]), solver="adam",
                          batch_size=config["batch"], learning_rate_init=config["learning_rate"],
                          max_iter=epochs, random_state=config["seed"], alpha=0.0, tol=0.0,
                          n_iter_no_change=epochs + 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(x_train, y_train)
    _mark(marks, "fit")
    accuracy = float(model.score(x_test, y_test))
    _mark(marks, "evaluate")
    return {"test_accuracy": accuracy, "epochs_run": int(model.n_iter_)}


# --- the parent: fresh processes, taking turns ----------------------------------------------


def _run_child(config):
    """(result dict from the child, wall seconds of the whole subprocess)."""
    import subprocess

    command = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(config)]
    env = dict(os.environ, **(ONE_THREAD if config.get("blas_threads") == 1 else {}))
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_MARK)]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"latency child {config['kind']} failed (exit {done.returncode}):\n"
                           f"{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    result = json.loads(lines[-1][len(RESULT_MARK):])
    result["wall"] = wall
    return result


def _import_seconds(statement):
    """(seconds of ``statement`` inside a fresh interpreter, wall seconds of the process)."""
    import subprocess

    code = (f"import time; t = time.perf_counter(); {statement}; "
            f"print(time.perf_counter() - t)")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{statement!r} failed in a fresh process:\n{done.stderr[-2000:]}")
    return float(done.stdout.strip().splitlines()[-1]), wall


def _main_job_settings():
    """batch and epochs of experiments/digits.py's Adam run, read from the script."""
    import importlib.util

    sys.path.insert(0, str(EXPERIMENTS))
    try:
        spec = importlib.util.spec_from_file_location("experiments_digits_for_latency",
                                                      EXPERIMENTS / "digits.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(EXPERIMENTS))
    _, batch, epochs = module.configurations(1.0)["Adam"]
    return {"batch": batch, "epochs": epochs}


def _phases(result):
    """Seconds spent in each phase of a child, from its marks."""
    marks, previous, out = result["marks"], 0.0, {}
    for name in ("import jax", "imports", "data", "init", "fit", "evaluate"):
        if name in marks:
            out[name] = marks[name] - previous
            previous = marks[name]
    if "import jax" in out:  # report imports whole
        out["imports"] += out.pop("import jax")
    return out


def _compiles_in(result, start_mark, end_mark):
    marks = result["marks"]
    lo, hi = marks.get(start_mark, 0.0), marks[end_mark]
    events = [e for e in result["compiles"] if lo <= e["at"] <= hi]
    hits = [t for t in result["cache_hits"] if lo <= t <= hi]
    return events, hits


def main(argv=None):
    import random
    import statistics
    import tempfile

    sys.path.insert(0, str(HERE))
    from _timing import (benchmark_parser, environment, save_results, summarize, table,
                         target_row, targets_table)

    parser = benchmark_parser(__doc__, NAME)
    parser.add_argument("--runs", type=int, default=None,
                        help="timed runs (fresh processes) of every contender (default 7; 1 quick)")
    parser.add_argument("--epochs", type=int, default=None,
                        help=f"epochs per fit (default {EPOCHS}, the main job's; 1 quick)")
    parser.add_argument("--import-runs", type=int, default=None,
                        help="fresh processes per import statement (default --runs)")
    parser.add_argument("--quick", action="store_true",
                        help="1 epoch, 1 run, one warm-up process (for the cache), no "
                             "'import jax' (a smoke run)")
    parser.add_argument("--seed", type=int, default=0,
                        help="data split, init and shuffling seed; also the order of turns")
    args = parser.parse_args(argv)
    runs = args.runs or (1 if args.quick else 7)
    epochs = args.epochs or (1 if args.quick else EPOCHS)
    import_runs = args.import_runs or runs
    if runs < 1 or epochs < 1 or import_runs < 1:
        parser.error("--runs, --epochs and --import-runs must be positive")

    main_job = _main_job_settings()
    matches_main_job = main_job == {"batch": BATCH, "epochs": EPOCHS}
    load_start = os.getloadavg()
    print(f"# digits, 64 -> {' -> '.join(map(str, HIDDEN))} -> 10, Adam {LEARNING_RATE:g}, "
          f"batch {BATCH}, {epochs} epochs; {runs} fresh processes per contender; load "
          f"average {load_start[0]:.2f} on {os.cpu_count()} CPUs", flush=True)
    if not matches_main_job:
        print(f"  note: experiments/digits.py's Adam run is now {main_job}, this benchmark "
              f"uses batch {BATCH}, {EPOCHS} epochs", flush=True)

    with tempfile.TemporaryDirectory(prefix="funcnet-latency-") as tmp:
        cache = str(Path(tmp) / "xla-cache")
        base = {"seed": args.seed, "hidden": list(HIDDEN), "batch": BATCH,
                "learning_rate": LEARNING_RATE, "epochs": epochs}
        configs = {
            LOOP: dict(base, kind="funcnet", steps_per_call=1, cache=None),
            SCAN: dict(base, kind="funcnet", steps_per_call="epoch", cache=None),
            LOOP_CACHE: dict(base, kind="funcnet", steps_per_call=1, cache=cache),
            SCAN_CACHE: dict(base, kind="funcnet", steps_per_call="epoch", cache=cache),
            SKLEARN: dict(base, kind="sklearn"),
            SKLEARN_1: dict(base, kind="sklearn", blas_threads=1),
        }
        names = list(configs)
        rng = random.Random(args.seed)
        # untimed warm-up round: fills the cache, warms the disk; --quick: one process
        # fills the cache for both cached contenders, nothing else is warmed
        warm = {name: configs[name] for name in names}
        if args.quick:
            warm = {SCAN_CACHE: dict(configs[SCAN_CACHE],
                                     warm_also=[configs[LOOP_CACHE]["steps_per_call"]])}
        warmups = {}
        for name in rng.sample(list(warm), len(warm)):
            warmups[name] = _run_child(warm[name])
            print(f"  warm-up: {name}: {warmups[name]['total']:.2f} s", flush=True)
        results = {name: [] for name in names}
        for round_ in range(runs):
            for name in rng.sample(names, len(names)):
                results[name].append(_run_child(configs[name]))
                r = results[name][-1]
                print(f"  run {round_}: {name}: {r['total']:.2f} s from start, "
                      f"{r['wall']:.2f} s wall", flush=True)
        cache_files = sum(1 for p in Path(cache).rglob("*") if p.is_file())

    statements = {name: code for name, code in IMPORTS.items()
                  if not (args.quick and "context" in name)}
    imports = {name: [] for name in statements}
    for _ in range(import_runs):
        for name in rng.sample(list(statements), len(statements)):
            imports[name].append(_import_seconds(statements[name]))
    load_end = os.getloadavg()
    busy = (" (shared with other jobs: absolute times inflated, ratios moved)"
            if max(load_start[0], load_end[0]) > 0.75 * (os.cpu_count() or 1) else "")

    # scikit-learn's time: the faster of its two BLAS settings (on a busy machine its
    # default threads can lose much more to other processes than one thread does)
    sklearn_best = min(SKLEARNS, key=lambda n: statistics.median(r["total"] for r in results[n]))
    sk_total = statistics.median(r["total"] for r in results[sklearn_best])
    sk_wall = statistics.median(r["wall"] for r in results[sklearn_best])
    sk_fit = statistics.median(_phases(r)["fit"] for r in results[sklearn_best])
    rows, phase_rows, compile_rows = [], [], []
    for name in names:
        total = summarize([r["total"] for r in results[name]])
        wall = summarize([r["wall"] for r in results[name]])
        phases = [_phases(r) for r in results[name]]
        phase_median = {p: statistics.median(ph[p] for ph in phases) for p in phases[0]}
        accuracy = results[name][0]["test_accuracy"]
        row = {"contender": name, "from_start_s": total["median"], "from_start": total,
               "spread": f"{total['min']:.2f}-{total['max']:.2f}",
               "wall_s": wall["median"], "wall": wall,
               "over_sklearn": total["median"] / sk_total,
               "wall_over_sklearn": wall["median"] / sk_wall,
               "fit_s": phase_median["fit"], "fit_over_sklearn": phase_median["fit"] / sk_fit,
               "test_accuracy": accuracy,
               "accuracy_pct": 100 * accuracy, "phases": phase_median}
        phase_rows.append(dict({"contender": name}, **phase_median))
        if name in FUNCNET:
            fit_counts, all_counts = [], []
            for r in results[name]:
                for counts, (start, end) in ((fit_counts, ("init", "fit")),
                                             (all_counts, ("start", "evaluate"))):
                    events, hits = _compiles_in(r, start, end)
                    counts.append((len(events), len(hits), sum(e["seconds"] for e in events)))
            phase_rows[-1]["compile"] = statistics.median(c[2] for c in all_counts)
            events, hits = _compiles_in(results[name][0], "init", "fit")
            compile_row = {
                "contender": name,
                "programs_per_fit": int(statistics.median(c[0] for c in fit_counts)),
                "compiled_per_fit": int(statistics.median(c[0] - c[1] for c in fit_counts)),
                "from_cache_per_fit": int(statistics.median(c[1] for c in fit_counts)),
                "compile_s_in_fit": statistics.median(c[2] for c in fit_counts),
                "programs_per_process": int(statistics.median(c[0] for c in all_counts)),
                "compiled_per_process": int(statistics.median(c[0] - c[1] for c in all_counts)),
                "compile_s_per_process": statistics.median(c[2] for c in all_counts),
                "fit_programs": [e["name"] for e in events],
                "fit_program_seconds": [e["seconds"] for e in events],
                "process_programs": [e["name"] for e in results[name][0]["compiles"]],
            }
            compile_rows.append(compile_row)
            row["programs_per_fit"] = compile_row["programs_per_fit"]
            row["compiled_per_fit"] = compile_row["compiled_per_fit"]
        rows.append(row)
    import_rows = []
    for name, samples in imports.items():
        seconds = summarize([s for s, _ in samples])
        wall = summarize([w for _, w in samples])
        import_rows.append({"statement": name, "seconds": seconds["median"],
                            "spread": f"{seconds['min']:.2f}-{seconds['max']:.2f}",
                            "wall_s": wall["median"], "import": seconds, "wall": wall})
    by_import = {r["statement"]: r for r in import_rows}
    import_ratio = (by_import["import funcnet"]["seconds"]
                    / by_import["import sklearn.neural_network"]["seconds"])
    for r in import_rows:
        r["over_sklearn"] = r["seconds"] / by_import["import sklearn.neural_network"]["seconds"]

    by = {row["contender"]: row for row in rows}
    targets = [target_row(f"{name}, from start / {sklearn_best}", by[name]["over_sklearn"],
                          f"<= {TARGET:g}", by[name]["over_sklearn"] <= TARGET)
               for name in FUNCNET]
    best = min(FUNCNET, key=lambda n: by[n]["over_sklearn"])
    compile_by = {c["contender"]: c for c in compile_rows}
    lines = [
        f"# Latency: a fresh process to a trained digits MLP ({epochs} epochs, batch {BATCH})", "",
        f"Machine: {os.cpu_count()} CPUs, JAX {environment()['jax']} ({environment()['backend']}); "
        f"load average {load_start[0]:.2f} at the start, {load_end[0]:.2f} at the end"
        f"{busy}. Medians over "
        f"{runs} fresh processes per contender, taking turns in a random order every round "
        f"after a warm-up round; spread min-max. \"From start\": the child's first line to "
        f"its test accuracy (imports, data, init, fit, evaluation); wall: the whole "
        f"subprocess, interpreter start and exit included.", "",
        table(rows, ["contender", "from_start_s", "spread", "over_sklearn", "wall_s",
                     "wall_over_sklearn", "fit_s", "fit_over_sklearn", "programs_per_fit",
                     "compiled_per_fit", "accuracy_pct"],
              ["contender", "from start s", "min-max s", "/ scikit-learn", "wall s",
               "wall / scikit-learn", "fit s", "fit / scikit-learn fit", "programs per fit",
               "compiled (not cached)", "test accuracy %"]), "",
        "(fit s: the fit call alone, compilation included, as experiments/digits.py times "
        "it; the target is on the time from start.)", "",
        "Where the time goes (median seconds per phase; funcnet's data phase imports "
        "scikit-learn's datasets; compile: XLA compile seconds over the whole process, "
        "inside the phases):", "",
        table(phase_rows, ["contender", "imports", "data", "init", "fit", "evaluate", "compile"]),
        "",
        f"Imports in a fresh process ({import_runs} each, taking turns; seconds inside the "
        f"process, wall with the interpreter):", "",
        table(import_rows, ["statement", "seconds", "spread", "over_sklearn", "wall_s"],
              ["statement", "s", "min-max s", "/ sklearn.neural_network", "wall s"]), "",
        f"XLA programs compiled by one fit without the cache: per-step "
        f"{compile_by[LOOP]['programs_per_fit']} "
        f"({compile_by[LOOP]['compile_s_in_fit']:.2f} s), scanned "
        f"{compile_by[SCAN]['programs_per_fit']} ({compile_by[SCAN]['compile_s_in_fit']:.2f} s); "
        f"per process (init, fit, evaluate): {compile_by[LOOP]['programs_per_process']} and "
        f"{compile_by[SCAN]['programs_per_process']}. With the warmed cache "
        f"({cache_files} files) the per-step fit compiled "
        f"{compile_by[LOOP_CACHE]['compiled_per_fit']} and loaded "
        f"{compile_by[LOOP_CACHE]['from_cache_per_fit']} from it. Programs of the per-step "
        f"fit: {', '.join(compile_by[LOOP]['fit_programs'])}.", "",
        f"Ratios are against the faster scikit-learn setting, {sklearn_best}. Fastest "
        f"funcnet contender: {best}, {by[best]['over_sklearn']:.2f}x.", "",
        "## Targets", "", targets_table(targets), ""]
    text = "\n".join(lines)
    print()
    print(text)
    results_out = {
        "benchmark": NAME,
        "settings": {"epochs": epochs, "runs": runs, "import_runs": import_runs,
                     "batch": BATCH, "hidden": list(HIDDEN), "learning_rate": LEARNING_RATE,
                     "optimizer": "adam", "seed": args.seed, "dtype": "float32",
                     "main_job": main_job, "matches_main_job": matches_main_job,
                     "quick": args.quick},
        "environment": environment(),
        "load_average_start": list(load_start),
        "load_average_end": list(load_end),
        "rows": rows,
        "compiles": compile_rows,
        "compile_count_per_fit": compile_by[LOOP]["programs_per_fit"],
        "imports": import_rows,
        "import_ratio_funcnet_over_sklearn": import_ratio,
        "cache_files": cache_files,
        "runs": {name: [{k: v for k, v in r.items()} for r in rs] for name, rs in results.items()},
        "warmups": {name: {"total": r["total"], "wall": r["wall"]} for name, r in warmups.items()},
        "best_funcnet": best,
        "sklearn_reference": sklearn_best,
        "target": TARGET,
        "targets": targets,
    }
    save_results(NAME, args.results, results_out, markdown=text)
    return results_out


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        _child(json.loads(sys.argv[2]))
    else:
        main()
