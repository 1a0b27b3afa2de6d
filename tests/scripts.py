"""Loading the experiment and benchmark scripts (not a package) as modules in tests."""

from __future__ import annotations

import importlib.util
import json
import os
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


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def experiment(name: str):
    """``experiments/name.py`` as a fresh module."""
    return load_script(EXPERIMENTS, name)


def experiment_outputs(folder: Path, *pngs: str):
    """An experiment's ``results.json`` from ``folder``, after checking that every PNG
    named is one and that no half-written (``.tmp``) file is left."""
    results = json.loads((folder / "results.json").read_text())
    for png in pngs:
        assert (folder / png).read_bytes()[:8] == PNG_MAGIC
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]  # no half-written files
    return results


# Quicker XLA compiles (about half the compile time of small programs, which is most of the
# tests' time): every test runs with them (conftest.py), so do the processes tests start.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def cpu_env():
    """The environment of a benchmark's or script's smoke run: this one (with
    :data:`FAST_COMPILE`, which conftest.py adds), on the CPU."""
    return {**os.environ, "JAX_PLATFORMS": "cpu"}
