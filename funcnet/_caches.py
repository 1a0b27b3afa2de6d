"""Bounded caches of compiled code and static analyses, all emptied by one call.

funcnet caches what is a pure function of immutable, hashable objects (layers, losses,
optimizers, shapes): compiled per-layer code for calls without ``jax.jit``, fit's
compiled step, abstract ``init`` results, FLOP counts and Jacobian plans. Each cache is an
``functools.lru_cache`` of bounded size created through :func:`bounded_cache`, which
registers it so that :func:`clear_caches` can empty them all.
"""

from __future__ import annotations

import functools
from typing import Callable, List

_CACHES: List[Callable] = []


def bounded_cache(maxsize: int):
    """``functools.lru_cache(maxsize)``, registered for :func:`clear_caches`."""

    def decorate(fn):
        cached = functools.lru_cache(maxsize=maxsize)(fn)
        _CACHES.append(cached)
        return cached

    return decorate


def clear_caches() -> None:
    """Empties every funcnet cache (compiled per-layer code, fit's compiled steps, shape
    and FLOP analyses, Jacobian plans). Nothing is recomputed until next needed.

    JAX's own caches are not touched; ``jax.clear_caches()`` empties those.
    """
    for cache in _CACHES:
        cache.cache_clear()


def cache_sizes() -> dict:
    """``{qualified name: entries}`` of every registered cache (for tests and debugging)."""
    return {f"{c.__module__}.{c.__qualname__}": c.cache_info().currsize for c in _CACHES}
