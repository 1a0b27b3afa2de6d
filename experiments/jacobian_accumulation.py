"""Jacobian accumulation: time and predicted FLOPs of forward, reverse and optimal over a
family of chain shapes, with plots of measured time against predicted cost.

Every shape is a chain dense(n_1) -> tanh -> ... -> dense(n_k) -> tanh on inputs of size
n_0, given by its width sequence n_0, n_1, ..., n_k: bottlenecks W, W/2, b, W/2, W of
several bottleneck widths b, an hourglass, a diamond (wide middle), a double bottleneck,
monotone up, monotone down and constant. For each, ``fnet.jacobian_plan`` predicts the
FLOPs of the input Jacobian of one example in forward mode (n_0 jvps), reverse mode
(n_k vjps) and by the optimal plan (segments in their own modes, multiplied in the
cheapest order), and ``fnet.jacobian(..., wrt="input", mode=...)`` is timed in each mode
(jitted, float32, median of interleaved repetitions after a warm-up), beside
``jax.jacfwd`` and ``jax.jacrev`` of the same network as references. Every Jacobian is
compared with ``jax.jacfwd``'s.

Writes ``results.json`` (plans, predicted FLOPs, every timing, agreement with jax),
``time_vs_flops.png`` (measured time against predicted FLOPs, log-log, all shapes and
modes: the cost model predicts time) and ``time_per_shape.png`` (the three modes' times
per shape), and prints a Markdown table.

    python experiments/jacobian_accumulation.py --help
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

import funcnet as fnet
from _common import results_dir, save_figure, table, write_json

MODES = ("forward", "reverse", "optimal")
REFERENCES = ("jax.jacfwd", "jax.jacrev")
# which of the plan's predicted costs a reference's work corresponds to
REFERENCE_COST = {"jax.jacfwd": "forward", "jax.jacrev": "reverse"}


def shapes(width: int, bottlenecks):
    """name -> width sequence n_0, ..., n_k, all scaled from the widest width ``width``."""
    w = width
    family = {f"bottleneck {b}": (w, w // 2, b, w // 2, w) for b in bottlenecks}
    family.update({
        "hourglass": (w, w // 2, w // 4, w // 16, w // 4, w // 2, w),
        "double bottleneck": (w, w // 16, w, w // 16, w),
        "diamond": (w // 16, w // 4, w, w // 4, w // 16),
        "monotone up": (w // 16, w // 8, w // 4, w // 2, w),
        "monotone down": (w, w // 2, w // 4, w // 8, w // 16),
        "constant": (w // 2,) * 5,
    })
    return family


QUICK_SHAPES = ["bottleneck 4", "bottleneck 16", "monotone up", "monotone down"]


def tanh_chain(widths):
    layers = []
    for n in widths[1:]:
        layers += [fnet.dense(n), fnet.tanh]
    return fnet.chain(*layers, name=" -> ".join(map(str, widths)))


def median_times(fns, repeats: int, warmup: int = 1):
    """{name: median seconds} of ``repeats`` interleaved calls of each zero-argument,
    blocking callable, after ``warmup`` untimed rounds (compilation)."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times = {name: [] for name in names}
    for round_ in range(repeats):
        shift = round_ % len(names)  # rotate who goes first: noise hits all alike
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def measure(name, widths, args):
    net = tanh_chain(widths)
    params = jax.jit(lambda key: jax.tree.map(lambda a: a.astype(jnp.float32),
                                              net.init(key, (widths[0],))[0]))(
        jax.random.key(args.seed))
    x = jax.random.normal(jax.random.key(args.seed + 1), (widths[0],), jnp.float32)
    plan = fnet.jacobian_plan(net, (widths[0],))

    def single(p, xi):
        return net.apply(p, xi[None])[0]

    functions = {mode: jax.jit(lambda p, xi, mode=mode: fnet.jacobian(net, p, xi, "input", mode))
                 for mode in MODES}
    functions["jax.jacfwd"] = jax.jit(jax.jacfwd(single, argnums=1))
    functions["jax.jacrev"] = jax.jit(jax.jacrev(single, argnums=1))
    jacobians = {key: np.asarray(f(params, x)) for key, f in functions.items()}
    reference = jacobians["jax.jacfwd"]
    seconds = median_times({key: (lambda f=f: jax.block_until_ready(f(params, x)))
                            for key, f in functions.items()}, args.repeats, warmup=1)
    predicted = {"forward": plan.forward_flops, "reverse": plan.reverse_flops,
                 "optimal": plan.predicted_flops}
    return {
        "widths": list(widths),
        "plan": {"widths": list(plan.widths), "order": plan.order, "text": str(plan),
                 "segments": [{"start": s.start, "stop": s.stop, "mode": s.mode,
                               "rows": plan.widths[s.stop], "columns": plan.widths[s.start],
                               "flops": s.flops} for s in plan.segments]},
        "n_segments": len(plan.segments),
        "predicted_flops": predicted,
        "seconds": seconds,
        "max_abs_diff_vs_jacfwd": {key: float(np.max(np.abs(j - reference)))
                                   for key, j in jacobians.items()},
        "jacobian_shape": list(reference.shape),
    }


def fit_loglog(runs):
    """Least-squares line log10(time) = slope * log10(FLOPs) + c over every funcnet and
    reference point, and the correlation of the logs."""
    flops, seconds = [], []
    for run in runs.values():
        for key, t in run["seconds"].items():
            flops.append(run["predicted_flops"][REFERENCE_COST.get(key, key)])
            seconds.append(t)
    lf, lt = np.log10(flops), np.log10(seconds)
    slope, intercept = np.polyfit(lf, lt, 1)
    return {"slope": float(slope), "intercept": float(intercept),
            "correlation": float(np.corrcoef(lf, lt)[0, 1]), "points": len(flops),
            "median_flops_per_second": float(np.median(np.asarray(flops) / np.asarray(seconds)))}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed (weights, input)")
    parser.add_argument("--results", default="results/jacobian_accumulation",
                        help="results folder")
    parser.add_argument("--width", type=int, default=512, help="widest width W of every shape")
    parser.add_argument("--bottlenecks", type=int, nargs="+", default=[4, 16, 64, 256],
                        help="bottleneck widths b of the shapes W, W/2, b, W/2, W")
    parser.add_argument("--shapes", nargs="+", default=None, metavar="NAME",
                        help="only these shapes of the family (default: all; names as in "
                        "the table, e.g. 'monotone up')")
    parser.add_argument("--repeats", type=int, default=15, help="timed repetitions per mode")
    parser.add_argument("--quick", action="store_true",
                        help="toy size (W = 64, bottlenecks 4 and 16, four shapes, 3 repetitions)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = parser.parse_args(argv)
    if args.quick:
        args.width, args.bottlenecks, args.repeats = 64, [4, 16], 3
        args.shapes = args.shapes or QUICK_SHAPES
    family = shapes(args.width, args.bottlenecks)
    if args.shapes:
        unknown = sorted(set(args.shapes) - set(family))
        if unknown:
            parser.error(f"unknown shapes {unknown}; the family is {list(family)}")
        family = {name: widths for name, widths in family.items() if name in args.shapes}

    folder = results_dir(args.results)
    runs = {}
    for name, widths in tqdm(family.items(), disable=args.no_progress, unit="shape"):
        runs[name] = measure(name, widths, args)
    fit = fit_loglog(runs)

    rows = []
    for name, run in runs.items():
        flops, seconds = run["predicted_flops"], run["seconds"]
        rows.append({
            "shape": name, "widths": "-".join(map(str, run["widths"])),
            "plan": " ".join(f"{s['mode'][0]}[{s['start']}:{s['stop']}]"
                             for s in run["plan"]["segments"]),
            "forward MFLOP": flops["forward"] / 1e6, "reverse MFLOP": flops["reverse"] / 1e6,
            "optimal MFLOP": flops["optimal"] / 1e6,
            "forward ms": seconds["forward"] * 1e3, "reverse ms": seconds["reverse"] * 1e3,
            "optimal ms": seconds["optimal"] * 1e3, "jacfwd ms": seconds["jax.jacfwd"] * 1e3,
            "jacrev ms": seconds["jax.jacrev"] * 1e3,
            "best plain / optimal time": min(seconds["forward"], seconds["reverse"])
            / seconds["optimal"],
            "max |optimal - jacfwd|": run["max_abs_diff_vs_jacfwd"]["optimal"],
        })
    write_json(folder / "results.json", {
        "experiment": "jacobian_accumulation", "seed": args.seed, "width": args.width,
        "bottlenecks": args.bottlenecks, "shapes": family, "repeats": args.repeats,
        "dtype": "float32", "backend": jax.default_backend(),
        "timing": "median of interleaved repetitions after one warm-up round, jitted, "
        "block_until_ready", "fit": fit, "runs": runs, "rows": rows,
    })
    save_figure(plot_scatter(runs, fit), folder / "time_vs_flops.png")
    save_figure(plot_bars(runs), folder / "time_per_shape.png")
    print(table(rows, list(rows[0])))
    print(f"\nlog-log fit of time against predicted FLOPs over {fit['points']} points: "
          f"slope {fit['slope']:.3g}, correlation {fit['correlation']:.3g}")
    print(f"\nwrote {folder / 'results.json'}, {folder / 'time_vs_flops.png'} and "
          f"{folder / 'time_per_shape.png'}")
    return rows


MARKERS = {"forward": ("o", "C0"), "reverse": ("s", "C1"), "optimal": ("*", "C2"),
           "jax.jacfwd": ("^", "C0"), "jax.jacrev": ("v", "C1")}


def plot_scatter(runs, fit):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 5.5))
    for key, (marker, color) in MARKERS.items():
        flops = [run["predicted_flops"][REFERENCE_COST.get(key, key)] for run in runs.values()]
        seconds = [run["seconds"][key] for run in runs.values()]
        hollow = key in REFERENCES
        axis.scatter(flops, seconds, marker=marker, s=90 if key == "optimal" else 45,
                     facecolors="none" if hollow else color, edgecolors=color,
                     label=f"{key}" + (" (at its mode's FLOPs)" if hollow else ""))
    lo = min(min(run["predicted_flops"].values()) for run in runs.values())
    hi = max(max(run["predicted_flops"].values()) for run in runs.values())
    grid = np.geomspace(lo, hi, 50)
    axis.plot(grid, 10 ** (fit["slope"] * np.log10(grid) + fit["intercept"]), "k--", lw=1,
              label=f"fit: slope {fit['slope']:.2f}, r = {fit['correlation']:.3f}")
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel("predicted FLOPs (jacobian_plan, one example)")
    axis.set_ylabel("measured time (s, median)")
    axis.set_title("input Jacobian: measured time against the plan's predicted cost")
    axis.legend(fontsize=8)
    figure.tight_layout()
    return figure


def plot_bars(runs):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(runs)
    figure, axis = plt.subplots(figsize=(max(8, 1.1 * len(names)), 4.5))
    positions = np.arange(len(names))
    width = 0.27
    for offset, mode in zip((-width, 0.0, width), MODES):
        axis.bar(positions + offset, [runs[n]["seconds"][mode] * 1e3 for n in names], width,
                 label=mode, color=MARKERS[mode][1])
    axis.set_xticks(positions)
    axis.set_xticklabels([f"{n}\n{'-'.join(map(str, runs[n]['widths']))}" for n in names],
                         rotation=35, ha="right", fontsize=7)
    axis.set_yscale("log")
    axis.set_ylabel("time per Jacobian (ms, median)")
    axis.set_title("fnet.jacobian(wrt='input') by mode, per chain shape")
    axis.legend()
    figure.tight_layout()
    return figure


if __name__ == "__main__":
    main()
