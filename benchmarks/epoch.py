"""A whole epoch in one jit: fit(steps_per_call="epoch") against a per-step loop and
scikit-learn.

``fnet.fit(..., steps_per_call="epoch")`` runs every step of an epoch inside one jitted
call, a ``lax.scan`` over the device-resident mini-batches; ``steps_per_call=1`` is a
Python loop over the same jitted step. On scikit-learn's digits (64 -> 256 -> 256 -> 10,
relu, softmax cross-entropy, batch 64, Adam(1e-3), float32), this script times, for the
same number of epochs:

- funcnet, epoch per call: ``fit(..., steps_per_call="epoch")``;
- funcnet, per-step loop: ``fit(..., steps_per_call=1)``, the same steps (and losses);
- funcnet, hand-written loop: ``fnet.train_step`` called once per mini-batch, blocking
  only at the end of the epoch (a per-step loop without fit's bookkeeping; context);
- scikit-learn: ``MLPClassifier(hidden_layer_sizes=(256, 256), solver="adam",
  batch_size=64, learning_rate_init=1e-3, alpha=0, max_iter=epochs, tol=0,
  n_iter_no_change=epochs + 1)``, fitted with its BLAS's default threads and with one
  thread (threadpoolctl); the faster is scikit-learn's time.

Per-epoch time: for funcnet the median of the differences of ``history.epochs[i]["time"]``
after the first epoch (which compiles); for scikit-learn the fit time divided by the
epochs run. The contenders take turns over ``--rounds`` rounds and the median over rounds
is reported. Test accuracy is that after the last epoch.

Targets: epoch per call at least 25x faster per epoch than scikit-learn, and faster than
the per-step loop; its test accuracy within 1 point of scikit-learn's.

    python benchmarks/epoch.py --help
    python benchmarks/epoch.py --quick       # 3 epochs, one round (a smoke run)
    python benchmarks/epoch.py               # 30 epochs, 3 rounds
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))

import funcnet as fnet  # noqa: E402
from _timing import (benchmark_parser, environment, save_results, table,  # noqa: E402
                     target_row, targets_table)

NAME = "epoch"
HIDDEN = (256, 256)
LEARNING_RATE = 1e-3
SPEEDUP_TARGET = 25.0
ACCURACY_POINTS = 1.0
SCAN, LOOP, HAND, SKLEARN, SKLEARN_1 = (
    "funcnet, epoch per call (scan)", "funcnet, per-step loop (fit)",
    "funcnet, hand-written step loop", "scikit-learn (default BLAS threads)",
    "scikit-learn (1 BLAS thread)")
LOSS = fnet.losses.softmax_cross_entropy


def network():
    layers = []
    for width in HIDDEN:
        layers += [fnet.dense(width), fnet.relu]
    return fnet.chain(*layers, fnet.dense(10))


def init_params(net, data, seed):
    """float32 params (also when jax_enable_x64 makes float64 the default)."""
    params, _ = net.init(jax.random.key(seed), data.x_train.shape[1:])
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)


def run_fit(data, steps_per_call, epochs, batch, seed):
    """One fnet.fit from the same init and key; per-epoch seconds after the first."""
    net = network()
    params = init_params(net, data, seed)
    start = time.perf_counter()
    result = fnet.fit(net, LOSS, optax.adam(LEARNING_RATE), params, data.x_train, data.y_train,
                      key=jax.random.key(seed + 1), epochs=epochs, batch_size=batch,
                      steps_per_call=steps_per_call, progress=False)
    total = time.perf_counter() - start
    times = [row["time"] for row in result.history.epochs]
    per_epoch = np.diff(times).tolist()
    metrics = fnet.evaluate(net, LOSS, result.params, data.x_test, data.y_test)
    return {"epoch_seconds": statistics.median(per_epoch) if per_epoch else math.nan,
            "first_epoch_seconds": times[0], "total_seconds": total,
            "epoch_samples": per_epoch, "test_accuracy": metrics["accuracy"],
            "test_loss": metrics["loss"], "step_loss": result.history.step_loss,
            "params": result.params}


def run_hand_loop(data, epochs, batch, seed):
    """fnet.train_step called per mini-batch, blocking only at the end of each epoch."""
    net = network()
    params = init_params(net, data, seed)
    optimizer = optax.adam(LEARNING_RATE)
    step = fnet.train_step(net, LOSS, optimizer)
    state = fnet.init_train_state(params, optimizer)
    x, y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    n = x.shape[0]
    steps = n // batch
    key = jax.random.key(seed + 1)

    @jax.jit
    def epoch_batches(epoch):  # fit's shuffling: the same batches
        order = jax.random.permutation(jax.random.fold_in(key, epoch), n)[: steps * batch]
        order = order.reshape(steps, batch)
        return x[order], y[order]

    ends = []
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
        for epoch in range(epochs):
            xs, ys = epoch_batches(epoch)
            for i in range(steps):
                state, loss = step(state, xs[i], ys[i])
            loss.block_until_ready()
            ends.append(time.perf_counter() - start)
    metrics = fnet.evaluate(net, LOSS, state.params, data.x_test, data.y_test)
    per_epoch = np.diff(ends).tolist()
    return {"epoch_seconds": statistics.median(per_epoch) if per_epoch else math.nan,
            "first_epoch_seconds": ends[0], "total_seconds": ends[-1],
            "epoch_samples": per_epoch, "test_accuracy": metrics["accuracy"],
            "test_loss": metrics["loss"]}


def _blas_threads(threads):
    if threads is None:
        return contextlib.nullcontext()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=threads, user_api="blas")


def run_sklearn(data, epochs, batch, seed, threads=None):
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    clf = MLPClassifier(hidden_layer_sizes=HIDDEN, activation="relu", solver="adam",
                        batch_size=batch, learning_rate_init=LEARNING_RATE, alpha=0.0,
                        max_iter=epochs, tol=0.0, n_iter_no_change=epochs + 1,
                        random_state=seed)
    with warnings.catch_warnings(), _blas_threads(threads):
        warnings.simplefilter("ignore", ConvergenceWarning)
        start = time.perf_counter()
        clf.fit(data.x_train, data.y_train)
        total = time.perf_counter() - start
    return {"epoch_seconds": total / clf.n_iter_, "total_seconds": total,
            "epochs_run": int(clf.n_iter_), "test_accuracy": float(clf.score(data.x_test, data.y_test)),
            "dtype": str(clf.coefs_[0].dtype)}


def epoch_flops(n_train: int, batch: int) -> float:
    """Matmul FLOPs of one epoch: steps x 3 x the forward's 2 * batch * fan_in * fan_out."""
    sizes = [64, *HIDDEN, 10]
    return (n_train // batch) * 6.0 * batch * sum(a * b for a, b in zip(sizes[:-1], sizes[1:]))


def xla_matmul_peak(sizes=(512, 1024), repeats=15) -> float:
    """GFLOP/s of XLA's jitted jnp.dot of square float32 matrices, best size, median."""
    best = 0.0
    for n in sizes:
        a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
        b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
        dot = jax.jit(jnp.dot)
        dot(a, b).block_until_ready()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            dot(a, b).block_until_ready()
            times.append(time.perf_counter() - start)
        best = max(best, 2.0 * n ** 3 / statistics.median(times) / 1e9)
    return best


def max_abs_diff(a, b):
    return max(float(jnp.max(jnp.abs(u - v))) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def main(argv=None):
    parser = benchmark_parser(__doc__, NAME)
    parser.add_argument("--epochs", type=int, default=None, help="epochs per run (default 30; 3 quick)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="rounds of every contender, taking turns (default 3; 1 quick)")
    parser.add_argument("--batch", type=int, default=64, help="batch size (default 64)")
    parser.add_argument("--sklearn-threads", choices=("both", "default", "1"), default="both",
                        help="scikit-learn's BLAS threads: its default, one (threadpoolctl), "
                             "or both, the faster counting (default both)")
    parser.add_argument("--no-hand-loop", action="store_true",
                        help="skip the hand-written step loop (context only, no target)")
    parser.add_argument("--quick", action="store_true", help="3 epochs, one round (a smoke run)")
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed (also the data split)")
    args = parser.parse_args(argv)
    epochs = args.epochs or (3 if args.quick else 30)
    rounds = args.rounds or (1 if args.quick else 3)
    if epochs < 2:
        parser.error("--epochs must be at least 2 (the first epoch compiles)")
    data = fnet.data.load_digits(seed=args.seed)
    print(f"# digits: {data.x_train.shape[0]} train / {data.x_test.shape[0]} test examples, "
          f"64 -> {' -> '.join(map(str, HIDDEN))} -> 10, batch {args.batch}, Adam "
          f"{LEARNING_RATE:g}, {epochs} epochs x {rounds} rounds; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)

    contenders = {
        SCAN: lambda: run_fit(data, "epoch", epochs, args.batch, args.seed),
        LOOP: lambda: run_fit(data, 1, epochs, args.batch, args.seed),
    }
    if not args.no_hand_loop:
        contenders[HAND] = lambda: run_hand_loop(data, epochs, args.batch, args.seed)
    if args.sklearn_threads in ("both", "default"):
        contenders[SKLEARN] = lambda: run_sklearn(data, epochs, args.batch, args.seed)
    if args.sklearn_threads in ("both", "1"):
        contenders[SKLEARN_1] = lambda: run_sklearn(data, epochs, args.batch, args.seed, threads=1)
    names = list(contenders)
    runs = {name: [] for name in names}
    for round_ in range(rounds):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            runs[name].append(contenders[name]())
            print(f"  round {round_}: {name}: {1e3 * runs[name][-1]['epoch_seconds']:.3g} ms "
                  f"per epoch", flush=True)

    # the scan and the loop run the same steps: same losses, same params
    scan0, loop0 = runs[SCAN][0], runs[LOOP][0]
    same_steps = {
        "step_loss_max_abs_diff": float(np.max(np.abs(scan0["step_loss"] - loop0["step_loss"]))),
        "params_max_abs_diff": max_abs_diff(scan0["params"], loop0["params"]),
    }
    rows = []
    for name in names:
        epoch_s = statistics.median(r["epoch_seconds"] for r in runs[name])
        rows.append({"contender": name, "epoch_ms": 1e3 * epoch_s,
                     "epoch_ms_rounds": [1e3 * r["epoch_seconds"] for r in runs[name]],
                     "first_epoch_ms": (1e3 * statistics.median(r["first_epoch_seconds"] for r in runs[name])
                                        if "first_epoch_seconds" in runs[name][0] else math.nan),
                     "total_s": statistics.median(r["total_seconds"] for r in runs[name]),
                     "test_accuracy": runs[name][0]["test_accuracy"]})
    by = {row["contender"]: row for row in rows}
    sklearn_names = [n for n in (SKLEARN, SKLEARN_1) if n in by]
    best_sklearn = min(sklearn_names, key=lambda n: by[n]["epoch_ms"])
    scan_ms = by[SCAN]["epoch_ms"]
    flops = epoch_flops(data.x_train.shape[0], args.batch)
    peak = xla_matmul_peak()
    for row in rows:
        row["epoch_over_scan"] = row["epoch_ms"] / scan_ms
        row["accuracy_pct"] = 100 * row["test_accuracy"]
        row["gflops"] = flops / row["epoch_ms"] / 1e6
    # the most any JAX epoch could gain on scikit-learn here: an epoch at XLA's matmul peak
    speedup_bound = by[best_sklearn]["epoch_ms"] / (1e3 * flops / (peak * 1e9))
    speedup = by[best_sklearn]["epoch_ms"] / scan_ms
    loop_ratio = by[LOOP]["epoch_ms"] / scan_ms
    accuracy_gap = 100 * (by[SCAN]["test_accuracy"] - by[best_sklearn]["test_accuracy"])
    targets = [
        target_row(f"{best_sklearn} epoch / funcnet epoch-per-call epoch", speedup,
                   f">= {SPEEDUP_TARGET:g}", speedup >= SPEEDUP_TARGET),
        target_row("per-step loop (fit) epoch / epoch-per-call epoch", loop_ratio, "> 1",
                   loop_ratio > 1),
        target_row("test accuracy, funcnet epoch per call - scikit-learn (points)", accuracy_gap,
                   f"within +-{ACCURACY_POINTS:g}", abs(accuracy_gap) <= ACCURACY_POINTS),
    ]
    load_end = os.getloadavg()[0]
    lines = [
        f"# One epoch per jit call vs a per-step loop vs scikit-learn (digits, {epochs} epochs)", "",
        f"Machine: {os.cpu_count()} CPUs, JAX backend {jax.default_backend()}, load average "
        f"{load_end:.1f} at the end (above the CPU count: shared with other jobs). Per-epoch "
        f"time: median over epochs after the first (funcnet) or fit time / epochs "
        f"(scikit-learn), then the median over {rounds} rounds taking turns.", "",
        table(rows, ["contender", "epoch_ms", "epoch_over_scan", "gflops", "first_epoch_ms",
                     "total_s", "accuracy_pct"],
              ["contender", "ms per epoch", "/ epoch per call", "GFLOP/s", "first epoch ms "
               "(compiles)", "total s", "test accuracy %"]), "",
        f"An epoch is {flops / 1e9:.3g} GFLOP of matmuls ({data.x_train.shape[0] // args.batch} "
        f"steps); XLA's matmul peak measured in this run is {peak:.3g} GFLOP/s, so an epoch "
        f"takes at least {1e3 * flops / (peak * 1e9):.3g} ms here and no JAX program can be "
        f"more than {speedup_bound:.3g}x faster per epoch than {best_sklearn} on this "
        f"machine.", "",
        f"The scan and the per-step loop run the same steps: step losses differ by at most "
        f"{same_steps['step_loss_max_abs_diff']:.2g}, final params by "
        f"{same_steps['params_max_abs_diff']:.2g}. scikit-learn's time in the targets is "
        f"the faster of its two thread settings ({best_sklearn}).", "",
        "## Targets", "", targets_table(targets), ""]
    text = "\n".join(lines)
    print()
    print(text)
    results = {
        "benchmark": NAME,
        "settings": {"epochs": epochs, "rounds": rounds, "batch": args.batch, "hidden": HIDDEN,
                     "learning_rate": LEARNING_RATE, "optimizer": "adam", "seed": args.seed,
                     "dtype": "float32", "train_examples": int(data.x_train.shape[0]),
                     "test_examples": int(data.x_test.shape[0]),
                     "sklearn_threads": args.sklearn_threads,
                     "sklearn_dtype": runs[best_sklearn][0]["dtype"]},
        "environment": environment(),
        "load_average_end": load_end,
        "rows": rows,
        "epoch_flops": flops,
        "xla_matmul_peak_gflops": peak,
        "sklearn_speedup_bound_at_xla_peak": speedup_bound,
        "same_steps": same_steps,
        "targets": targets,
    }
    save_results(NAME, args.results, results, markdown=text)
    return results


if __name__ == "__main__":
    main()
