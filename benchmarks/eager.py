"""Fast without jit: funcnet called eagerly (as in a notebook) against its jitted call.

Called without ``jax.jit``, ``fnet.value_and_grad``, ``fnet.backprop`` and ``fnet.jvp``
run each layer's forward pass and pullback (or jvp) as code compiled once per layer and
input shape, then reused. This script times each of them eagerly and jitted, side by
side (median of interleaved repetitions after warm-up), on the peer benchmark's three
configurations (MLPs with relu, softmax cross-entropy, float32), with plain
``jax.value_and_grad`` eager against jitted as the reference (op-by-op dispatch), and
checks that repeated eager calls add nothing to the compilation caches.

Target: each eager call costs at most 2x its jitted call.

    python benchmarks/eager.py --help
    python benchmarks/eager.py --quick
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))

import funcnet as fnet  # noqa: E402
from funcnet._caches import cache_sizes  # noqa: E402
from _timing import (blocking, save_results, environment, interleaved_times,  # noqa: E402
                     numpy_normal, numpy_params, table, target_row, targets_table)

NAME = "eager"
TARGET = 2.0
CONFIGS = {"64->256x4->10, batch 128": (64, 256, 4, 10, 128),
           "784->1024x4->10, batch 256": (784, 1024, 4, 10, 256),
           "512->512x16->10, batch 64": (512, 512, 16, 10, 64)}
QUICK = {"16->32x2->4, batch 8": (16, 32, 2, 4, 8)}


def mlp(width_in, hidden, depth, classes):
    layers = []
    for _ in range(depth):
        layers += [fnet.dense(hidden), fnet.relu]
    return fnet.chain(*layers, fnet.dense(classes), name="mlp")


def contenders(config, seed):
    width_in, hidden, depth, classes, batch = config
    net = mlp(width_in, hidden, depth, classes)
    params = jax.device_put(numpy_params(net, (width_in,), seed))
    x = jnp.asarray(numpy_normal((batch, width_in), seed + 1))
    y = jnp.arange(batch, dtype=jnp.int32) % classes
    dots = jax.tree.map(jnp.ones_like, params)
    loss = fnet.losses.softmax_cross_entropy
    calls = {
        "value_and_grad": lambda p, x_: fnet.value_and_grad(net, loss)(p, x_, y),
        "backprop": lambda p, x_: fnet.backprop(net, loss, p, x_, y),
        "jvp": lambda p, x_: fnet.jvp(net, p, x_, dots, None),
        "jax.value_and_grad (reference)":
            lambda p, x_: jax.value_and_grad(lambda q: loss(net.apply(q, x_), y))(p),
    }
    fns = {}
    for name, call in calls.items():
        fns[f"{name} eager"] = blocking(call, params, x)
        fns[f"{name} jit"] = blocking(jax.jit(call), params, x)
    return fns


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=None,
                        help=f"results folder (default results/benchmarks); writes {NAME}.json")
    parser.add_argument("--repeats", type=int, default=30, help="timed rounds per config")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds per config")
    parser.add_argument("--quick", action="store_true", help="a toy configuration, 3 rounds")
    parser.add_argument("--seed", type=int, default=0, help="seed of params and inputs")
    args = parser.parse_args(argv)
    configs, repeats = (QUICK, 3) if args.quick else (CONFIGS, args.repeats)

    rows, targets = [], []
    for label, config in configs.items():
        fns = contenders(config, args.seed)
        times = interleaved_times(fns, repeats, args.warmup, seed=args.seed)
        cache = cache_sizes()
        for fn in fns.values():  # calls after warm-up must not compile anything new
            fn()
        stable = cache == cache_sizes()
        medians = {name: statistics.median(ts) for name, ts in times.items()}
        for call in ("value_and_grad", "backprop", "jvp", "jax.value_and_grad (reference)"):
            eager, jitted = medians[f"{call} eager"], medians[f"{call} jit"]
            rows.append({"config": label, "call": call, "eager_ms": 1e3 * eager,
                         "jit_ms": 1e3 * jitted, "eager_over_jit": eager / jitted,
                         "caches_stable": stable})
            if "reference" not in call:
                targets.append(target_row(f"{label}: {call} eager / jit", eager / jitted,
                                          f"<= {TARGET:g}", eager / jitted <= TARGET))
        targets.append(target_row(f"{label}: eager caches unchanged by repeated calls",
                                  float(stable), "== 1", stable))
    print(f"# Eager (no jax.jit) against jitted, median of {repeats} interleaved rounds\n")
    print(table(rows, ["config", "call", "eager_ms", "jit_ms", "eager_over_jit"],
                ["configuration", "call", "eager ms", "jit ms", "eager / jit"]))
    print()
    print(targets_table(targets))
    save_results(NAME, args.results, {"benchmark": NAME, "environment": environment(),
                                      "repeats": repeats, "rows": rows, "targets": targets})
    return rows


if __name__ == "__main__":
    main()
