"""Gradient noise: per-layer variance and signal-to-noise ratio of the per-example
gradients over the training of an MLP on digits (BackPACK's gradient-noise plot).

An MLP of ``--hidden`` relu layers trains with mini-batch SGD (``fnet.train_step`` in a
loop over shuffled mini-batches). Every ``--every`` steps, one ``fnet.backprop`` over a
fixed probe set (the whole training set by default) with the extensions
``fnet.extensions.variance()`` and ``fnet.extensions.second_moment()`` gives, for every
parameter entry j of every dense layer, the mean gradient mean_b g_bj (``record.grads``),
the second moment mean_b g_bj^2 and the (biased) variance Var_b g_bj over the probe's
examples. Per layer (kernel and bias together) it records

- the gradient variance: sum_j Var_b g_bj (and its mean over the layer's entries);
- the signal-to-noise ratio ||E g||^2 / sum_j Var g_j (the squared norm of the mean
  gradient over the total variance: the per-example SNR; a mini-batch of b examples
  drawn with replacement has b times this SNR);
- BackPACK's SNR: the mean over the layer's entries of (E g_j)^2 / Var g_j, over the
  entries whose variance float32 resolves (Var g_j > 1e-6 mean_b g_bj^2; entries whose
  gradient is 0 for every example, e.g. the weights of a constant input pixel, are left
  out and counted).

With the probe the whole training set, E and Var are exact over the training set, not
estimates. Writes ``results.json`` (every snapshot) and ``gradient_noise.png`` (variance
and both SNRs per layer against steps, log scale) and prints a Markdown table.

    python experiments/gradient_noise.py --help
    python experiments/gradient_noise.py --quick          # toy size, under ten seconds
"""

from __future__ import annotations

import argparse
from typing import Dict, List

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import funcnet as fnet
from _common import (add_compilation_cache_flag, enable_compilation_cache, mlp, results_dir,
                     save_figure, table, write_json)

#: Var g_j below this fraction of mean_b g_bj^2 is not resolved by float32's
#: mean_b g^2 - (mean_b g)^2; such entries are left out of the per-entry SNR
RESOLVED = 1e-6


def layer_statistics(net, loss):
    """A jitted ``probe(params, x, y) -> (loss, {statistic: (layers,) array})`` over the
    dense layers (the top-level layers with params), from one backprop with the variance
    and second-moment extensions."""
    extensions = (fnet.extensions.variance(), fnet.extensions.second_moment())

    @jax.jit
    def probe(params, x, y):
        record = fnet.backprop(net, loss, params, x, y, extensions=extensions)
        rows = {name: [] for name in ("grad_sq_norm", "variance_sum", "variance_mean",
                                      "snr", "snr_entries", "unresolved", "entries")}
        for mean, variance, moment in zip(record.grads, record.extensions["variance"],
                                          record.extensions["second_moment"]):
            if not jax.tree.leaves(mean):
                continue  # an activation: no params
            p = jnp.concatenate([leaf.ravel() for leaf in jax.tree.leaves(mean)])
            v = jnp.concatenate([leaf.ravel() for leaf in jax.tree.leaves(variance)])
            m = jnp.concatenate([leaf.ravel() for leaf in jax.tree.leaves(moment)])
            resolved = v > RESOLVED * m  # (m = 0: every example's gradient is 0 there)
            ratio = jnp.where(resolved, p * p / jnp.where(resolved, v, 1.0), 0.0)
            total = jnp.sum(jnp.maximum(v, 0.0))
            rows["grad_sq_norm"].append(jnp.sum(p * p))
            rows["variance_sum"].append(total)
            rows["variance_mean"].append(total / p.size)
            rows["snr"].append(jnp.sum(p * p) / total)
            rows["snr_entries"].append(jnp.sum(ratio) / jnp.maximum(jnp.sum(resolved), 1))
            rows["unresolved"].append(jnp.sum(~resolved))
            rows["entries"].append(jnp.asarray(p.size))
        return record.value, {name: jnp.stack(values) for name, values in rows.items()}

    return probe


def train(data, args) -> Dict[str, object]:
    net = mlp(args.hidden)
    loss = fnet.losses.softmax_cross_entropy
    params, _ = net.init(jax.random.key(args.seed), data.x_train.shape[1:])
    optimizer = optax.sgd(args.learning_rate)
    step = fnet.train_step(net, loss, optimizer)
    state = fnet.init_train_state(params, optimizer)
    n = data.x_train.shape[0]
    probe_size = n if args.probe_size in (0, None) else min(args.probe_size, n)
    probe_x = jnp.asarray(data.x_train[:probe_size])
    probe_y = jnp.asarray(data.y_train[:probe_size])
    x_test, y_test = jnp.asarray(data.x_test), jnp.asarray(data.y_test)
    probe = layer_statistics(net, loss)
    test_accuracy = jax.jit(lambda p: fnet.accuracy(net.apply(p, x_test), y_test))

    rng = np.random.default_rng(args.seed + 1)  # the mini-batches' shuffling
    steps_per_epoch = n // args.batch_size
    snapshots: List[Dict[str, object]] = []
    order = None
    for t in tqdm(range(args.steps + 1), disable=args.no_progress, unit="step"):
        if t % args.every == 0 or t == args.steps:
            value, stats = jax.device_get(probe(state.params, probe_x, probe_y))
            snapshots.append({"step": t, "train_loss": float(value),
                              "test_accuracy": float(test_accuracy(state.params)),
                              **{name: np.asarray(v).tolist() for name, v in stats.items()}})
        if t == args.steps:
            break
        if t % steps_per_epoch == 0:
            order = rng.permutation(n)
        batch = order[(t % steps_per_epoch) * args.batch_size:][:args.batch_size]
        state, _ = step(state, data.x_train[batch], data.y_train[batch])
    names = [f"dense {k + 1}" for k in range(len(args.hidden) + 1)]
    return {"layers": names, "probe_size": int(probe_size), "snapshots": snapshots}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0,
                        help="PRNG seed (split, init; seed + 1: mini-batch shuffling)")
    parser.add_argument("--results", default="results/gradient_noise", help="results folder")
    parser.add_argument("--hidden", type=int, nargs="+", default=[64, 64, 64],
                        help="hidden layer widths")
    parser.add_argument("--steps", type=int, default=1000, help="SGD steps")
    parser.add_argument("--every", type=int, default=10, help="steps between snapshots")
    parser.add_argument("--batch-size", type=int, default=32, help="examples per step")
    parser.add_argument("--learning-rate", type=float, default=0.1, help="SGD step size")
    parser.add_argument("--probe-size", type=int, default=0,
                        help="training examples the statistics are taken over (0: all)")
    parser.add_argument("--quick", action="store_true",
                        help="toy size (hidden 16 16, 60 steps, a snapshot every 10)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_compilation_cache_flag(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.hidden, args.steps, args.every = [16, 16], 60, 10
    if args.every < 1 or args.steps < 1:
        parser.error("--steps and --every must be positive")
    enable_compilation_cache(args.compilation_cache)

    folder = results_dir(args.results)
    data = fnet.data.load_digits(seed=args.seed)
    run = train(data, args)
    first, last = run["snapshots"][0], run["snapshots"][-1]
    rows = [{"layer": name, "snr at step 0": first["snr"][k],
             f"snr at step {last['step']}": last["snr"][k],
             "backpack snr at step 0": first["snr_entries"][k],
             f"backpack snr at step {last['step']}": last["snr_entries"][k],
             "variance_sum at step 0": first["variance_sum"][k],
             f"variance_sum at step {last['step']}": last["variance_sum"][k]}
            for k, name in enumerate(run["layers"])]
    write_json(folder / "results.json", {
        "experiment": "gradient_noise", "seed": args.seed, "hidden": args.hidden,
        "steps": args.steps, "every": args.every, "batch_size": args.batch_size,
        "learning_rate": args.learning_rate, "optimizer": "sgd", "dataset": "digits",
        "n_train": int(data.x_train.shape[0]), "backend": jax.default_backend(),
        "resolved_fraction": RESOLVED, "summary": rows, **run,
    })
    save_figure(plot(run, args.batch_size), folder / "gradient_noise.png")
    print(table(rows, list(rows[0])))
    print(f"\nwrote {folder / 'results.json'} and {folder / 'gradient_noise.png'}")
    return run


def plot(run, batch_size):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.array([s["step"] for s in run["snapshots"]])
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.3))
    panels = [("variance_sum", r"gradient variance $\sum_j \mathrm{Var}_b\, g_{bj}$"),
              ("snr", r"SNR $\|E g\|^2 / \sum_j \mathrm{Var}\, g_j$"),
              ("snr_entries", r"BackPACK SNR: mean$_j$ $(E g_j)^2 / \mathrm{Var}\, g_j$")]
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(run["layers"])))
    for axis, (key, title) in zip(axes, panels):
        values = np.array([s[key] for s in run["snapshots"]])
        for k, (name, color) in enumerate(zip(run["layers"], colors)):
            axis.plot(steps, values[:, k], color=color, label=name)
        if key == "snr":
            axis.axhline(1 / batch_size, color="k", linestyle=":",
                         label=f"1 / batch size ({batch_size})")
        axis.set_yscale("log")
        axis.set_xlabel("SGD step")
        axis.set_title(title, fontsize=10)
        axis.grid(True, which="major", alpha=0.3)
        axis.legend(fontsize=8, loc="lower left")
    figure.suptitle(f"per-example gradient noise per layer over training "
                    f"(statistics over {run['probe_size']} training examples)")
    figure.tight_layout()
    return figure


if __name__ == "__main__":
    main()
