"""Memory: bytes needed by materialised per-layer Jacobians versus vector-Jacobian
products versus each remat policy, over depth and width (the notes' argument, measured),
with plots.

The lecture notes' argument: storing every layer's Jacobians A_i = d g_i / d w_i
(n_{i+1} x r_i, r_i the layer's parameter count) and B_i = d g_i / d z_i (n_{i+1} x n_i)
costs, per example, sum_i n_{i+1} (r_i + n_i) numbers: for dense layers of width W that is
W^3 (A_i) + W^2 (B_i) per layer, per example. Backpropagating vectors instead
(q_i = B_i^T q_{i+1}, one vector-Jacobian product per layer) needs only the activations
z_i, sum_i n_i numbers per example: linear in width.

For chains of ``depth`` blocks dense(W) -> tanh over a batch of B examples (float32):

- materialised Jacobians: B * sum_i n_{i+1} (r_i + n_i) * 4 bytes over the top-level
  layers (a tanh layer's B_i counted as the dense n x n matrix that
  ``fnet.layer_jacobians`` returns), counted from the shapes and checked on a tiny chain
  against the sizes of the arrays ``fnet.layer_jacobians`` actually returns;
- activations kept for the vjps: B * sum_i n_i * 4 bytes, the input z_i of every
  top-level layer (a tanh's residual is its output, the next dense layer's input, so XLA
  keeps about half of these for dense -> tanh chains);
- measured: the temporary memory XLA allocates for one jitted
  ``fnet.value_and_grad(net, loss, remat=policy)`` step, for the policies keep, sqrt and
  recompute (``compiled.memory_analysis().temp_size_in_bytes``; only compiled, never run).

XLA may place an activation in a gradient's output buffer before that gradient is
written; such an activation is then not counted as temporary memory. With the batch at
least the widest width, an activation (B x W) never fits in a gradient buffer (W x W), so
the default batch is twice the widest width. The temp + output bytes are recorded too.

Writes ``results.json`` (every count and measurement), ``memory_vs_width.png`` and
``memory_vs_depth.png`` (log-log), and prints a Markdown table.

    python experiments/memory.py --help
"""

from __future__ import annotations

import argparse
import math

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

import funcnet as fnet
from _common import results_dir, save_figure, table, write_json

POLICIES = ("keep", "sqrt", "recompute")
ITEMSIZE = 4  # float32


def tanh_chain(width: int, depth: int):
    layers = []
    for _ in range(depth):
        layers += [fnet.dense(width), fnet.tanh]
    return fnet.chain(*layers, name=f"{depth}x(dense({width}) -> tanh)")


def layer_shapes(net, in_width: int):
    """Per top-level layer: (n_i, n_{i+1}, r_i), from abstract shapes only (nothing is
    initialised: the widths come from the Jacobian plan, the parameter counts from
    ``jax.eval_shape`` of init)."""
    widths = fnet.jacobian_plan(net, (in_width,)).widths
    params = jax.eval_shape(lambda: net.init(jax.random.key(0), (in_width,))[0])
    counts = [sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(p)) for p in params]
    return [(widths[i], widths[i + 1], counts[i]) for i in range(len(net.layers))]


def analytic_bytes(net, in_width: int, batch: int):
    """Bytes of the materialised A_i, B_i and of the layer inputs z_i, for ``batch``."""
    shapes = layer_shapes(net, in_width)
    a = batch * sum(n_out * r for _, n_out, r in shapes) * ITEMSIZE
    b = batch * sum(n_out * n_in for n_in, n_out, _ in shapes) * ITEMSIZE
    activations = batch * sum(n_in for n_in, _, _ in shapes) * ITEMSIZE
    return {"jacobians_A": a, "jacobians_B": b, "jacobians": a + b, "activations": activations}


def verify_layer_jacobians(width: int, depth: int, seed: int):
    """The analytic per-example count against the arrays fnet.layer_jacobians returns."""
    net = tanh_chain(width, depth)
    params = jax.jit(lambda key: jax.tree.map(lambda a: a.astype(jnp.float32),
                                              net.init(key, (width,))[0]))(jax.random.key(seed))
    x = jax.random.normal(jax.random.key(seed + 1), (width,), jnp.float32)
    pairs = jax.jit(lambda p, xi: fnet.layer_jacobians(net, p, xi))(params, x)
    actual_a = sum(leaf.nbytes for a, _ in pairs for leaf in jax.tree.leaves(a))
    actual_b = sum(b.nbytes for _, b in pairs)
    counted = analytic_bytes(net, width, 1)
    return {"width": width, "depth": depth, "analytic_A": counted["jacobians_A"],
            "actual_A": int(actual_a), "analytic_B": counted["jacobians_B"],
            "actual_B": int(actual_b),
            "match": counted["jacobians_A"] == actual_a and counted["jacobians_B"] == actual_b}


def measured_bytes(net, width: int, batch: int):
    """Compiled memory of one value_and_grad step per remat policy (compiled, not run)."""
    params = jax.eval_shape(lambda: net.init(jax.random.key(0), (width,))[0])
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.float32), params)
    x = jax.ShapeDtypeStruct((batch, width), jnp.float32)
    found = {}
    for policy in POLICIES:
        step = jax.jit(fnet.value_and_grad(net, fnet.losses.squared_error, remat=policy))
        analysis = step.lower(params, x, x).compile().memory_analysis()
        found[policy] = {"temp": int(analysis.temp_size_in_bytes),
                         "output": int(analysis.output_size_in_bytes),
                         "argument": int(analysis.argument_size_in_bytes),
                         "temp_plus_output": int(analysis.temp_size_in_bytes
                                                 + analysis.output_size_in_bytes)}
    return found


def point(width: int, depth: int, batch: int):
    net = tanh_chain(width, depth)
    counted = analytic_bytes(net, width, batch)
    measured = measured_bytes(net, width, batch)
    activation = batch * width * ITEMSIZE
    return {"width": width, "depth": depth, "batch": batch, **counted,
            "jacobians_over_activations": counted["jacobians"] / counted["activations"],
            "measured": measured, "one_activation": activation,
            "temp_in_activations": {p: m["temp"] / activation for p, m in measured.items()}}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed (tiny verification)")
    parser.add_argument("--results", default="results/memory", help="results folder")
    parser.add_argument("--widths", type=int, nargs="+", default=[16, 32, 64, 128, 256, 512, 1024],
                        help="widths W of the width sweep (at --depth)")
    parser.add_argument("--depths", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64],
                        help="depths L (dense -> tanh blocks) of the depth sweep (at --width)")
    parser.add_argument("--depth", type=int, default=8, help="depth of the width sweep")
    parser.add_argument("--width", type=int, default=256, help="width of the depth sweep")
    parser.add_argument("--batch", type=int, default=None,
                        help="batch size B (default: twice the widest width)")
    parser.add_argument("--quick", action="store_true",
                        help="toy size (widths 8..64 at depth 4, depths 1, 4, 12 at width 32)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = parser.parse_args(argv)
    if args.quick:
        args.widths, args.depth = [8, 16, 32, 64], 4
        args.depths, args.width = [1, 4, 12], 32
    batch = args.batch or 2 * max(args.widths + [args.width])

    folder = results_dir(args.results)
    verification = [verify_layer_jacobians(5, 3, args.seed)]
    configurations = ([("width", w, args.depth) for w in args.widths]
                      + [("depth", args.width, l) for l in args.depths])
    sweeps, done = {"width": [], "depth": []}, {}
    for sweep, width, depth in tqdm(configurations, disable=args.no_progress, unit="net"):
        if (width, depth) not in done:  # the sweeps cross at (args.width, args.depth)
            done[width, depth] = point(width, depth, batch)
        sweeps[sweep].append(done[width, depth])

    rows = [{"sweep": sweep, "W": p["width"], "L": p["depth"],
             "Jacobians MiB": p["jacobians"] / 2**20, "activations MiB": p["activations"] / 2**20,
             "Jacobians / activations": p["jacobians_over_activations"],
             **{f"{policy} temp MiB": p["measured"][policy]["temp"] / 2**20 for policy in POLICIES}}
            for sweep, points in sweeps.items() for p in points]
    write_json(folder / "results.json", {
        "experiment": "memory", "seed": args.seed, "batch": batch, "dtype": "float32",
        "itemsize": ITEMSIZE, "backend": jax.default_backend(), "depth_of_width_sweep": args.depth,
        "width_of_depth_sweep": args.width, "verification": verification,
        "verified": all(v["match"] for v in verification), "sweeps": sweeps, "rows": rows,
    })
    save_figure(plot(sweeps["width"], "width", f"depth {args.depth}, batch {batch}"),
                folder / "memory_vs_width.png")
    save_figure(plot(sweeps["depth"], "depth", f"width {args.width}, batch {batch}"),
                folder / "memory_vs_depth.png")
    print(table(rows, list(rows[0])))
    print(f"\nanalytic Jacobian bytes match fnet.layer_jacobians on a tiny chain: "
          f"{all(v['match'] for v in verification)}")
    print(f"\nwrote {folder / 'results.json'}, {folder / 'memory_vs_width.png'} and "
          f"{folder / 'memory_vs_depth.png'}")
    return rows


def plot(points, along, fixed):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.array([p[along] for p in points])
    figure, axis = plt.subplots(figsize=(7, 5))
    axis.plot(x, [p["jacobians"] for p in points], "k-o", label="materialised A_i and B_i")
    axis.plot(x, [p["jacobians_B"] for p in points], "k:", label="materialised B_i only")
    axis.plot(x, [p["activations"] for p in points], "k--s", label="activations z_i (vjp)")
    styles = {"keep": ("-^", 7), "sqrt": ("--v", 7), "recompute": (":D", 4)}  # may overlap
    for policy, color in zip(POLICIES, ("C0", "C1", "C2")):
        style, size = styles[policy]
        axis.plot(x, [p["measured"][policy]["temp"] for p in points], style, color=color,
                  markersize=size, label=f"measured temp, remat={policy}")
    axis.set_xscale("log", base=2)
    axis.set_yscale("log")
    axis.set_xlabel("width W" if along == "width" else "depth L (dense -> tanh blocks)")
    axis.set_ylabel("bytes")
    axis.set_title(f"memory of one gradient step against {along} ({fixed}, float32)")
    axis.legend(fontsize=8)
    figure.tight_layout()
    return figure


if __name__ == "__main__":
    main()
