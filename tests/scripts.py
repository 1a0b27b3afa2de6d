"""Loading the experiment and benchmark scripts (not a package) as modules in tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"
BENCHMARKS = ROOT / "benchmarks"


def load_script(folder: Path, name: str):
    """``folder/name.py`` as a fresh module, with ``folder`` importable while it loads
    (the scripts import their shared helpers, ``_common`` or ``_timing``, from beside them)."""
    sys.path.insert(0, str(folder))
    try:
        spec = importlib.util.spec_from_file_location(f"{folder.name}_{name}", folder / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(folder))
