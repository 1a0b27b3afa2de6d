"""Depth without compile time: fnet.repeat(block, n) against the unrolled chain.

``fnet.repeat(layer, n)`` runs n copies of a layer with stacked params as one
``jax.lax.scan`` forward and a hand-written reversed scan backward, so the traced program,
and the compile time, should not grow with n; an unrolled ``fnet.chain(block, ..., block)``
grows linearly. With block = chain(dense(W), tanh) and squared error, this script measures

- compile time of ``jax.jit(fnet.value_and_grad(net, loss))``: tracing + lowering
  (``.lower``) and XLA compilation (``.compile``), the median of a few fresh compiles
  (``jax.clear_caches()`` before each, contenders interleaved), for repeat and unrolled
  at a small and a large depth (default 4 and 128);
- step time of the jitted value_and_grad, repeat against unrolled at the same depth
  (default 32 and 128) and for several widths (default 128, 256, 512), the median of
  interleaved repetitions in one process, with the gradients' max relative difference as
  a sanity column; as reference rows, ``jax.value_and_grad`` of the same two nets (jax's
  own autodiff of the scan);
- with each step row, the temporary memory XLA plans for the repeat's step, funcnet's and
  jax.value_and_grad's, in units of one (n, B, W) stack of activations: what the repeat
  keeps for its backward pass (``funcnet.ad._repeat_plan``);
- report only: XLA's temporary memory and FLOPs of the 128-deep repeat under the remat
  policies keep / sqrt / recompute (XLA counts a loop body's FLOPs once, whatever the
  trip count, so those FLOPs are per loop iteration, not per step).

Targets: compiling the 128-deep repeat takes at most twice as long as the 4-deep one;
its step time is at most 1.2 times the unrolled chain's at the same depth. (That the
gradients equal the unrolled chain's to 1e-10 in float64 is a test, not a benchmark.)

    python benchmarks/repeat_depth.py --help
    python benchmarks/repeat_depth.py --quick        # W=32, batch 16, depths 4 and 16
    python benchmarks/repeat_depth.py                # batch 256; compile: W=256, depths
                                                     # 4/128; steps: W=128/256/512, 32/128
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import funcnet as fnet  # noqa: E402
from _timing import (blocking, cost_flops, save_results, environment,  # noqa: E402
                     interleaved_times, max_rel_diff, memory_stats, mib, numpy_normal,
                     numpy_params, summarize, table, target_row, targets_table)

NAME = "repeat_depth"
COMPILE_TARGET = 2.0
STEP_TARGET = 1.2
POLICIES = ("keep", "sqrt", "recompute")
LOSS = fnet.losses.squared_error


def block(width):
    return fnet.chain(fnet.dense(width), fnet.tanh)


def nets(width, depth):
    """(repeat net, unrolled net) of ``depth`` blocks."""
    return fnet.repeat(block(width), depth), fnet.chain(*[block(width)] * depth)


@functools.lru_cache(maxsize=8)
def make_inputs(width, depth, batch, seed):
    """Stacked params for the repeat (like its init's, drawn with NumPy: no kernel to
    compile), the same values unstacked for the chain, x, y, on the device."""
    repeat, _ = nets(width, depth)
    stacked = numpy_params(repeat, (width,), seed)
    unstacked = tuple(jax.tree.map(lambda a, k=k: a[k], stacked) for k in range(depth))
    return jax.device_put((stacked, unstacked, numpy_normal((batch, width), seed + 1),
                           numpy_normal((batch, width), seed + 2)))


def abstract(tree):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


def compile_times(width, batch, depths, repeats, seed):
    """{(kind, depth): {"lower": [...], "compile": [...], "total": [...]}} of fresh compiles,
    the contenders interleaved, caches cleared before each."""
    contenders = {}
    for depth in depths:
        stacked, unstacked, x, y = make_inputs(width, depth, batch, seed)
        repeat, unrolled = nets(width, depth)
        contenders[("repeat", depth)] = (repeat, abstract((stacked, x, y)))
        contenders[("unrolled", depth)] = (unrolled, abstract((unstacked, x, y)))
    keys = list(contenders)
    times = {key: {"lower": [], "compile": [], "total": []} for key in keys}
    for round_ in range(repeats):
        shift = round_ % len(keys)
        for key in keys[shift:] + keys[:shift]:
            net, args = contenders[key]
            jax.clear_caches()
            fn = fnet.value_and_grad(net, LOSS)  # a fresh function: nothing cached
            start = time.perf_counter()
            lowered = jax.jit(fn).lower(*args)
            lowered_at = time.perf_counter()
            lowered.compile()
            end = time.perf_counter()
            times[key]["lower"].append(lowered_at - start)
            times[key]["compile"].append(end - lowered_at)
            times[key]["total"].append(end - start)
    return times


def max_rel_difference(grads_repeat, grads_unrolled):
    """max |g_repeat[k] - g_unrolled[k]| / max |g_unrolled| over copies and leaves."""
    stacked = jax.tree.map(lambda *leaves: np.stack([np.asarray(a) for a in leaves]),
                           *grads_unrolled)
    return max_rel_diff(grads_repeat, stacked)


def step_times(widths, batch, depths, repeats, warmup, seed, jax_reference=True):
    """Per width and depth: median step times of repeat and unrolled (interleaved; with
    ``jax_reference`` also jax.value_and_grad of both, i.e. jax's own scan autodiff), the
    grads' relative difference, and the temporary memory of the repeat's step."""
    results = []
    for width, depth in ((w, d) for w in widths for d in depths):
        stacked, unstacked, x, y = make_inputs(width, depth, batch, seed)
        repeat, unrolled = nets(width, depth)
        fns = {"repeat": (fnet.value_and_grad(repeat, LOSS), stacked),
               "unrolled": (fnet.value_and_grad(unrolled, LOSS), unstacked)}
        if jax_reference:
            for name, net, params in (("jax_repeat", repeat, stacked),
                                      ("jax_unrolled", unrolled, unstacked)):
                fns[name] = (jax.value_and_grad(
                    lambda p, x, y, net=net: LOSS(net.apply(p, x), y)), params)
        # compiled once: the executable analysed is the one timed
        fns = {name: (jax.jit(f).lower(params, x, y).compile(), params)
               for name, (f, params) in fns.items()}
        outputs = {name: jax.block_until_ready(f(params, x, y))
                   for name, (f, params) in fns.items()}
        times = interleaved_times({name: blocking(f, params, x, y)
                                   for name, (f, params) in fns.items()},
                                  repeats=repeats, warmup=warmup)
        stats = {name: summarize(ts) for name, ts in times.items()}
        one_stack = depth * batch * width * np.dtype(np.float32).itemsize
        row = {
            "width": width,
            "depth": depth,
            "seconds": stats,
            "repeat_seconds": stats["repeat"]["median"],
            "unrolled_seconds": stats["unrolled"]["median"],
            "repeat_over_unrolled": stats["repeat"]["median"] / stats["unrolled"]["median"],
            "value_repeat": float(outputs["repeat"][0]),
            "value_unrolled": float(outputs["unrolled"][0]),
            "grad_rel_diff": max_rel_difference(outputs["repeat"][1], outputs["unrolled"][1]),
            "xla_flops_repeat_loop_body_once": cost_flops(fns["repeat"][0]),
            "xla_flops_unrolled": cost_flops(fns["unrolled"][0]),
            "temp_mib_repeat": mib(memory_stats(fns["repeat"][0])["temp_size_in_bytes"]),
            "stacks_kept_repeat": (memory_stats(fns["repeat"][0])["temp_size_in_bytes"]
                                   / one_stack),
        }
        if jax_reference:
            row["jax_repeat_seconds"] = stats["jax_repeat"]["median"]
            row["jax_unrolled_seconds"] = stats["jax_unrolled"]["median"]
            row["jax_repeat_over_jax_unrolled"] = (stats["jax_repeat"]["median"]
                                                   / stats["jax_unrolled"]["median"])
            row["grad_rel_diff_jax_repeat"] = max_rel_difference(outputs["jax_repeat"][1],
                                                                 outputs["unrolled"][1])
            jax_temp = memory_stats(fns["jax_repeat"][0])["temp_size_in_bytes"]
            row["temp_mib_jax_repeat"] = mib(jax_temp)
            row["stacks_kept_jax_repeat"] = jax_temp / one_stack
        else:
            row["jax_repeat_seconds"] = row["jax_unrolled_seconds"] = math.nan
            row["jax_repeat_over_jax_unrolled"] = math.nan
            row["temp_mib_jax_repeat"] = row["stacks_kept_jax_repeat"] = math.nan
        results.append(row)
        print(f"  step W={width} depth {depth}: repeat {1e3 * row['repeat_seconds']:.2f} ms, "
              f"unrolled {1e3 * row['unrolled_seconds']:.2f} ms", flush=True)
    return results


def remat_analysis(width, batch, depth, seed):
    """Temp memory and FLOPs of value_and_grad(repeat, remat=policy), from compilation."""
    stacked, _, x, y = make_inputs(width, depth, batch, seed)
    repeat, _ = nets(width, depth)
    rows = []
    for policy in POLICIES:
        start = time.perf_counter()
        compiled = jax.jit(fnet.value_and_grad(repeat, LOSS, remat=policy)).lower(
            *abstract((stacked, x, y))).compile()
        rows.append({"policy": policy, "compile_seconds": time.perf_counter() - start,
                     "flops": cost_flops(compiled), **memory_stats(compiled)})
    keep = rows[0]
    for row in rows:
        row["temp_mib"] = mib(row["temp_size_in_bytes"])
        row["temp_over_keep"] = row["temp_size_in_bytes"] / keep["temp_size_in_bytes"]
        row["flops_over_keep"] = row["flops"] / keep["flops"]
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=None,
                        help=f"results folder (default results/benchmarks); writes {NAME}.json")
    parser.add_argument("--width", type=int, help="block width W of the compile runs "
                        "(default 256)")
    parser.add_argument("--widths", type=int, nargs="+",
                        help="block widths of the step runs (default 128 256 512)")
    parser.add_argument("--batch", type=int, help="batch size (default 256)")
    parser.add_argument("--compile-depths", type=int, nargs=2, metavar=("SMALL", "LARGE"),
                        help="depths compiled (default 4 128)")
    parser.add_argument("--step-depths", type=int, nargs="+",
                        help="depths whose step times are compared (default 32 128)")
    parser.add_argument("--compile-repeats", type=int,
                        help="fresh compiles per contender (default 3)")
    parser.add_argument("--repeats", type=int,
                        help="timed interleaved step rounds per depth (default 20)")
    parser.add_argument("--warmup", type=int, help="untimed step rounds (default 2)")
    parser.add_argument("--no-jax-reference", action="store_true",
                        help="skip the reference rows: jax.value_and_grad of the same nets "
                             "(jax's own scan autodiff for the repeat)")
    parser.add_argument("--no-remat", action="store_true", help="skip the remat memory report")
    parser.add_argument("--quick", action="store_true",
                        help="toy run: W=32, batch 16, compile depths 4 and 16, step depth "
                             "16 at W=32, 1 compile, 5 step rounds (options given explicitly "
                             "win)")
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed")
    args = parser.parse_args(argv)
    quick = {"width": 32, "widths": [32], "batch": 16, "compile_depths": [4, 16],
             "step_depths": [16], "compile_repeats": 1, "repeats": 5, "warmup": 1}
    full = {"width": 256, "widths": [128, 256, 512], "batch": 256, "compile_depths": [4, 128],
            "step_depths": [32, 128], "compile_repeats": 3, "repeats": 20, "warmup": 2}
    for option, value in (quick if args.quick else full).items():
        if getattr(args, option) is None:  # options given explicitly win over --quick
            setattr(args, option, value)
    small, large = args.compile_depths

    print(f"# repeat vs unrolled: blocks dense({args.width}) + tanh, batch {args.batch}, "
          f"float32", flush=True)
    compiles = compile_times(args.width, args.batch, [small, large], args.compile_repeats,
                             args.seed)
    compile_rows = []
    for (kind, depth), ts in compiles.items():
        compile_rows.append({"kind": kind, "depth": depth,
                             **{f"{part}_seconds": statistics.median(v) for part, v in ts.items()},
                             "samples": ts})
    median_total = {(r["kind"], r["depth"]): r["total_seconds"] for r in compile_rows}
    compile_ratio = {kind: median_total[kind, large] / median_total[kind, small]
                     for kind in ("repeat", "unrolled")}
    print(f"  compile: repeat {small} -> {large}: x{compile_ratio['repeat']:.2f}, unrolled "
          f"x{compile_ratio['unrolled']:.2f}", flush=True)

    steps = step_times(args.widths, args.batch, args.step_depths, args.repeats, args.warmup,
                       args.seed, not args.no_jax_reference)
    remat = [] if args.no_remat else remat_analysis(args.width, args.batch, large, args.seed)

    targets = [target_row(f"repeat compile({large}) / compile({small})", compile_ratio["repeat"],
                          f"<= {COMPILE_TARGET:g}", compile_ratio["repeat"] <= COMPILE_TARGET),
               target_row(f"unrolled compile({large}) / compile({small}) (contrast)",
                          compile_ratio["unrolled"], "report", True)]
    for row in steps:
        targets.append(target_row(f"W={row['width']}, depth {row['depth']}: repeat step / "
                                  f"unrolled step",
                                  row["repeat_over_unrolled"], f"<= {STEP_TARGET:g}",
                                  row["repeat_over_unrolled"] <= STEP_TARGET))

    print(f"\n## Compile time of jax.jit(value_and_grad) (median of {args.compile_repeats} "
          f"fresh compiles; W={args.width}, batch {args.batch})\n")
    print(table(compile_rows, ["kind", "depth", "lower_seconds", "compile_seconds",
                               "total_seconds"],
                ["net", "depth", "trace+lower s", "XLA compile s", "total s"]))
    print(f"\ncompile({large}) / compile({small}): repeat {compile_ratio['repeat']:.3g}, "
          f"unrolled {compile_ratio['unrolled']:.3g}")
    print(f"\n## Step time of jitted value_and_grad (median of {args.repeats} interleaved "
          f"runs; batch {args.batch})\n")
    print(table([{**r, "repeat ms": 1e3 * r["repeat_seconds"],
                  "unrolled ms": 1e3 * r["unrolled_seconds"],
                  "jax repeat ms": 1e3 * r["jax_repeat_seconds"],
                  "jax unrolled ms": 1e3 * r["jax_unrolled_seconds"]} for r in steps],
                ["width", "depth", "repeat ms", "unrolled ms", "repeat_over_unrolled",
                 "jax repeat ms", "jax unrolled ms", "jax_repeat_over_jax_unrolled",
                 "stacks_kept_repeat", "stacks_kept_jax_repeat", "grad_rel_diff"],
                ["W", "depth", "fnet repeat ms", "fnet unrolled ms", "repeat / unrolled",
                 "jax.grad scan ms", "jax.grad unrolled ms", "jax scan / jax unrolled",
                 "fnet repeat temp (stacks)", "jax.grad scan temp (stacks)",
                 "grad rel diff (float32)"]))
    print("\nThe jax.grad columns (reference) differentiate the same nets with jax's own "
          "autodiff: repeat.apply is a jax.lax.scan, so they show what XLA's loops cost "
          "without funcnet's backward walk. temp (stacks): XLA's temporary memory for the "
          "step over the size of one (n, B, W) float32 stack of activations; funcnet's "
          "repeat keeps one per copy for dense + tanh, jax's scan autodiff three.")
    if remat:
        print(f"\n## Remat policies inside repeat(block, {large}) (compile-time analysis, "
              f"report only)\n")
        print(table(remat, ["policy", "temp_mib", "temp_over_keep", "flops", "flops_over_keep"],
                    ["policy", "temp MiB", "temp / keep", "FLOPs*", "FLOPs* / keep"]))
        print("\n*XLA's cost analysis counts the body of a loop (scan, fori_loop) once, not "
              "once per iteration, so these FLOPs are not the step's total.")
    print()
    print(targets_table(targets))

    results = {
        "benchmark": NAME,
        "config": {"width": args.width, "widths": args.widths, "batch": args.batch,
                   "compile_depths": [small, large],
                   "step_depths": args.step_depths, "compile_repeats": args.compile_repeats,
                   "repeats": args.repeats, "warmup": args.warmup, "seed": args.seed,
                   "dtype": "float32"},
        "environment": environment(),
        "compile": compile_rows,
        "compile_ratio": compile_ratio,
        "steps": steps,
        "remat": remat,
        "targets": targets,
    }
    save_results(NAME, args.results, results)
    return results


if __name__ == "__main__":
    main()
