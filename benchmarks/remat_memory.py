"""Rematerialisation: what value_and_grad's memory policies cost and save.

``fnet.value_and_grad(net, loss, remat=...)`` keeps every layer's residuals ("keep", the
default), only the inputs of segments of about sqrt(L) layers ("sqrt"), or only the input
x ("recompute"). For a deep chain of dense + tanh blocks with squared error, this script
compiles the jitted step under each policy and reads XLA's own analyses of the compiled
executable: the temporary memory (``memory_analysis().temp_size_in_bytes``) and the FLOPs
(``cost_analysis()``), then times the steps (median of interleaved repetitions in one
process). The FLOPs column is the proof that recomputation really happens: a policy that
saved memory without adding FLOPs would not be recomputing, and one that added neither
would have been undone by XLA's common-subexpression elimination (CSE). Reference rows:
``jax.value_and_grad`` of the plain forward pass, and of one where segments of about
sqrt(L) blocks are wrapped in ``jax.checkpoint`` (with and without ``prevent_cse``), which
on XLA's CPU pipeline come out with the FLOPs and memory of keeping everything.

Targets (where stored activations dominate: 64 layers of width 512 at batch 8192, about
1 GiB of activations against 64 MiB of parameters): the sqrt policy's temporary memory at
most 30% of keep's, at a step time at most 1.4 times keep's; recompute the lowest memory
of the three; and both recomputing policies with more FLOPs than keep.

At the full size one keep step is about 0.8 TFLOP (15-20 s on 2 busy CPU cores) and a
recompute step about 12 times that, so by default a contender whose FLOPs exceed 4 times
keep's is compiled and analysed but not timed, nor are the jax reference rows when a
step exceeds 1e11 FLOPs (their FLOPs and memory already tell the story);
``--time-all`` times everything. ``--layers 32 --width 512 --batch 2048`` is a middle
size of a minute or two.

    python benchmarks/remat_memory.py --help
    python benchmarks/remat_memory.py --quick                     # L=16, W=128, B=512
    python benchmarks/remat_memory.py                             # L=64, W=512, B=8192
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parent))

import funcnet as fnet  # noqa: E402
from _timing import (blocking, cost_flops, save_results, environment,  # noqa: E402
                     interleaved_times, max_rel_diff, memory_stats, mib, numpy_normal,
                     numpy_params, summarize, table, target_row, targets_table)

NAME = "remat_memory"
POLICIES = ("keep", "sqrt", "recompute")
SQRT_MEMORY_TARGET = 0.30
SQRT_TIME_TARGET = 1.4


def build_net(layers, width):
    """L top-level blocks chain(dense(W), tanh)."""
    return fnet.chain(*[fnet.chain(fnet.dense(width), fnet.tanh) for _ in range(layers)])


def make_inputs(net, width, batch, seed):
    """float32 params (like net.init's, drawn with NumPy), x, y, on the device."""
    return jax.device_put((numpy_params(net, (width,), seed),
                           numpy_normal((batch, width), seed + 1),
                           numpy_normal((batch, width), seed + 2)))


def segment_size(layers):
    return max(1, round(math.sqrt(layers)))


def contenders(net, loss):
    """name -> (description, un-jitted f(params, x, y) -> (value, grads))."""
    n_layers = len(net.layers)
    size = segment_size(n_layers)

    def plain_loss(params, x, y):
        return loss(net.apply(params, x), y)

    def checkpointed_loss(prevent_cse):
        def f(params, x, y):
            z = x
            for start in range(0, n_layers, size):
                segment = fnet.chain(*net.layers[start:start + size])
                z = jax.checkpoint(segment.apply, prevent_cse=prevent_cse)(
                    params[start:start + size], z)
            return loss(z, y)

        return f

    rows = {f"fnet {policy}": (f"fnet.value_and_grad(remat={policy!r})",
                               fnet.value_and_grad(net, loss, remat=policy))
            for policy in POLICIES}
    rows["jax.value_and_grad"] = ("reference: jax.value_and_grad, no checkpointing",
                                  jax.value_and_grad(plain_loss))
    rows["jax.checkpoint segments"] = (
        f"reference: jax.value_and_grad with jax.checkpoint around segments of {size} "
        f"blocks (prevent_cse=True, the default)", jax.value_and_grad(checkpointed_loss(True)))
    rows["jax.checkpoint segments, prevent_cse=False"] = (
        "reference: the same with prevent_cse=False",
        jax.value_and_grad(checkpointed_loss(False)))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=None,
                        help=f"results folder (default results/benchmarks); writes {NAME}.json")
    parser.add_argument("--layers", type=int, default=64, help="blocks dense(W)+tanh (default 64)")
    parser.add_argument("--width", type=int, default=512, help="width W (default 512)")
    parser.add_argument("--batch", type=int, default=8192, help="batch size (default 8192)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed interleaved rounds (default 3 when a keep step exceeds "
                             "1e11 FLOPs, else 15)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed rounds first (default 1; the first is also the "
                             "gradient check)")
    parser.add_argument("--time-all", action="store_true",
                        help="time every contender (by default: not those with more than 4x "
                             "keep's FLOPs, nor the jax reference rows above 1e11 FLOPs)")
    parser.add_argument("--no-timing", action="store_true",
                        help="compile-time analyses only (memory, FLOPs), no step timings")
    parser.add_argument("--quick", action="store_true",
                        help="toy run: --layers 16 --width 128 --batch 512 --repeats 5")
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed")
    args = parser.parse_args(argv)
    if args.quick:
        args.layers, args.width, args.batch = 16, 128, 512
        args.repeats = args.repeats or 5

    loss = fnet.losses.squared_error
    net = build_net(args.layers, args.width)
    params, x, y = make_inputs(net, args.width, args.batch, args.seed)
    param_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(params))
    # what keep must store: each block's input, for dense's vjp (tanh's vjp needs its
    # output, which is the next block's input: the same array)
    activation_bytes = args.layers * args.batch * args.width * 4
    print(f"# remat: {args.layers} blocks dense({args.width}) + tanh, batch {args.batch}, "
          f"float32: params {mib(param_bytes):.1f} MiB, stored activations ~"
          f"{mib(activation_bytes):.0f} MiB (1 per block); sqrt segments of "
          f"{segment_size(args.layers)} blocks", flush=True)

    rows, jitted = [], {}
    for name, (description, fn) in contenders(net, loss).items():
        start = time.perf_counter()
        compiled = jax.jit(fn).lower(params, x, y).compile()
        compile_seconds = time.perf_counter() - start
        jitted[name] = compiled  # the analysed executable is the one timed
        memory = memory_stats(compiled)
        rows.append({"name": name, "description": description, "flops": cost_flops(compiled),
                     "compile_seconds": compile_seconds, **memory,
                     "temp_mib": mib(memory["temp_size_in_bytes"])})
        print(f"  compiled {name}: {compile_seconds:.1f} s, temp "
              f"{rows[-1]['temp_mib']:.1f} MiB, {rows[-1]['flops']:.3g} FLOPs", flush=True)
    by_name = {row["name"]: row for row in rows}
    keep = by_name["fnet keep"]
    for row in rows:
        row["temp_over_keep"] = row["temp_size_in_bytes"] / keep["temp_size_in_bytes"]
        row["flops_over_keep"] = row["flops"] / keep["flops"]

    # step times: the fnet policies within 4x keep's FLOPs; the jax reference rows only
    # when a keep step is small (<= 1e11 FLOPs); everything with --time-all
    big = keep["flops"] > 1e11

    def why_not_timed(row):
        if args.no_timing:
            return "--no-timing"
        if args.time_all:
            return None
        if row["flops_over_keep"] > 4.0:
            return "more than 4x keep's FLOPs (--time-all to time it)"
        if big and not row["name"].startswith("fnet"):
            return "reference row at a size above 1e11 FLOPs per step (--time-all to time it)"
        return None

    timed = [row["name"] for row in rows if why_not_timed(row) is None]
    repeats = args.repeats or (3 if keep["flops"] > 1e11 else 15)
    # the gradient check, against jax.value_and_grad (run once even when not timed);
    # for the timed contenders this first call is also a warm-up round
    reference_grads = None
    for name in ["jax.value_and_grad"] + [n for n in timed if n != "jax.value_and_grad"]:
        value, grads = jax.block_until_ready(jitted[name](params, x, y))
        if reference_grads is None:
            reference_grads = grads
        by_name[name]["value"] = float(value)
        by_name[name]["grad_rel_diff_vs_jax"] = max_rel_diff(grads, reference_grads)
        del grads
    del reference_grads
    if timed:
        print(f"  timing {len(timed)} contenders, {repeats} interleaved rounds "
              f"after {max(0, args.warmup - 1)} more warm-up rounds ...", flush=True)
        times = interleaved_times(
            {name: blocking(jitted[name], params, x, y) for name in timed},
            repeats=repeats, warmup=max(0, args.warmup - 1))
        for name, ts in times.items():
            by_name[name]["seconds"] = summarize(ts)
            by_name[name]["step_seconds"] = by_name[name]["seconds"]["median"]
    for row in rows:
        if "step_seconds" in row and "step_seconds" in keep:
            row["time_over_keep"] = row["step_seconds"] / keep["step_seconds"]
        else:
            row.setdefault("step_seconds", math.nan)
            row["time_over_keep"] = math.nan
            row["not_timed"] = why_not_timed(row)

    sqrt, recompute = by_name["fnet sqrt"], by_name["fnet recompute"]
    policy_temps = {p: by_name[f"fnet {p}"]["temp_size_in_bytes"] for p in POLICIES}
    targets = [
        target_row("sqrt temp / keep temp", sqrt["temp_over_keep"],
                   f"<= {SQRT_MEMORY_TARGET}", sqrt["temp_over_keep"] <= SQRT_MEMORY_TARGET),
        target_row("sqrt step time / keep step time", sqrt["time_over_keep"],
                   f"<= {SQRT_TIME_TARGET}", sqrt["time_over_keep"] <= SQRT_TIME_TARGET),
        target_row("recompute temp is the lowest of keep / sqrt / recompute",
                   recompute["temp_over_keep"], "min",
                   policy_temps["recompute"] <= min(policy_temps.values())),
        target_row("sqrt FLOPs / keep FLOPs (recomputation happened)",
                   sqrt["flops_over_keep"], "> 1", sqrt["flops_over_keep"] > 1.0),
        target_row("recompute FLOPs / keep FLOPs (recomputation happened)",
                   recompute["flops_over_keep"], "> 1", recompute["flops_over_keep"] > 1.0),
    ]
    jax_ckpt = by_name["jax.checkpoint segments"]
    jax_plain = by_name["jax.value_and_grad"]
    cse_note = {
        "jax_checkpoint_flops_over_jax": jax_ckpt["flops"] / jax_plain["flops"],
        "jax_checkpoint_temp_over_jax": jax_ckpt["temp_size_in_bytes"]
        / jax_plain["temp_size_in_bytes"],
    }

    display = [{**row, "compile s": row["compile_seconds"], "temp MiB": row["temp_mib"],
                "step s": row["step_seconds"],
                "grad rel diff": row.get("grad_rel_diff_vs_jax", math.nan)} for row in rows]
    print(f"\n## Rematerialisation ({args.layers} x dense({args.width}) + tanh, batch "
          f"{args.batch}, float32; step time the median of {repeats} interleaved runs)\n")
    print(table(display, ["name", "temp MiB", "temp_over_keep", "flops", "flops_over_keep",
                          "step s", "time_over_keep", "compile s", "grad rel diff"],
                ["contender", "temp MiB", "temp / keep", "FLOPs", "FLOPs / keep", "step s",
                 "time / keep", "compile s", "grad rel diff vs jax"]))
    print(f"\nReference: jax.checkpoint segments have {cse_note['jax_checkpoint_flops_over_jax']:.4f}x "
          f"the FLOPs and {cse_note['jax_checkpoint_temp_over_jax']:.3f}x the temp memory of "
          f"plain jax.value_and_grad on this backend ({jax.default_backend()}): "
          + ("no recomputation survived compilation (CSE)."
             if cse_note["jax_checkpoint_flops_over_jax"] < 1.01 else "recomputation survived."))
    for row in rows:
        if row.get("not_timed"):
            print(f"{row['name']}: not timed: {row['not_timed']}.")
    if (args.layers, args.width, args.batch) != (64, 512, 8192):
        print("(The targets are stated for 64 layers of width 512 at batch 8192, where stored "
              "activations dominate; at this size they are indicative only.)")
    print()
    print(targets_table(targets))

    results = {
        "benchmark": NAME,
        "config": {"layers": args.layers, "width": args.width, "batch": args.batch,
                   "repeats": repeats, "warmup": args.warmup, "seed": args.seed,
                   "dtype": "float32", "sqrt_segment_blocks": segment_size(args.layers),
                   "time_all": args.time_all, "no_timing": args.no_timing},
        "environment": environment(),
        "param_bytes": param_bytes,
        "estimated_activation_bytes": activation_bytes,
        "rows": rows,
        "reference_cse": cse_note,
        "targets": targets,
    }
    save_results(NAME, args.results, results)
    return results


if __name__ == "__main__":
    main()
