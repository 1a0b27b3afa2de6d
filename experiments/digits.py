"""Digits: an MLP trained by full-batch GD, SGD, mini-batch SGD and Adam, with funcnet.

The four optimisers of the lecture notes are four settings of one ``fnet.fit`` call
(batch size and optax optimizer). scikit-learn's MLPClassifier on the same split, with the
same hidden sizes, batch size and optimizer as the Adam run, is the reference row.

Writes ``results.json`` (every number) and ``loss.png`` (training loss against steps and
against wall time) to the results folder and prints a Markdown table.

    python experiments/digits.py --help
    python experiments/digits.py --compilation-cache ~/.cache/funcnet-xla   # 2nd run: no compiling
"""

from __future__ import annotations

import argparse
import time
import warnings

import jax
import numpy as np
import optax

import funcnet as fnet
from _common import (add_compilation_cache_flag, enable_compilation_cache, mlp, results_dir,
                     save_figure, table, write_json)


def configurations(scale: float):
    """name -> (optax optimizer, batch size or None for full batch, epochs)."""
    def epochs(n):
        return max(1, int(round(n * scale)))

    return {
        "full-batch GD": (optax.sgd(0.5), None, epochs(300)),
        "SGD (batch 1)": (optax.sgd(0.01), 1, epochs(3)),
        "mini-batch SGD": (optax.sgd(0.1), 32, epochs(40)),
        "Adam": (optax.adam(1e-3), 64, epochs(30)),
    }


def sklearn_reference(data, hidden, epochs, seed):
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    model = MLPClassifier(hidden_layer_sizes=tuple(hidden), solver="adam", batch_size=64,
                          learning_rate_init=1e-3, max_iter=epochs, random_state=seed,
                          alpha=0.0, tol=0.0, n_iter_no_change=epochs + 1)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(data.x_train, data.y_train)
    seconds = time.perf_counter() - start
    return {"method": "scikit-learn MLPClassifier (Adam, batch 64)", "epochs": epochs,
            "steps": int(model.t_ // 64), "seconds": seconds,
            "test_accuracy": float(model.score(data.x_test, data.y_test)),
            "final_train_loss": float(model.loss_)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed (init, split, shuffling)")
    parser.add_argument("--results", default="results/digits", help="results folder")
    parser.add_argument("--hidden", type=int, nargs="+", default=[256, 256],
                        help="hidden layer widths")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply every run's epochs by this (0.05 for a smoke run)")
    parser.add_argument("--no-sklearn", action="store_true", help="skip the reference row")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_compilation_cache_flag(parser)
    args = parser.parse_args(argv)
    enable_compilation_cache(args.compilation_cache)

    folder = results_dir(args.results)
    data = fnet.data.load_digits(seed=args.seed)
    net = mlp(args.hidden)
    params, _ = net.init(jax.random.key(args.seed), data.x_train.shape[1:])
    loss = fnet.losses.softmax_cross_entropy

    runs, rows = {}, []
    for name, (optimizer, batch_size, epochs) in configurations(args.scale).items():
        start = time.perf_counter()
        result = fnet.fit(net, loss, optimizer, params, data.x_train, data.y_train,
                          key=jax.random.key(args.seed + 1), epochs=epochs,
                          batch_size=batch_size, eval_data=(data.x_test, data.y_test),
                          progress=not args.no_progress)
        seconds = time.perf_counter() - start
        test = fnet.evaluate(net, loss, result.params, data.x_test, data.y_test)
        runs[name] = {"step_loss": result.history.step_loss.tolist(),
                      "epochs": result.history.epochs}
        rows.append({"method": f"funcnet {name}", "epochs": epochs,
                     "steps": int(result.state.step), "seconds": seconds,
                     "test_accuracy": test["accuracy"],
                     "final_train_loss": result.history.epochs[-1]["train_loss"]})
    if not args.no_sklearn:
        adam_epochs = configurations(args.scale)["Adam"][2]
        rows.append(sklearn_reference(data, args.hidden, adam_epochs, args.seed))

    write_json(folder / "results.json", {
        "experiment": "digits", "seed": args.seed, "hidden": args.hidden,
        "backend": jax.default_backend(), "n_train": int(data.x_train.shape[0]),
        "n_test": int(data.x_test.shape[0]), "rows": rows, "runs": runs,
    })
    save_figure(plot(runs), folder / "loss.png")
    print(table(rows, ["method", "epochs", "steps", "seconds", "test_accuracy",
                       "final_train_loss"]))
    print(f"\nwrote {folder / 'results.json'} and {folder / 'loss.png'}")
    return rows


def plot(runs):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4))
    for name, run in runs.items():
        step_loss = np.asarray(run["step_loss"])
        window = max(1, len(step_loss) // 100)
        smooth = np.convolve(step_loss, np.ones(window) / window, mode="valid")
        by_step.plot(np.arange(1, len(smooth) + 1), smooth, label=name)
        by_time.plot([row["time"] for row in run["epochs"]],
                     [row["train_loss"] for row in run["epochs"]], marker=".", label=name)
    by_step.set_xscale("log")
    for axis, label in ((by_step, "step"), (by_time, "wall time (s), compile included")):
        axis.set_yscale("log")
        axis.set_xlabel(label)
        axis.set_ylabel("training loss")
        axis.legend()
    by_step.set_title("loss per step (moving average)")
    by_time.set_title("mean epoch loss against wall time")
    figure.tight_layout()
    return figure


if __name__ == "__main__":
    main()
