"""Breast cancer: binary classification with the logistic loss, trained with funcnet.

A small MLP with one output logit, the logistic loss (log-sigmoid, stable), Adam on
mini-batches. Writes ``results.json`` (per-epoch train and test loss and accuracy) and
``curves.png`` (loss and accuracy curves) and prints the final numbers.

    python experiments/breast_cancer.py --help
"""

from __future__ import annotations

import argparse

import jax
import optax

import funcnet as fnet
from _common import results_dir, save_figure, table, write_json


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed (init, split, shuffling)")
    parser.add_argument("--results", default="results/breast_cancer", help="results folder")
    parser.add_argument("--epochs", type=int, default=60, help="training epochs")
    parser.add_argument("--batch-size", type=int, default=32, help="examples per step")
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="Adam step size")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)

    folder = results_dir(args.results)
    data = fnet.data.load_breast_cancer(seed=args.seed)
    net = fnet.chain(fnet.dense(32), fnet.relu, fnet.dense(16), fnet.relu, fnet.dense(1),
                     name="mlp")
    params, _ = net.init(jax.random.key(args.seed), data.x_train.shape[1:])
    loss = fnet.losses.logistic
    result = fnet.fit(net, loss, optax.adam(args.learning_rate), params, data.x_train,
                      data.y_train, key=jax.random.key(args.seed + 1), epochs=args.epochs,
                      batch_size=args.batch_size, eval_data=(data.x_test, data.y_test),
                      progress=not args.no_progress)
    epochs = result.history.epochs
    train = fnet.evaluate(net, loss, result.params, data.x_train, data.y_train)
    test = fnet.evaluate(net, loss, result.params, data.x_test, data.y_test)
    summary = {"train_loss": train["loss"], "train_accuracy": train["accuracy"],
               "test_loss": test["loss"], "test_accuracy": test["accuracy"],
               "epochs": args.epochs, "steps": int(result.state.step)}
    write_json(folder / "results.json", {"experiment": "breast_cancer", "seed": args.seed,
                                         "summary": summary, "epochs": epochs,
                                         "step_loss": result.history.step_loss.tolist()})
    save_figure(plot(epochs), folder / "curves.png")
    print(table([summary], list(summary)))
    print(f"\nwrote {folder / 'results.json'} and {folder / 'curves.png'}")
    return summary


def plot(epochs):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    index = [row["epoch"] + 1 for row in epochs]
    figure, (losses, accuracy) = plt.subplots(1, 2, figsize=(10, 4))
    losses.plot(index, [row["train_loss"] for row in epochs], label="train (epoch mean)")
    losses.plot(index, [row["eval_loss"] for row in epochs], label="test")
    losses.set_yscale("log")
    losses.set_xlabel("epoch")
    losses.set_ylabel("logistic loss")
    losses.legend()
    accuracy.plot(index, [row["eval_accuracy"] for row in epochs], color="tab:orange")
    accuracy.set_xlabel("epoch")
    accuracy.set_ylabel("test accuracy")
    figure.suptitle("breast cancer, logistic loss, Adam")
    figure.tight_layout()
    return figure


if __name__ == "__main__":
    main()
