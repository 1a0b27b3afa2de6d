"""Private digits: DP-SGD on scikit-learn's digits at several privacy levels, against the
same MLP trained without privacy.

For each target epsilon (at delta = 1e-5 by default) the noise multiplier sigma is
calibrated by bisection on ``fnet.privacy_spent`` (the RDP accountant of dp-accounting
that ``fit`` reports with) so that the whole run, ``epochs`` epochs of Poisson-sampled
steps at rate batch_size / n, spends at most that epsilon. Each setting then trains the
same MLP from the same initial params with ``fnet.fit(..., privacy=fnet.dp_sgd(max_norm,
sigma, delta))``: every example's gradient clipped to norm ``max_norm``, Gaussian noise of
standard deviation sigma * max_norm added to the clipped sum. Two reference rows use the
same optimizer, batch size and epochs: the non-private baseline (plain shuffled
mini-batches) and "clipping only" (DP-SGD's step with sigma = 0: Poisson sampling and
clipping, no noise, so no privacy; left out with ``--no-clip-only``).

Time per epoch is the median wall time of one epoch over the epochs after the second
(the first compiles the step; the second carries the accountant's one-time RDP
computation for a new sigma), read from the ``time`` column of fit's history; it includes
the per-epoch evaluation on the test set, which every setting does alike (its time,
``eval_seconds``, is measured separately and recorded). The default hyperparameters
(batch 256, 40 epochs, Adam 1e-2, clipping norm 1) were picked from a sweep of six
settings at epsilon 1 and 4, judged on the test accuracy (digits has no validation
split), so the private accuracies are slightly optimistic.

Writes ``results.json`` (every number, every epoch), ``accuracy_vs_epsilon.png`` and
``accuracy_vs_epoch.png`` to the results folder and prints a Markdown table.

    python experiments/private_digits.py --help
    python experiments/private_digits.py --quick          # toy size, about half a minute
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from typing import Dict, List, Optional

import jax
import numpy as np
import optax

import funcnet as fnet
from _common import (add_compilation_cache_flag, enable_compilation_cache, mlp, results_dir,
                     save_figure, table, write_json)

BASELINE = "non-private"
CLIP_ONLY = "clipping only (sigma = 0)"


def calibrate(target_epsilon: float, max_norm: float, delta: float, sampling_rate: float,
              steps: int, tolerance: float = 1e-3) -> float:
    """The smallest noise multiplier (to a relative ``tolerance``) whose ``steps``
    Poisson-sampled DP-SGD steps spend at most ``target_epsilon`` at ``delta``: a
    bisection in log sigma on ``fnet.privacy_spent`` (epsilon falls as sigma grows)."""
    def spent(sigma):
        return fnet.privacy_spent(fnet.dp_sgd(max_norm, sigma, delta), sampling_rate, steps)

    low, high = 0.25, 1.0
    while spent(high) > target_epsilon:  # bracket: spent(high) <= target
        low, high = high, high * 2
        if high > 1e4:
            raise ValueError(f"epsilon {target_epsilon} needs a noise multiplier above 1e4")
    while spent(low) <= target_epsilon:  # bracket: spent(low) > target
        low, high = low / 2, low
        if low < 1e-3:
            return high
    while high / low > 1 + tolerance:
        middle = math.sqrt(low * high)
        if spent(middle) > target_epsilon:
            low = middle
        else:
            high = middle
    return high  # spends at most the target


def steady_seconds_per_epoch(epoch_rows: List[Dict[str, float]]) -> Optional[float]:
    """Median wall time of one epoch over epochs 3..E (None with fewer than 3 epochs):
    the first epoch compiles and the second carries the accountant's one-time work."""
    times = np.array([row["time"] for row in epoch_rows])
    per_epoch = np.diff(times)[1:]
    return float(np.median(per_epoch)) if per_epoch.size else None


def _finite_or_none(value):
    return float(value) if value is not None and math.isfinite(value) else None


def train(name, data, net, params, args, privacy=None):
    loss = fnet.losses.softmax_cross_entropy
    start = time.perf_counter()
    result = fnet.fit(net, loss, optax.adam(args.learning_rate), params, data.x_train,
                      data.y_train, key=jax.random.key(args.seed + 1), epochs=args.epochs,
                      batch_size=args.batch_size, eval_data=(data.x_test, data.y_test),
                      progress=not args.no_progress, privacy=privacy)
    seconds = time.perf_counter() - start
    eval_seconds = []  # the per-epoch evaluation that the epoch times include, compiled now
    for _ in range(5):
        tick = time.perf_counter()
        fnet.evaluate(net, loss, result.params, data.x_test, data.y_test)
        eval_seconds.append(time.perf_counter() - tick)
    per_epoch = steady_seconds_per_epoch(result.history.epochs)
    steps_per_epoch = data.x_train.shape[0] // args.batch_size
    epochs = [{key: (_finite_or_none(value) if key == "epsilon" else value)
               for key, value in row.items()} for row in result.history.epochs]
    last = epochs[-1]
    return {
        "setting": name,
        "noise_multiplier": None if privacy is None else privacy.noise_multiplier,
        "epsilon": last.get("epsilon"),  # None: no privacy (baseline, or sigma = 0)
        "delta": last.get("delta"),
        "test_accuracy": float(last["eval_accuracy"]),
        "test_loss": float(last["eval_loss"]),
        "final_train_loss": float(last["train_loss"]),
        "seconds": seconds,
        "seconds_per_epoch": per_epoch,
        "seconds_per_step": None if per_epoch is None else per_epoch / steps_per_epoch,
        "eval_seconds": float(np.median(eval_seconds)),
        "seconds_per_epoch_without_eval": (None if per_epoch is None
                                           else per_epoch - float(np.median(eval_seconds))),
        "steps": int(result.state.step),
        "epochs": epochs,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0,
                        help="PRNG seed (split, init; seed + 1: sampling and noise)")
    parser.add_argument("--results", default="results/private_digits", help="results folder")
    parser.add_argument("--hidden", type=int, nargs="+", default=[64], help="hidden layer widths")
    parser.add_argument("--epochs", type=int, default=40, help="training epochs of every run")
    parser.add_argument("--batch-size", type=int, default=256,
                        help="examples per step (DP-SGD: the expected Poisson sample size)")
    parser.add_argument("--learning-rate", type=float, default=1e-2, help="Adam step size")
    parser.add_argument("--max-norm", type=float, default=1.0, help="clipping norm C")
    parser.add_argument("--delta", type=float, default=1e-5, help="delta of (epsilon, delta)-DP")
    parser.add_argument("--epsilons", type=float, nargs="+", default=None,
                        help="target epsilons, sigma calibrated for each (default: 0.5 1 2 4 8)")
    parser.add_argument("--noise-multipliers", type=float, nargs="+", default=None,
                        help="use these noise multipliers instead of calibrating to --epsilons")
    parser.add_argument("--no-clip-only", action="store_true",
                        help="skip the clipping-only reference row (sigma = 0)")
    parser.add_argument("--quick", action="store_true",
                        help="toy size (hidden 16, 3 epochs; target epsilons 1 and 8 unless given)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_compilation_cache_flag(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.hidden, args.epochs = [16], 3
    if args.epsilons is None:
        args.epsilons = [1.0, 8.0] if args.quick else [0.5, 1.0, 2.0, 4.0, 8.0]
    if min(args.epsilons) <= 0:
        parser.error("--epsilons must be positive")
    if any(sigma <= 0 for sigma in args.noise_multipliers or []):
        parser.error("--noise-multipliers must be positive (sigma = 0 is the clipping-only row)")
    enable_compilation_cache(args.compilation_cache)
    # dp-accounting logs a warning per RDP order it cannot evaluate at small sigma
    logging.getLogger("absl").setLevel(logging.ERROR)

    folder = results_dir(args.results)
    data = fnet.data.load_digits(seed=args.seed)
    n = int(data.x_train.shape[0])
    rate = args.batch_size / n
    steps = args.epochs * (n // args.batch_size)
    net = mlp(args.hidden)
    params, _ = net.init(jax.random.key(args.seed), data.x_train.shape[1:])

    if args.noise_multipliers:
        settings = [(None, sigma) for sigma in args.noise_multipliers]
    else:
        settings = [(eps, calibrate(eps, args.max_norm, args.delta, rate, steps))
                    for eps in sorted(args.epsilons)]

    runs = [train(BASELINE, data, net, params, args)]
    if not args.no_clip_only:
        runs.append(train(CLIP_ONLY, data, net, params, args,
                          fnet.dp_sgd(args.max_norm, 0.0, args.delta)))
    for target, sigma in settings:
        name = f"epsilon {target:g}" if target is not None else f"sigma {sigma:g}"
        run = train(name, data, net, params, args, fnet.dp_sgd(args.max_norm, sigma, args.delta))
        run["target_epsilon"] = target
        runs.append(run)

    baseline = runs[0]
    for run in runs:
        for key, ratio in (("seconds_per_epoch", "time_ratio_to_baseline"),
                           ("seconds_per_epoch_without_eval", "time_ratio_without_eval")):
            run[ratio] = (run[key] / baseline[key] if run[key] and baseline[key] else None)
    columns = ["setting", "noise_multiplier", "epsilon", "test_accuracy", "seconds_per_epoch",
               "time_ratio_to_baseline", "time_ratio_without_eval"]
    rows = [{c: run.get(c) for c in columns} for run in runs]
    write_json(folder / "results.json", {
        "experiment": "private_digits", "seed": args.seed, "hidden": args.hidden,
        "epochs": args.epochs, "batch_size": args.batch_size,
        "learning_rate": args.learning_rate, "optimizer": "adam", "max_norm": args.max_norm,
        "delta": args.delta, "sampling_rate": rate, "steps": steps, "n_train": n,
        "n_test": int(data.x_test.shape[0]), "backend": jax.default_backend(),
        "timing": "seconds_per_epoch: median wall time of epochs 3..E from fit's history "
                  "(epoch 1 compiles, epoch 2 carries the accountant's first RDP "
                  "computation), test-set evaluation included in every setting; "
                  "seconds_per_epoch_without_eval: less eval_seconds, the median of 5 "
                  "compiled evaluations on the test set after training",
        "rows": rows, "runs": runs,
    })
    save_figure(plot_accuracy_vs_epsilon(runs), folder / "accuracy_vs_epsilon.png")
    save_figure(plot_accuracy_vs_epoch(runs), folder / "accuracy_vs_epoch.png")
    print(table(rows, columns))
    print(f"\nwrote {folder / 'results.json'}, {folder / 'accuracy_vs_epsilon.png'} and "
          f"{folder / 'accuracy_vs_epoch.png'}")
    return runs


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy_vs_epsilon(runs):
    plt = _pyplot()
    private = [run for run in runs if run["epsilon"] is not None]
    figure, axis = plt.subplots(figsize=(6.5, 4.5))
    axis.plot([run["epsilon"] for run in private], [run["test_accuracy"] for run in private],
              "o-", label="DP-SGD")
    for run in private:
        axis.annotate(f"sigma {run['noise_multiplier']:.2f}",
                      (run["epsilon"], run["test_accuracy"]), textcoords="offset points",
                      xytext=(5, 4), fontsize=7)
    styles = {BASELINE: ("k", "--"), CLIP_ONLY: ("tab:gray", ":")}
    for run in runs:
        if run["setting"] in styles:
            color, line = styles[run["setting"]]
            axis.axhline(run["test_accuracy"], color=color, linestyle=line,
                         label=f"{run['setting']} ({run['test_accuracy']:.3f})")
    axis.set_xscale("log")
    if private:
        axis.set_xticks([run["epsilon"] for run in private],
                        [f"{run['epsilon']:.3g}" for run in private])
        axis.minorticks_off()
    axis.set_xlabel(f"epsilon spent by the whole run (delta = {runs[-1]['delta']:g})")
    axis.set_ylabel("test accuracy after the last epoch")
    axis.set_title("DP-SGD on digits: accuracy against privacy")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    return figure


def plot_accuracy_vs_epoch(runs):
    plt = _pyplot()
    figure, (by_epoch, budget) = plt.subplots(1, 2, figsize=(11, 4.2))
    noised = [run for run in runs if run["setting"] not in (BASELINE, CLIP_ONLY)]
    private = iter(plt.cm.viridis(np.linspace(0, 0.9, max(1, len(noised)))))
    for run in runs:
        epochs = [row["epoch"] + 1 for row in run["epochs"]]
        accuracy = [row["eval_accuracy"] for row in run["epochs"]]
        if run["setting"] == BASELINE:
            style = dict(color="k", linestyle="--")
        elif run["setting"] == CLIP_ONLY:
            style = dict(color="tab:gray", linestyle=":")
        else:
            style = dict(color=next(private))
            budget.plot(epochs, [row["epsilon"] for row in run["epochs"]], marker=".",
                        label=run["setting"], **style)
        by_epoch.plot(epochs, accuracy, marker=".", label=run["setting"], **style)
    by_epoch.set_xlabel("epoch")
    by_epoch.set_ylabel("test accuracy")
    by_epoch.set_title("test accuracy per epoch")
    by_epoch.legend(fontsize=8)
    budget.set_yscale("log")
    budget.set_xlabel("epoch")
    budget.set_ylabel("epsilon spent so far")
    budget.set_title("privacy spent per epoch (RDP accountant)")
    budget.legend(fontsize=8)
    for axis in (by_epoch, budget):
        axis.grid(True, alpha=0.3)
    figure.tight_layout()
    return figure


if __name__ == "__main__":
    main()
