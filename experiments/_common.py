"""Shared plumbing for the experiment scripts: results folders, atomic files, tables, and
an opt-in persistent compilation cache."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import jax
from jax.experimental.compilation_cache import compilation_cache

import funcnet as fnet
from funcnet.atomic import atomic_write


def results_dir(path: str) -> Path:
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def write_json(path: Path, data: Dict[str, Any]) -> None:
    """Every number of a run, as JSON, written atomically."""
    text = json.dumps(data, indent=2, sort_keys=True, default=float).encode()
    atomic_write(path, lambda f: f.write(text))


def save_figure(figure, path: Path) -> None:
    """A matplotlib figure as PNG, written atomically."""
    atomic_write(path, lambda f: figure.savefig(f, format="png", dpi=120, bbox_inches="tight"))


def table(rows: List[Dict[str, Any]], columns: Sequence[str]) -> str:
    """A Markdown table of ``rows`` (dicts) with the given columns."""
    def cell(value):
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


# --- persistent compilation cache (opt-in) --------------------------------------------------

COMPILATION_CACHE_ENV = "FUNCNET_COMPILATION_CACHE"


def add_compilation_cache_flag(parser) -> None:
    """Adds ``--compilation-cache DIR`` to an argparse parser; its default is the
    environment variable ``FUNCNET_COMPILATION_CACHE`` (unset: no cache, the default).
    Pass the parsed value to :func:`enable_compilation_cache`."""
    parser.add_argument(
        "--compilation-cache", metavar="DIR", default=os.environ.get(COMPILATION_CACHE_ENV) or None,
        help="keep XLA's compiled programs in DIR (JAX's persistent compilation cache), so "
             "that a second run of the same script loads them instead of compiling; default "
             f"${COMPILATION_CACHE_ENV}, else off. Use a folder only you can write to.")


def enable_compilation_cache(path: Optional[str]) -> Optional[Path]:
    """Turns on JAX's persistent compilation cache in folder ``path`` (created if need
    be) for every program this process compiles from now on; does nothing for a false
    ``path``. Returns the folder, or None.

    Every program is cached, however small or fast to compile (JAX's default skips those
    that compiled in under a second, i.e. all of a small job's). A program is found again
    when the next run compiles the same computation with the same JAX, jaxlib and
    backend. JAX treats the cache as trusted code: do not share the folder with users you
    do not trust.
    """
    if not path:
        return None
    folder = Path(path).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    # JAX decides once per process, at its first compilation, whether a cache is in use;
    # reset that decision so the folder counts even when something compiled already
    compilation_cache.reset_cache()
    return folder


def target_line(description: str, met: bool, detail: str = "") -> str:
    """One printable line saying whether an experiment's stated target was reached:
    ``target <description>: met`` or ``... not met``, then ``detail`` in parentheses."""
    line = f"target {description}: {'met' if met else 'not met'}"
    return line + (f" ({detail})" if detail else "")


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def mlp(hidden: Sequence[int], classes: int = 10):
    """The experiments' classifier: dense + relu for every width in ``hidden``, then
    dense(classes) logits."""
    layers = []
    for width in hidden:
        layers += [fnet.dense(width), fnet.relu]
    return fnet.chain(*layers, fnet.dense(classes), name="mlp")
