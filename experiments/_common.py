"""Shared plumbing for the experiment scripts: results folders, atomic files, tables."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Sequence

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
