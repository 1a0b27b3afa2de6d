"""Checks of plain arguments at the public entry points: each returns the value it accepts
(normalised: numpy integers as int, a shape as a tuple) or raises :class:`ArgumentError`
naming the argument, what came and the fix. Nothing is truncated, clamped or broadcast.
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import Any, Optional, Tuple

import jax
import numpy as np

from funcnet._errors import ArgumentError


def _shown(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def check_int(argument: str, value: Any, minimum: Optional[int] = None) -> int:
    """``value`` as an int: Python and numpy integers pass; bools, floats (even 3.0) and
    anything else are refused rather than truncated; below ``minimum`` is refused."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        hint = f" (pass int({value!r}) if that is what you mean)" if isinstance(
            value, numbers.Real) and not isinstance(value, (bool, np.bool_)) else ""
        raise ArgumentError(argument, f"must be an int, got {_shown(value)}{hint}.")
    value = operator.index(value)
    if minimum is not None and value < minimum:
        raise ArgumentError(argument, f"must be at least {minimum}, got {value}.")
    return value


def check_bool(argument: str, value: Any) -> bool:
    """``value`` as a bool: only True and False (numpy bools included) pass."""
    if not isinstance(value, (bool, np.bool_)):
        raise ArgumentError(argument, f"must be True or False, got {_shown(value)}.")
    return bool(value)


def check_real(argument: str, value: Any) -> float:
    """``value`` as a finite float: ints and floats pass; NaN, infinities, bools and
    non-numbers are refused."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise ArgumentError(argument, f"must be a real number, got {_shown(value)}.")
    if not math.isfinite(value):
        raise ArgumentError(argument, f"must be finite, got {value}.")
    return float(value)


def check_callable(argument: str, value: Any, signature: str) -> None:
    """Refuses a non-callable, showing the ``signature`` it should have."""
    if not callable(value):
        raise ArgumentError(argument, f"must be a function {signature}, got {_shown(value)}.")


def check_shape(argument: str, value: Any) -> Tuple[int, ...]:
    """A per-example shape as a tuple of non-negative ints (lists accepted); a bare int
    (``784`` for ``(784,)``) is refused with the fix."""
    if isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_)):
        raise ArgumentError(argument, f"must be a shape tuple, got the int {value}; pass "
                                      f"({value},) for vectors of {value} features.")
    if not isinstance(value, (tuple, list)):
        raise ArgumentError(argument, f"must be a shape tuple such as (784,) or (8, 8), got "
                                      f"{_shown(value)}.")
    return tuple(check_int(f"{argument}[{i}]", d, minimum=0) for i, d in enumerate(value))


def check_array(argument: str, value: Any) -> None:
    """Refuses Python lists and tuples where an array is expected (a list would be taken
    for a pytree of scalars under jit); arrays, numpy arrays and pytrees of arrays pass."""
    if isinstance(value, (list, tuple)):
        raise ArgumentError(argument, f"is a Python {type(value).__name__}; funcnet takes "
                                      f"arrays here. Convert it first: jnp.asarray({argument}).")
    if value is None:
        raise ArgumentError(argument, "is None; pass an array (batch first).")


def check_key(argument: str, key: Any) -> None:
    """Refuses anything but one PRNG key: a typed key (``jax.random.key``) or a raw
    uint32 key of shape (2,) (``jax.random.PRNGKey``)."""
    dtype = getattr(key, "dtype", None)
    typed = dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
    raw = dtype == np.uint32 and np.shape(key) == (2,)
    if not ((typed and np.shape(key) == ()) or raw):
        raise ArgumentError(argument, f"must be one PRNG key such as jax.random.key(0), got "
                                      f"{key!r}.")


def check_float_leaves(argument: str, tree: Any) -> None:
    """Refuses integer or bool leaves where floating-point values are differentiated
    (params, tangents, cotangents), naming the leaf."""
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        dtype = getattr(leaf, "dtype", None)
        if dtype is None:
            dtype = np.result_type(leaf) if isinstance(leaf, numbers.Number) else None
        if dtype is not None and not jax.numpy.issubdtype(dtype, jax.numpy.inexact):
            where = f"{argument}{jax.tree_util.keystr(key_path)}"
            raise ArgumentError(where, f"has dtype {np.dtype(dtype).name}, but derivatives "
                                       f"need floating-point values; convert it, e.g. "
                                       f".astype(jnp.float32).")
