"""Every benchmark in one command: each prints its table and its targets, met or not.

    python benchmarks/all.py            # all of them at full size (about 10 minutes here)
    python benchmarks/all.py --quick    # toy sizes, to see that they run
    python benchmarks/all.py peers epoch eager   # only these

Results (JSON) go to results/benchmarks/ unless --results says otherwise.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

BENCHMARKS = ("peers", "epoch", "eager", "jacobian_accumulation", "remat_memory",
              "repeat_depth", "extensions", "curvature")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"which to run (default all): {', '.join(BENCHMARKS)}")
    parser.add_argument("--quick", action="store_true", help="toy sizes")
    parser.add_argument("--results", default=None, help="results folder for every benchmark")
    args = parser.parse_args(argv)
    unknown = [name for name in args.names if name not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    forwarded = (["--quick"] if args.quick else []) + (
        ["--results", args.results] if args.results else [])
    for name in args.names or BENCHMARKS:
        print(f"\n\n######## benchmarks/{name}.py {' '.join(forwarded)}\n", flush=True)
        importlib.import_module(name).main(forwarded)


if __name__ == "__main__":
    main()
