"""Jacobian accumulation: fnet.jacobian(mode="optimal") against jax.jacfwd and jax.jacrev.

For chains dense(w) + tanh per width, over several width profiles (a bottleneck, an
hourglass, a wide middle, increasing, decreasing and constant widths), times the input
Jacobian of ONE example by

- ``jax.jacfwd`` and ``jax.jacrev`` of x -> net.apply(params, x[None])[0],
- ``fnet.jacobian(net, params, x, wrt="input", mode="optimal")`` (the plan of
  ``fnet.jacobian_plan``: segments by forward or reverse mode, multiplied in the cheapest
  order), and, for reference, funcnet's own ``mode="forward"`` and ``mode="reverse"``,

all jitted, in float32, the median of many interleaved repetitions in one process. The
speedup is min(jacfwd, jacrev) / optimal. Targets: on the bottleneck a speedup of at
least 10; on every shape, optimal at most 1.1 times the faster of jacfwd and jacrev
(speedup >= 1/1.1). Also reported: the plan's predicted FLOPs (forward, reverse, optimal),
XLA's FLOP count of each compiled contender, and the max abs difference of every result
from jacfwd's (a sanity column).

    python benchmarks/jacobian_accumulation.py --help
    python benchmarks/jacobian_accumulation.py --quick            # toy sizes, seconds
    python benchmarks/jacobian_accumulation.py -v                 # full size, plans printed
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parent))

import funcnet as fnet  # noqa: E402
from _timing import (blocking, cost_flops, save_results, environment,  # noqa: E402
                     interleaved_times, max_abs, numpy_normal, numpy_params, summarize, table,
                     target_row, targets_table)

NAME = "jacobian_accumulation"

#: name -> widths n_1 (the input) .. n_{L+1}: one dense(n_{l+1}) + tanh per step.
SHAPES = {
    "bottleneck": (1000, 500, 100, 10, 500, 1000),
    "hourglass": (256, 64, 16, 64, 256),
    "wide-middle": (32, 512, 512, 32),
    "increasing": (64, 256, 1024),
    "decreasing": (1024, 256, 64),
    "constant": (256,) * 6,
}
BOTTLENECK_TARGET = 10.0
EVERY_SHAPE_TARGET = 1 / 1.1
CONTENDERS = ("jacfwd", "jacrev", "optimal", "fnet_forward", "fnet_reverse")


def scaled(widths, scale):
    return tuple(max(1, int(round(w * scale))) for w in widths)


def build_net(widths):
    """chain(dense(n_2), tanh, dense(n_3), tanh, ...): a flat chain, so that the planner
    may cut between any two layers."""
    layers = []
    for width in widths[1:]:
        layers += [fnet.dense(width), fnet.tanh]
    return fnet.chain(*layers)


def contenders(net, include_fnet_modes=True):
    """name -> jitted f(params, x) -> the (out, in) Jacobian of one example x."""
    def single(params, x):
        return net.apply(params, x[None])[0]

    fns = {
        "jacfwd": jax.jit(jax.jacfwd(single, argnums=1)),
        "jacrev": jax.jit(jax.jacrev(single, argnums=1)),
        "optimal": jax.jit(lambda p, x: fnet.jacobian(net, p, x, wrt="input", mode="optimal")),
    }
    if include_fnet_modes:
        fns["fnet_forward"] = jax.jit(
            lambda p, x: fnet.jacobian(net, p, x, wrt="input", mode="forward"))
        fns["fnet_reverse"] = jax.jit(
            lambda p, x: fnet.jacobian(net, p, x, wrt="input", mode="reverse"))
    return fns


def measure_shape(name, widths, repeats, warmup, seed, verbose, include_fnet_modes=True):
    net = build_net(widths)
    params = jax.device_put(numpy_params(net, (widths[0],), seed))
    x = jax.device_put(numpy_normal((widths[0],), seed + 1))
    the_plan = fnet.jacobian_plan(net, (widths[0],))
    if verbose:
        print(f"\n### {name}: widths {widths}\n```\n{the_plan}\n```", flush=True)

    fns, xla_flops, values = {}, {}, {}
    for key, fn in contenders(net, include_fnet_modes).items():
        fns[key] = fn.lower(params, x).compile()  # compiled once, analysed, then timed
        xla_flops[key] = cost_flops(fns[key])
        values[key] = jax.block_until_ready(fns[key](params, x))
    reference = values["jacfwd"]
    max_abs_diff = {key: max_abs(value, reference) for key, value in values.items()}
    shapes_ok = all(value.shape == (widths[-1], widths[0]) for value in values.values())

    times = interleaved_times({key: blocking(fn, params, x) for key, fn in fns.items()},
                              repeats=repeats, warmup=warmup)
    stats = {key: summarize(ts) for key, ts in times.items()}
    median = {key: s["median"] for key, s in stats.items()}
    best_plain = min(median["jacfwd"], median["jacrev"])
    speedup = best_plain / median["optimal"]
    return {
        "shape": name,
        "widths": list(widths),
        "plan": str(the_plan),
        "plan_order": the_plan.order,
        "plan_segments": [{"start": s.start, "stop": s.stop, "mode": s.mode, "flops": s.flops}
                          for s in the_plan.segments],
        "predicted_flops": {"forward": the_plan.forward_flops, "reverse": the_plan.reverse_flops,
                            "optimal": the_plan.predicted_flops},
        "predicted_speedup": min(the_plan.forward_flops, the_plan.reverse_flops)
        / the_plan.predicted_flops,
        "xla_flops": xla_flops,
        "seconds": stats,
        "median_seconds": median,
        "speedup": speedup,
        # the same ratio of the fastest runs: on a busy machine a preemption costs a short
        # run relatively more than a long one, so this is the less load-biased reading
        "speedup_of_minimums": min(stats["jacfwd"]["min"], stats["jacrev"]["min"])
        / stats["optimal"]["min"],
        "optimal_over_best": median["optimal"] / best_plain,
        "max_abs_diff_vs_jacfwd": max_abs_diff,
        "jacobian_shape_ok": shapes_ok,
        "max_abs_jacobian": max_abs(reference),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=None,
                        help=f"results folder (default results/benchmarks); writes {NAME}.json")
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES),
                        help="which width profiles to run (default: all)")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply every width by this (toy runs: 0.1)")
    parser.add_argument("--repeats", type=int, default=100,
                        help="timed interleaved rounds per shape (default 100)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first (default 3)")
    parser.add_argument("--no-fnet-modes", action="store_true",
                        help="skip funcnet's own forward/reverse modes (reference rows)")
    parser.add_argument("--quick", action="store_true",
                        help="toy run: --scale 0.1 --repeats 5 --warmup 1")
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="print every shape's accumulation plan")
    args = parser.parse_args(argv)
    if args.quick:
        args.scale, args.repeats, args.warmup = min(args.scale, 0.1), min(args.repeats, 5), 1

    rows = []
    for name in args.shapes:
        widths = scaled(SHAPES[name], args.scale)
        rows.append(measure_shape(name, widths, args.repeats, args.warmup, args.seed,
                                  args.verbose, not args.no_fnet_modes))

    targets = []
    for row in rows:
        row["meets_1.1x"] = row["speedup"] >= EVERY_SHAPE_TARGET
        targets.append(target_row(f"{row['shape']}: min(jacfwd, jacrev) / optimal",
                                  row["speedup"], f">= 1/1.1 = {EVERY_SHAPE_TARGET:.3f}",
                                  row["meets_1.1x"]))
        if row["shape"] == "bottleneck":
            targets.append(target_row("bottleneck: min(jacfwd, jacrev) / optimal",
                                      row["speedup"], f">= {BOTTLENECK_TARGET:g}",
                                      row["speedup"] >= BOTTLENECK_TARGET))

    display = []
    for row in rows:
        ms = {k: 1e3 * v for k, v in row["median_seconds"].items()}
        display.append({
            "shape": row["shape"], "widths": "-".join(map(str, row["widths"])),
            "plan": row["plan_order"] if len(row["plan_segments"]) > 1
            else row["plan_segments"][0]["mode"],
            **{f"{k} ms": ms[k] for k in ms},
            "speedup": row["speedup"], "speedup (min)": row["speedup_of_minimums"],
            "predicted": row["predicted_speedup"],
            "max |diff|": max(row["max_abs_diff_vs_jacfwd"].values()),
            "met": row["meets_1.1x"],
        })
    columns = ["shape", "widths", "plan"] + [f"{k} ms" for k in CONTENDERS if f"{k} ms" in display[0]]
    columns += ["speedup", "speedup (min)", "predicted", "max |diff|", "met"]
    print(f"\n## Jacobian accumulation (float32, one example, median of {args.repeats} "
          f"interleaved runs)\n")
    print(table(display, columns))
    print("\nspeedup = min(jacfwd, jacrev) / optimal, of the medians (the targets' reading); "
          "speedup (min) = the same of each contender's fastest run, less biased by machine "
          "load; predicted = the plan's FLOP model's min(forward, reverse) / optimal; "
          "max |diff| = max abs difference from jacfwd.\n")
    print(targets_table(targets))

    results = {
        "benchmark": NAME,
        "config": {"scale": args.scale, "repeats": args.repeats, "warmup": args.warmup,
                   "seed": args.seed, "dtype": "float32", "shapes": args.shapes},
        "environment": environment(),
        "rows": rows,
        "targets": targets,
    }
    save_results(NAME, args.results, results)
    return results


if __name__ == "__main__":
    main()
