"""Diabetes: least squares by gradient descent through funcnet equals numpy's lstsq.

A network of ONE dense layer, out = x @ w + b, with the squared-error loss is linear least
squares. Full-batch gradient descent with step 1/lambda_max (lambda_max the largest
eigenvalue of the loss's Hessian [x 1]^T [x 1] / n) converges to the minimiser, which
``numpy.linalg.lstsq`` gives in closed form. In float64 the two agree to 1e-6 or better.
Writes ``results.json`` and ``convergence.png`` (distance to the closed form per step).

    python experiments/diabetes.py --help
"""

from __future__ import annotations

import argparse

import jax

jax.config.update("jax_enable_x64", True)  # this experiment is about exactness

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import funcnet as fnet  # noqa: E402
from _common import results_dir, save_figure, table, write_json  # noqa: E402


def closed_form(x, y):
    """(w, b) minimising ||x w + b - y||^2, by numpy.linalg.lstsq on [x 1]."""
    design = np.c_[x, np.ones(len(x))]
    solution, *_ = np.linalg.lstsq(design, y, rcond=None)
    return solution[:-1], solution[-1]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed (init and split)")
    parser.add_argument("--results", default="results/diabetes", help="results folder")
    parser.add_argument("--steps", type=int, default=9000, help="gradient descent steps")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)

    folder = results_dir(args.results)
    data = fnet.data.load_diabetes(seed=args.seed, dtype=np.float64)
    net = fnet.dense(1)
    params, _ = net.init(jax.random.key(args.seed), data.x_train.shape[1:])
    design = np.c_[data.x_train, np.ones(len(data.x_train))]
    lambda_max = float(np.linalg.eigvalsh(design.T @ design / len(design)).max())
    w_star, b_star = closed_form(data.x_train, data.y_train)

    distances = []

    def distance(epoch, state):
        if epoch % 50 == 0 or epoch == args.steps - 1:
            gap = max(float(jnp.max(jnp.abs(state.params["w"] - w_star))),
                      float(jnp.max(jnp.abs(state.params["b"] - b_star))))
            distances.append((epoch + 1, gap))

    loss = fnet.losses.squared_error
    result = fnet.fit(net, loss, optax.sgd(1.0 / lambda_max), params, data.x_train,
                      data.y_train, key=jax.random.key(args.seed), epochs=args.steps,
                      batch_size=None, progress=not args.no_progress, on_epoch_end=distance)
    w, b = np.asarray(result.params["w"]), np.asarray(result.params["b"])
    summary = {
        "steps": args.steps, "step_size": 1.0 / lambda_max,
        "max_abs_diff_w": float(np.max(np.abs(w - w_star))),
        "max_abs_diff_b": float(np.max(np.abs(b - b_star))),
        "train_loss_gd": fnet.evaluate(net, loss, result.params, data.x_train, data.y_train)["loss"],
        "train_loss_lstsq": float(loss(jnp.asarray(data.x_train @ w_star + b_star), data.y_train)),
        "test_loss_gd": fnet.evaluate(net, loss, result.params, data.x_test, data.y_test)["loss"],
    }
    summary["matches_lstsq_to_1e-6"] = max(summary["max_abs_diff_w"], summary["max_abs_diff_b"]) <= 1e-6
    write_json(folder / "results.json", {"experiment": "diabetes", "seed": args.seed,
                                         "summary": summary, "distance": distances,
                                         "w_gd": w.ravel().tolist(), "w_lstsq": w_star.ravel().tolist()})
    save_figure(plot(distances), folder / "convergence.png")
    print(table([summary], list(summary)))
    print(f"\nwrote {folder / 'results.json'} and {folder / 'convergence.png'}")
    return summary


def plot(distances):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    steps, gaps = zip(*distances)
    axis.semilogy(steps, gaps)
    axis.axhline(1e-6, color="gray", linestyle="--", label="1e-6")
    axis.set_xlabel("gradient descent step")
    axis.set_ylabel("max |(w, b) - lstsq solution|")
    axis.set_title("diabetes: gradient descent reaches the least-squares solution")
    axis.legend()
    figure.tight_layout()
    return figure


if __name__ == "__main__":
    main()
