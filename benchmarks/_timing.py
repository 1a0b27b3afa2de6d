"""Shared plumbing for the benchmark scripts: interleaved timing, XLA analyses, atomic
JSON, Markdown tables.

Every benchmark compares contenders *side by side in one process*: the repetitions are
interleaved (A, B, C, A, B, C, ...) so that machine noise (other processes, frequency
changes) hits all of them alike, and the median of many repetitions after a warm-up is
reported. Ratios of such medians are what the scripts print and check against targets.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import jax
import numpy as np

from funcnet.atomic import atomic_write


def interleaved_times(fns: Mapping[str, Callable[[], Any]], repeats: int,
                      warmup: int = 1, seed: int = 0) -> Dict[str, List[float]]:
    """Wall-clock seconds of every repetition of every contender, interleaved.

    Each callable takes no argument and must block until its result is ready (e.g. end in
    ``jax.block_until_ready``). ``warmup`` untimed rounds (compilation, caches) run first,
    then ``repeats`` rounds, each calling every contender once, in a fresh (seeded) random
    order every round; see :func:`shuffled_times`.
    """
    return shuffled_times(fns, repeats, warmup, seed=seed, block=1)[0]


def shuffled_times(fns: Dict[str, Callable[[], Any]], repeats: int, warmup: int,
                   seed: int = 0, block: int = 1):
    """Seconds per step of every contender, interleaved: ``repeats`` rounds (after
    ``warmup`` untimed ones), each running every contender for ``block`` consecutive
    steps, the contenders in a fresh random order every round (seeded).

    Returns ``(times, switches)``: ``times[name]`` the step times kept, ``switches[name]``
    those of the first step of each block when ``block > 1``, which are left out of
    ``times``: that step absorbs the switch from another contender (caches flushed by a
    2048 x 2048 matmul, PyTorch's threads winding down), while a training loop runs the
    same step back to back. A fixed rotation (A B C, B C A, ...) would moreover keep each
    contender behind the same neighbour: the random order spreads whatever is left of
    such effects over all contenders alike.
    """
    if repeats < 1 or block < 1:
        raise ValueError(f"repeats and block must be >= 1, got {repeats} and {block}")
    rng = np.random.default_rng(seed)
    names = list(fns)
    for _ in range(max(0, warmup)):
        for i in rng.permutation(len(names)):
            for _ in range(block):
                fns[names[i]]()
    times: Dict[str, List[float]] = {name: [] for name in names}
    switches: Dict[str, List[float]] = {name: [] for name in names}
    for _ in range(repeats):
        for i in rng.permutation(len(names)):
            name = names[i]
            for k in range(block):
                start = time.perf_counter()
                fns[name]()
                elapsed = time.perf_counter() - start
                (switches if k == 0 and block > 1 else times)[name].append(elapsed)
    return times, switches


def interleaved_medians(fns: Mapping[str, Callable[[], Any]], repeats: int,
                        warmup: int = 1) -> Dict[str, float]:
    """``{name: median seconds}`` of ``repeats`` interleaved runs after ``warmup`` rounds.

    See :func:`interleaved_times`; each callable blocks until its result is ready.
    """
    return {name: statistics.median(ts)
            for name, ts in interleaved_times(fns, repeats, warmup).items()}


def summarize(times: Sequence[float]) -> Dict[str, float]:
    """Median, min, max and the interquartile range of some repetition times."""
    ordered = sorted(times)
    q = statistics.quantiles(ordered, n=4) if len(ordered) >= 2 else [ordered[0]] * 3
    return {"median": statistics.median(ordered), "min": ordered[0], "max": ordered[-1],
            "q1": q[0], "q3": q[2], "n": len(ordered)}


def blocking(fn: Callable, *args) -> Callable[[], Any]:
    """A zero-argument callable running ``fn(*args)`` and blocking until it is ready."""
    def call():
        return jax.block_until_ready(fn(*args))

    return call


# --- inputs without compiling ---------------------------------------------------------------


def numpy_params(net, in_shape, seed: int = 0, dtype=np.float32):
    """Params shaped like ``net.init``'s, drawn with NumPy (no XLA kernel is compiled:
    eager ``jax.random`` init compiles many small kernels, seconds on a busy machine).

    Leaves of two or more dimensions are weights, N(0, 1 / fan_in) with fan_in their
    next-to-last axis (dense's ``w``, stacked or not); other leaves are zeros (biases).
    Returned as NumPy arrays: pass them through ``jax.device_put`` once.
    """
    shapes = jax.eval_shape(lambda key: net.init(key, tuple(in_shape))[0], jax.random.key(0))
    rng = np.random.default_rng(seed)

    def draw(leaf):
        if len(leaf.shape) >= 2:
            return (rng.standard_normal(leaf.shape) / np.sqrt(leaf.shape[-2])).astype(dtype)
        return np.zeros(leaf.shape, dtype)

    return jax.tree.map(draw, shapes)


def numpy_normal(shape, seed: int, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def max_abs(tree_a, tree_b=None) -> float:
    """max |a - b| (or max |a|) over all leaves, computed in NumPy (no XLA kernel)."""
    leaves_a = [np.asarray(a, np.float64) for a in jax.tree.leaves(tree_a)]
    if tree_b is None:
        return max((float(np.max(np.abs(a))) for a in leaves_a if a.size), default=0.0)
    leaves_b = [np.asarray(b, np.float64) for b in jax.tree.leaves(tree_b)]
    assert len(leaves_a) == len(leaves_b), "trees of different structure"
    return max((float(np.max(np.abs(a - b))) for a, b in zip(leaves_a, leaves_b) if a.size),
               default=0.0)


def max_rel_diff(tree, reference) -> float:
    """max |a - b| / max |b| over all leaves (0 when both are 0)."""
    scale = max_abs(reference)
    diff = max_abs(tree, reference)
    return diff / scale if scale > 0 else diff


# --- XLA's compile-time analyses ----------------------------------------------------------


def cost_flops(compiled) -> float:
    """FLOPs from a compiled executable's cost analysis (a dict, or a list of dicts in
    some JAX versions); NaN when the backend reports none."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    if not analysis:
        return math.nan
    return float(analysis.get("flops", math.nan))


def memory_stats(compiled) -> Dict[str, float]:
    """The sizes in bytes from a compiled executable's memory analysis (temp, arguments,
    outputs, aliased, generated code); NaN for what the backend does not report."""
    analysis = compiled.memory_analysis()
    names = ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes",
             "alias_size_in_bytes", "generated_code_size_in_bytes")
    return {name: float(getattr(analysis, name, math.nan)) if analysis is not None else math.nan
            for name in names}


# --- results --------------------------------------------------------------------------------


def environment() -> Dict[str, Any]:
    """Where the numbers were taken: versions, backend, devices, cores, and the glibc
    malloc settings from the environment (``MALLOC_*``), which decide whether large
    buffers are mmap-ed, and page-faulted, afresh on every call."""
    return {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "malloc_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_")},
    }


def benchmark_parser(doc: str, name: str) -> argparse.ArgumentParser:
    """The command line every benchmark that writes ``<name>.json`` and ``<name>.md``
    starts from: its docstring's first paragraph as the description, the rest as the
    epilog, and ``--results FOLDER``."""
    parser = argparse.ArgumentParser(
        description=doc.split("\n\n")[0], epilog="\n\n".join(doc.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=os.path.join("results", "benchmarks"),
                        help=f"results folder (default results/benchmarks); writes {name}.json "
                             f"and {name}.md")
    return parser


def save_results(name: str, folder, results: Dict[str, Any],
                 markdown: Optional[str] = None) -> Path:
    """Writes ``results`` to ``<folder>/<name>.json`` (default folder results/benchmarks)
    and, when given, ``markdown`` to ``<folder>/<name>.md``, atomically, and says where."""
    folder = Path(folder or os.path.join("results", "benchmarks"))
    path = write_json(folder / f"{name}.json", results)
    written = [path]
    if markdown is not None:
        written.append(write_text(folder / f"{name}.md", markdown))
    print(f"\nwrote {' and '.join(str(p) for p in written)}")
    return path


def write_json(path, data: Dict[str, Any]) -> Path:
    """Writes ``data`` as JSON atomically: a temporary file beside ``path``, fsync,
    ``os.replace``. Non-finite floats are written as JSON's NaN/Infinity extension."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, indent=2, sort_keys=True, default=_jsonable).encode()
    return atomic_write(path, lambda f: f.write(text))


def write_text(path, text: str) -> Path:
    """Writes ``text`` atomically (see :func:`funcnet.atomic.atomic_write`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda f: f.write(text.encode()))


def _jsonable(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def cell(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "**NO**"
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return f"{value:.3g}"
    return str(value)


def table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str],
          headers: Optional[Sequence[str]] = None) -> str:
    """A Markdown table of ``rows`` (dicts) with the given columns (booleans print as
    yes / **NO**, floats with 3 significant digits)."""
    headers = list(headers or columns)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def target_row(target: str, measured: float, threshold: float, met: bool) -> Dict[str, Any]:
    """One row of a script's targets table."""
    return {"target": target, "measured": float(measured), "threshold": threshold, "met": bool(met)}


def targets_table(targets: Sequence[Mapping[str, Any]]) -> str:
    return table(targets, ["target", "measured", "threshold", "met"])


def mib(n_bytes: float) -> float:
    return n_bytes / 2**20
