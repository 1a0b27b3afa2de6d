"""A run's fingerprint: the settings that decide which steps a resumed run takes.

fit stores it in every checkpoint's metadata and compares it when it resumes, so that a
checkpoint is never continued under other settings (which would silently train a
different run than the one asked for). Compared: the number of training examples, the
batch size, the shuffling key, the optimizer, the last epoch of the run and its DP-SGD
settings.
"""

from __future__ import annotations

import numbers
from typing import Any, Dict, List

import jax
import numpy as np

#: How deep :func:`describe_optimizer` follows closures (optax nests a few levels).
_DEPTH = 8


def fingerprint(*, optimizer, key, batch_size: int, examples: int, last_epoch: int,
                privacy=None) -> Dict[str, Any]:
    """The JSON-serialisable fingerprint of a fit run."""
    return {"examples": int(examples), "batch_size": int(batch_size),
            "key": key_words(key), "optimizer": describe_optimizer(optimizer),
            "last_epoch": int(last_epoch), "privacy": repr(privacy)}


def key_words(key) -> List[int]:
    """A PRNG key (typed or raw uint32) as a list of ints."""
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return [int(word) for word in np.asarray(key).reshape(-1)]


def describe_optimizer(optimizer) -> str:
    """A deterministic description of an optax transformation: the functions it is built
    from and the numbers and strings they close over, e.g.
    ``update_fn(transforms=(update_fn(b1=0.9, b2=0.999, ...), update_fn(step_size=-0.01)))``.
    Two optimizers built by the same code with the same hyperparameters (schedules
    included, through their closures) describe alike; different ones differ."""
    return _describe(getattr(optimizer, "update", optimizer), _DEPTH)


def _describe(value, depth: int) -> str:
    if isinstance(value, (bool, str, type(None))) or isinstance(value, numbers.Number):
        return repr(value)
    if isinstance(value, (np.ndarray, jax.Array)) and np.ndim(value) == 0:
        return repr(np.asarray(value).item())
    if depth == 0:
        return "..."
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(_describe(item, depth - 1) for item in value) + ")"
    if hasattr(value, "init") and hasattr(value, "update"):  # a GradientTransformation
        return _describe(value.update, depth)
    code = getattr(value, "__code__", None)
    if code is None:
        return type(value).__name__
    cells = []
    for variable, cell in zip(code.co_freevars, value.__closure__ or ()):
        try:
            cells.append(f"{variable}={_describe(cell.cell_contents, depth - 1)}")
        except ValueError:  # an empty cell
            continue
    name = getattr(value, "__qualname__", code.co_name).replace(".<locals>.", ".")
    return f"{name}({', '.join(cells)})"


_LABELS = {"examples": "training examples", "batch_size": "batch_size", "key": "key",
           "optimizer": "optimizer", "last_epoch": "last epoch (first_epoch + epochs - 1)",
           "privacy": "privacy"}


def differences(saved: Dict[str, Any], current: Dict[str, Any]) -> List[str]:
    """One line per setting that differs, ``"<setting>: <saved> there, <current> here"``."""
    lines = []
    for field, label in _LABELS.items():
        if field in saved and saved[field] != current[field]:
            lines.append(f"{label}: {_short(saved[field])} in the checkpoint, "
                         f"{_short(current[field])} here")
    return lines


def _short(value) -> str:
    text = str(value)
    return text if len(text) <= 300 else text[:297] + "..."
