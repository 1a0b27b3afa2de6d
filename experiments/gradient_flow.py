"""Gradient flow: per-layer norms of q_i and p_i over training in deep sigmoid, tanh and
relu networks, showing the vanishing gradients the lecture notes predict for sigmoid.

For each activation, a chain of ``--depth`` blocks dense(width) -> activation (plus an
output layer) is trained on digits with mini-batch SGD. After every epoch,
``fnet.backprop`` on a fixed batch gives every cotangent q_i = d loss / d z_i and every
parameter gradient p_i; their norms, per layer, are recorded. Since
q_i = B_i^T q_{i+1} and a sigmoid layer's B_i = diag(sigmoid'(z)) has entries <= 1/4,
||q_i|| shrinks geometrically towards the input in the sigmoid net.

Writes ``results.json`` (all norms) and ``gradient_flow.png``.

    python experiments/gradient_flow.py --help
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

import funcnet as fnet
from _common import results_dir, save_figure, table, write_json

ACTIVATIONS = {"sigmoid": fnet.sigmoid, "tanh": fnet.tanh, "relu": fnet.relu}


def deep_net(activation, depth, width):
    layers = []
    for _ in range(depth):
        layers += [fnet.dense(width), activation]
    return fnet.chain(*layers, fnet.dense(10), name=f"{depth}x{width} {activation.name}")


def layer_norms(record: fnet.Backprop, net: fnet.Chain):
    """(||q_i|| for i = 1..L+1, ||p_i|| for the layers with params) of one record."""
    q = [float(jnp.linalg.norm(c)) for c in record.cotangents]
    p = [float(jnp.sqrt(sum(jnp.sum(jnp.square(leaf)) for leaf in jax.tree.leaves(g))))
         for layer, g in zip(net.layers, record.grads) if jax.tree.leaves(g)]
    return q, p


def run(name, activation, data, args):
    net = deep_net(activation, args.depth, args.width)
    params, _ = net.init(jax.random.key(args.seed), data.x_train.shape[1:])
    loss = fnet.losses.softmax_cross_entropy
    probe_x, probe_y = data.x_train[:256], data.y_train[:256]
    probe = jax.jit(lambda p: fnet.backprop(net, loss, p, probe_x, probe_y))
    snapshots = [layer_norms(probe(params), net)]

    def record(epoch, state):
        snapshots.append(layer_norms(probe(state.params), net))

    result = fnet.fit(net, loss, optax.sgd(args.learning_rate), params, data.x_train,
                      data.y_train, key=jax.random.key(args.seed + 1), epochs=args.epochs,
                      batch_size=args.batch_size, eval_data=(data.x_test, data.y_test),
                      progress=not args.no_progress, on_epoch_end=record)
    q_norms = np.array([q for q, _ in snapshots])
    p_norms = np.array([p for _, p in snapshots])
    return {
        "q_norms": q_norms.tolist(), "p_norms": p_norms.tolist(),
        "test_accuracy": result.history.epochs[-1]["eval_accuracy"],
        "final_train_loss": result.history.epochs[-1]["train_loss"],
        # how much weaker the first layer's gradient is than the last one's, at init
        "p_first_over_last_at_init": float(p_norms[0, 0] / p_norms[0, -1]),
        "q_input_over_output_at_init": float(q_norms[0, 0] / q_norms[0, -1]),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed")
    parser.add_argument("--results", default="results/gradient_flow", help="results folder")
    parser.add_argument("--depth", type=int, default=12, help="hidden blocks (>= 12 for the claim)")
    parser.add_argument("--width", type=int, default=64, help="hidden width")
    parser.add_argument("--epochs", type=int, default=10, help="training epochs")
    parser.add_argument("--batch-size", type=int, default=64, help="examples per step")
    parser.add_argument("--learning-rate", type=float, default=0.05, help="SGD step size")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = parser.parse_args(argv)

    folder = results_dir(args.results)
    data = fnet.data.load_digits(seed=args.seed)
    runs = {name: run(name, activation, data, args) for name, activation in ACTIVATIONS.items()}
    rows = [{"activation": name, "p_1 / p_L at init": r["p_first_over_last_at_init"],
             "q_1 / q_L+1 at init": r["q_input_over_output_at_init"],
             "test_accuracy": r["test_accuracy"], "final_train_loss": r["final_train_loss"]}
            for name, r in runs.items()]
    write_json(folder / "results.json", {"experiment": "gradient_flow", "seed": args.seed,
                                         "depth": args.depth, "width": args.width,
                                         "epochs": args.epochs, "runs": runs})
    save_figure(plot(runs), folder / "gradient_flow.png")
    print(table(rows, list(rows[0])))
    print(f"\nwrote {folder / 'results.json'} and {folder / 'gradient_flow.png'}")
    return runs


def plot(runs):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, len(runs), figsize=(4.2 * len(runs), 7), sharey="row")
    for column, (name, run_) in enumerate(runs.items()):
        q, p = np.asarray(run_["q_norms"]), np.asarray(run_["p_norms"])
        colors = plt.cm.viridis(np.linspace(0, 1, len(q)))
        for snapshot, color in enumerate(colors):
            label = "init" if snapshot == 0 else (f"epoch {snapshot}" if snapshot == len(q) - 1 else None)
            axes[0, column].semilogy(np.arange(1, q.shape[1] + 1), q[snapshot], color=color, label=label)
            axes[1, column].semilogy(np.arange(1, p.shape[1] + 1), p[snapshot], color=color, label=label)
        axes[0, column].set_title(name)
        axes[0, column].set_xlabel("i (z_i, input = 1)")
        axes[1, column].set_xlabel("dense layer (input side = 1)")
        axes[0, column].legend()
    axes[0, 0].set_ylabel("||q_i||  (d loss / d z_i)")
    axes[1, 0].set_ylabel("||p_i||  (d loss / d w_i)")
    figure.suptitle("gradient flow per layer over training (colour: epoch)")
    figure.tight_layout()
    return figure


if __name__ == "__main__":
    main()
