"""Shared plumbing for the experiment scripts: results folders, atomic files, tables."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Sequence


def results_dir(path: str) -> Path:
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _atomic_write(path: Path, write) -> None:
    """Writes through ``write(file)`` to a temporary file beside ``path``, fsyncs, renames."""
    path = Path(path)
    handle = tempfile.NamedTemporaryFile("wb", dir=path.parent, prefix=f".{path.name}.",
                                         suffix=".tmp", delete=False)
    try:
        with handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, path)
    except BaseException:
        if os.path.exists(handle.name):
            os.unlink(handle.name)
        raise


def write_json(path: Path, data: Dict[str, Any]) -> None:
    """Every number of a run, as JSON, written atomically."""
    text = json.dumps(data, indent=2, sort_keys=True, default=float).encode()
    _atomic_write(path, lambda f: f.write(text))


def save_figure(figure, path: Path) -> None:
    """A matplotlib figure as PNG, written atomically."""
    _atomic_write(path, lambda f: figure.savefig(f, format="png", dpi=120, bbox_inches="tight"))


def table(rows: List[Dict[str, Any]], columns: Sequence[str]) -> str:
    """A Markdown table of ``rows`` (dicts) with the given columns."""
    def cell(value):
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)
