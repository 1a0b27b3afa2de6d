"""CNN digits: a small convolutional network on scikit-learn's 8x8 digit images, against
the MLP of ``digits.py`` trained the same way on the same split.

The images come from ``fnet.data.load_digits`` (the loader ``digits.py`` uses: a
stratified, seeded split, every pixel standardised with the training part's statistics)
reshaped to (8, 8, 1), channels last. The CNN is

    conv(16, 3, SAME) -> relu -> conv(32, 3, SAME) -> relu -> max_pool(2)   # (4, 4, 32)
    -> flatten -> dropout(0.25) -> dense(64) -> relu -> dense(10)

and the reference is ``_common.mlp([256, 256])`` on the flat 64 pixels (digits.py's
default). Both are trained by ``fnet.fit`` with the same optimizer settings: Adam, step
size 3e-3 decayed to 0 along a cosine over the run (the decay is what makes the last
epoch's accuracy stable; at a constant 3e-3 it wanders by about +-0.5 %), batch 64, 40
epochs, softmax cross-entropy. Dropout draws its masks from fit's key (one key per
step, derived from ``--seed`` + 1; explicit randomness) and is the identity when the test
set is evaluated. These settings were chosen on a 2-core CPU so that the whole run (3
seeds, both models) takes about a minute and a half.

Target: the CNN reaches at least 98 % test accuracy on every seed run (a hand-written
prototype reached 98.2 %). The test set holds 450 images, so one image is 0.22 % and the
binomial standard error of an accuracy near 99 % is about 0.5 %; the spread over seeds
(each seed: its own split, initialisation, shuffling and dropout masks) is reported.

Times are fit's wall time, compilation included: the first seed of each model compiles
its training step and its evaluation, later seeds reuse the compiled step (fit caches
it) and are the steady-state time. ``seconds_per_epoch`` is the median epoch time over
epochs 2..E (from fit's history; it includes the per-epoch test evaluation).

Writes ``results.json`` (every number, every epoch of every seed) and ``curves.png``
(training loss and test accuracy per epoch, both models, every seed) to the results
folder and prints a Markdown table and the target line.

    python experiments/cnn_digits.py --help
    python experiments/cnn_digits.py --quick          # toy size, a few seconds
"""

from __future__ import annotations

import argparse
import time
from typing import Dict, List

import jax
import numpy as np
import optax

import funcnet as fnet
from _common import (add_compilation_cache_flag, enable_compilation_cache, mlp, pyplot,
                     results_dir, save_figure, table, target_line, write_json)

TARGET = 0.98
CNN, MLP = "CNN", "MLP"


def cnn(dropout: float = 0.25, classes: int = 10):
    """The experiment's convolutional network (input (8, 8, 1), channels last)."""
    return fnet.chain(fnet.conv(16, 3, padding="SAME"), fnet.relu,
                      fnet.conv(32, 3, padding="SAME"), fnet.relu,
                      fnet.max_pool(2), fnet.flatten, fnet.dropout(dropout),
                      fnet.dense(64), fnet.relu, fnet.dense(classes), name="cnn")


def count_params(params) -> int:
    return int(sum(np.size(leaf) for leaf in jax.tree.leaves(params)))


def train(model, net, params, x_train, y_train, x_test, y_test, optimizer, args, seed):
    loss = fnet.losses.softmax_cross_entropy
    start = time.perf_counter()
    result = fnet.fit(net, loss, optimizer, params, x_train, y_train,
                      key=jax.random.key(seed + 1), epochs=args.epochs,
                      batch_size=args.batch_size, eval_data=(x_test, y_test),
                      progress=not args.no_progress)
    seconds = time.perf_counter() - start
    test = fnet.evaluate(net, loss, result.params, x_test, y_test)  # dropout off (no key)
    times = np.array([row["time"] for row in result.history.epochs])
    steady = np.diff(times)
    return {
        "model": model, "seed": seed, "params": count_params(params),
        "test_accuracy": test["accuracy"], "test_loss": test["loss"],
        "test_errors": int(round((1 - test["accuracy"]) * len(y_test))),
        "final_train_loss": float(result.history.epochs[-1]["train_loss"]),
        "seconds": seconds,
        "seconds_per_epoch": float(np.median(steady)) if steady.size else None,
        "steps": int(result.state.step),
        "epochs": result.history.epochs,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0,
                        help="first PRNG seed (split and init; seed + 1: shuffling, dropout)")
    parser.add_argument("--runs", type=int, default=3,
                        help="seeds to run, seed .. seed + runs - 1 (the spread is reported)")
    parser.add_argument("--results", default="results/cnn_digits", help="results folder")
    parser.add_argument("--epochs", type=int, default=40, help="training epochs of every run")
    parser.add_argument("--batch-size", type=int, default=64, help="examples per step")
    parser.add_argument("--learning-rate", type=float, default=3e-3,
                        help="Adam's initial step size (cosine-decayed to 0 over the run)")
    parser.add_argument("--dropout", type=float, default=0.25, help="the CNN's dropout rate")
    parser.add_argument("--hidden", type=int, nargs="+", default=[256, 256],
                        help="the reference MLP's hidden widths (digits.py's default)")
    parser.add_argument("--quick", action="store_true",
                        help="toy size for the test suite (1 seed, 2 epochs, MLP hidden 32)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_compilation_cache_flag(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.runs, args.epochs, args.hidden = 1, 2, [32]
    if args.runs < 1 or args.epochs < 1:
        parser.error("--runs and --epochs must be at least 1")
    enable_compilation_cache(args.compilation_cache)

    folder = results_dir(args.results)
    seeds = list(range(args.seed, args.seed + args.runs))
    nets = {CNN: cnn(args.dropout), MLP: mlp(args.hidden)}
    runs: Dict[str, List[dict]] = {CNN: [], MLP: []}
    n_train = n_test = None
    optimizers: Dict[int, optax.GradientTransformation] = {}
    for seed in seeds:
        data = fnet.data.load_digits(seed=seed)
        n_train, n_test = int(data.x_train.shape[0]), int(data.x_test.shape[0])
        steps = args.epochs * (n_train // args.batch_size)
        # one optimizer object for every seed: fit caches its compiled step on (net, loss,
        # optimizer), so later seeds reuse it
        if steps not in optimizers:
            optimizers[steps] = optax.adam(optax.cosine_decay_schedule(args.learning_rate, steps))
        images = {"train": data.x_train.reshape(-1, 8, 8, 1),
                  "test": data.x_test.reshape(-1, 8, 8, 1)}
        for model, net in nets.items():
            if model == CNN:
                x_train, x_test, in_shape = images["train"], images["test"], (8, 8, 1)
            else:
                x_train, x_test, in_shape = data.x_train, data.x_test, data.x_train.shape[1:]
            params, _ = net.init(jax.random.key(seed), in_shape)
            run = train(model, net, params, x_train, data.y_train, x_test, data.y_test,
                        optimizers[steps], args, seed)
            run["compiled"] = seed == seeds[0]
            runs[model].append(run)

    summary = {}
    for model, model_runs in runs.items():
        accuracies = np.array([run["test_accuracy"] for run in model_runs])
        summary[model] = {
            "params": model_runs[0]["params"],
            "test_accuracy_mean": float(accuracies.mean()),
            "test_accuracy_min": float(accuracies.min()),
            "test_accuracy_max": float(accuracies.max()),
            "test_accuracy_std": float(accuracies.std(ddof=1)) if len(accuracies) > 1 else 0.0,
            "seconds_first_run_compile_included": model_runs[0]["seconds"],
            "seconds_later_runs_median": (float(np.median([r["seconds"] for r in model_runs[1:]]))
                                          if len(model_runs) > 1 else None),
            "seconds_per_epoch_median": float(np.median(
                [r["seconds_per_epoch"] for r in model_runs if r["seconds_per_epoch"]] or [0.0])),
        }
    cnn_accuracies = [run["test_accuracy"] for run in runs[CNN]]
    met = all(a >= TARGET for a in cnn_accuracies)
    rows = [{c: run[c] for c in ("model", "seed", "params", "test_accuracy", "test_errors",
                                 "final_train_loss", "seconds", "seconds_per_epoch")}
            for model in runs for run in runs[model]]
    write_json(folder / "results.json", {
        "experiment": "cnn_digits", "seeds": seeds, "epochs": args.epochs,
        "batch_size": args.batch_size, "learning_rate": args.learning_rate,
        "schedule": "cosine decay to 0 over the run", "optimizer": "adam",
        "dropout": args.dropout, "mlp_hidden": args.hidden,
        "architecture": {CNN: "conv(16,3,SAME) relu conv(32,3,SAME) relu max_pool(2) flatten "
                              f"dropout({args.dropout}) dense(64) relu dense(10)",
                         MLP: " ".join(f"dense({w}) relu" for w in args.hidden) + " dense(10)"},
        "backend": jax.default_backend(), "n_train": n_train, "n_test": n_test,
        "timing": "seconds: wall time of fnet.fit, compilation included; the first seed of "
                  "each model compiles the step and the evaluation, later seeds reuse them. "
                  "seconds_per_epoch: median epoch time over epochs 2..E, per-epoch test "
                  "evaluation included",
        "target": {"description": f"CNN test accuracy >= {TARGET:.0%} on every seed",
                   "threshold": TARGET, "met": met, "cnn_accuracies": cnn_accuracies},
        "summary": summary, "rows": rows, "runs": runs,
    })
    save_figure(plot(runs), folder / "curves.png")
    print(table(rows, ["model", "seed", "params", "test_accuracy", "test_errors",
                       "final_train_loss", "seconds", "seconds_per_epoch"]))
    for model, s in summary.items():
        print(f"{model}: {s['params']} params, test accuracy mean {s['test_accuracy_mean']:.4f} "
              f"(min {s['test_accuracy_min']:.4f}, max {s['test_accuracy_max']:.4f}, "
              f"{len(seeds)} seed(s)); first run {s['seconds_first_run_compile_included']:.1f} s "
              f"compilation included")
    print(target_line(f"CNN test accuracy >= {TARGET:.0%} on every seed", met,
                      ", ".join(f"seed {seed}: {a:.4f}" for seed, a in zip(seeds, cnn_accuracies))))
    print(f"\nwrote {folder / 'results.json'} and {folder / 'curves.png'}")
    return {"summary": summary, "runs": runs, "met": met}


def plot(runs):
    plt = pyplot()
    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {CNN: "tab:blue", MLP: "tab:orange"}
    for model, model_runs in runs.items():
        for k, run in enumerate(model_runs):
            epochs = [row["epoch"] + 1 for row in run["epochs"]]
            label = model if k == 0 else None
            loss_axis.plot(epochs, [row["train_loss"] for row in run["epochs"]],
                           color=colors[model], alpha=0.8, label=label)
            accuracy_axis.plot(epochs, [row["eval_accuracy"] for row in run["epochs"]],
                               color=colors[model], alpha=0.8, marker=".", markersize=3,
                               label=f"{model} seed {run['seed']} "
                                     f"(final {run['test_accuracy']:.3f})")
    accuracy_axis.axhline(TARGET, color="k", linestyle="--", linewidth=1,
                          label=f"target {TARGET:.0%}")
    loss_axis.set_yscale("log")
    loss_axis.set_ylabel("training loss (epoch mean; CNN with dropout)")
    loss_axis.set_title("training loss per epoch")
    accuracy_axis.set_ylabel("test accuracy")
    accuracy_axis.set_ylim(max(0.0, min(0.9, accuracy_axis.get_ylim()[0])), 1.0)
    accuracy_axis.set_title("test accuracy per epoch (one line per seed)")
    for axis in (loss_axis, accuracy_axis):
        axis.set_xlabel("epoch")
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    return figure


if __name__ == "__main__":
    main()
