"""Square-root factors of curvature, carried down the backward walk beside q.

The curvature extensions read, at every leaf layer i, a factor S_{i+1} of the Hessian of
each example's own loss l_b with respect to the layer's output z_{i+1}:

    H_b = sum_m  sign[m, b] S[m, b] S[m, b]^T,       S: (M, B, *out_shape), sign: (M, B)

(no sign means +1 everywhere). The seed at the network's output is a square root of the
loss Hessian (``funcnet.ad._hessian_sqrt``: C columns, C the output size, or M sampled
ones). Going down, every column is pulled back like a cotangent, S_i[m] = B_i^T S_{i+1}[m]:
the layer's recorded pullback, vmapped over the M columns (its parameter half is unused
and removed by XLA under jit). So J_b^T H_b J_b = sum_m sign (A_b^T S[m,b]) (A_b^T S[m,b])^T
at every layer with params, from one walk.

The ``"ggn"`` and sampled kinds hold one factor each. The ``"hessian"`` kind (for
``diag_hessian``) also collects the second-derivative terms of curved elementwise layers:
at such a layer, the Hessian at its input gains sum_k (d l_b / d z_{i+1,k}) d2 g_k/dz_i^2 =
diag(r_b), r_b = B q_{i+1}[b] * sigma''(z_i), which enters as one more factor, diagonal,
of M = prod(in_shape) columns with signs sign(r_b) and entries sqrt(|r_b|) (BackPACK's
residual terms). Factors are carried in a :class:`Flow` with q.
"""

from __future__ import annotations

import math
from typing import Any, Dict, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp

from funcnet.ad._hessian_sqrt import hessian_sqrt, sampled_hessian_sqrt, signed_hessian_sqrt
from funcnet.nn._layer import Layer

#: The kind carrying the loss Hessian's exact square root (diag_ggn, batch_diag_ggn, kflr).
GGN = "ggn"
#: The kind carrying the exact square root and the curved layers' terms (diag_hessian).
HESSIAN = "hessian"


def sampled(samples: int) -> str:
    """The kind carrying a Monte Carlo square root of ``samples`` columns."""
    return f"sampled:{samples}"


def samples_of(kind: str) -> Optional[int]:
    """The number of sampled columns of a sampled kind, None for an exact one."""
    return int(kind.split(":")[1]) if kind.startswith("sampled:") else None


class Factor(NamedTuple):
    """S (M, B, *shape) and its column signs (M, B), or None for all +1 (a pytree)."""

    s: jax.Array
    signs: Optional[jax.Array] = None


class Flow(NamedTuple):
    """What goes down the walk: the cotangent ``q`` (B, *shape) of the batch loss and the
    ``factors``, ``{kind: (Factor, ...)}`` (empty unless a curvature extension asked)."""

    q: Any
    factors: Dict[str, Tuple[Factor, ...]] = {}


def pull(pullback, factors) -> Dict[str, Tuple[Factor, ...]]:
    """Every factor pulled back through a layer: S_i[m] = B_i^T S_{i+1}[m] for each column,
    ``pullback(q) -> (A^T q, B^T q)`` vmapped over the M columns."""
    def one(factor: Factor) -> Factor:
        return Factor(jax.vmap(lambda s: pullback(s)[1])(factor.s), factor.signs)

    return {kind: tuple(one(factor) for factor in chain) for kind, chain in factors.items()}


def add_curved_terms(layer: Layer, z, q, factors):
    """The ``"hessian"`` kind gains the factor of a curved elementwise layer's own second
    derivatives, diag(r_b) with r_b = B q_b * sigma''(z_b) (q the batch loss's cotangent,
    so B q_b = d l_b / d z_{i+1}); any other layer adds nothing.

    sigma'' comes from JAX: the derivative of z -> sigma'(z) * q (the layer's pullback) in
    the direction of ones is q * sigma''(z) for an entrywise sigma.
    """
    if HESSIAN not in factors or layer.curvature != "elementwise":
        return factors
    batch = q.shape[0]

    def pulled(z_):
        return jax.vjp(lambda u: layer.apply((), u), z_)[1](q)[0]

    r = batch * jax.jvp(pulled, (z,), (jnp.ones_like(z),))[1]
    size = math.prod(z.shape[1:])
    columns = jnp.eye(size, dtype=z.dtype).reshape((size, 1) + z.shape[1:])
    s = columns * jnp.sqrt(jnp.abs(r))[None]
    signs = jnp.sign(r.reshape(batch, size)).T
    return {**factors, HESSIAN: factors[HESSIAN] + (Factor(s, signs),)}


def join_skip(incoming: Flow, inner: Flow) -> Flow:
    """A residual z + inner(z): q_i = q_{i+1} + B_inner^T q_{i+1}, and the same for every
    factor that came in from above; factors the inner layers added (their own curved
    terms, after the incoming ones) reach z_i through the inner path only."""
    factors = {}
    for kind, chain in inner.factors.items():
        above = len(incoming.factors[kind])
        factors[kind] = tuple(
            Factor(factor.s + incoming.factors[kind][m].s, factor.signs) if m < above else factor
            for m, factor in enumerate(chain))
    return Flow(incoming.q + inner.q, factors)


#: Folded into backprop's key for the sampled targets (the layers' keys are split from it).
SAMPLING_TAG = 0x6D63  # "mc"


def seed(kinds: Tuple[str, ...], loss, out, y, key) -> Dict[str, Tuple[Factor, ...]]:
    """The factors at the network's output, one per kind: the loss Hessian's exact square
    root (``"ggn"``; for ``"hessian"`` a signed one, so that any loss works) or a sampled one (``sampled(M)``, drawn from
    fold_in(fold_in(key, SAMPLING_TAG), M))."""
    factors = {}
    for kind in kinds:
        samples = samples_of(kind)
        if kind == HESSIAN:  # any loss: a signed root where H_b is indefinite
            factors[kind] = (Factor(*signed_hessian_sqrt(loss, out, y)),)
        elif samples is None:
            factors[kind] = (Factor(hessian_sqrt(loss, out, y)),)
        else:
            draw = jax.random.fold_in(jax.random.fold_in(key, SAMPLING_TAG), samples)
            factors[kind] = (Factor(sampled_hessian_sqrt(loss, out, y, draw, samples)),)
    return factors
