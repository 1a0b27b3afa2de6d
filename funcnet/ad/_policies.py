"""Memory policies for the backward pass: what the forward pass keeps, what is recomputed.

The backward step p_i = A_i^T q_{i+1}, q_i = B_i^T q_{i+1} needs layer i's residuals
(its input z_i and whatever its pullback stores). Keeping them all costs memory that grows
with depth L. The policies trade that memory for recomputation:

- ``keep``: keep every layer's residuals (no recomputation).
- ``sqrt``: keep only the inputs of segments of about sqrt(L) consecutive layers; on the
  way down, recompute one segment's forward pass (recording its pullbacks) and walk it.
  Memory ~ (L / s + s) activations for segments of s layers, minimal at s = sqrt(L);
  about one extra forward pass of compute.
- ``recompute``: keep only the input x; when the backward pass reaches layer i, recompute
  z_i from x. Memory ~ one activation at a time, compute O(L^2) layer evaluations.

Inside a ``repeat`` the same policy applies to its n copies, scan by scan.

Every recomputation starts from ``jax.lax.optimization_barrier`` over its inputs *and the
incoming cotangent q*. Without it XLA's common-subexpression elimination sees that the
recomputed forward equals the original one, merges them, and so keeps the original
activations alive: the same memory as ``keep``. Tying the recomputation to q makes it
depend on the backward pass, so it can be neither merged nor hoisted.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

#: The memory policies of the backward walk; see :func:`funcnet.value_and_grad`.
REMAT_POLICIES = ("keep", "sqrt", "recompute")


def barrier(tree):
    """``tree``, made to depend on its last entry (the incoming cotangent q).

    ``jax.lax.optimization_barrier`` is the intended tool, but XLA's CPU pipeline drops
    barriers before common-subexpression elimination (measured: same FLOPs and memory as
    ``keep``). So the first array of every entry but the last also gets ``0 * q[0]``
    added: exact (adding zero), opaque to XLA's algebraic simplifier (``x * 0`` is not 0
    for floats, where x may be NaN), and it makes the recomputation a function of q.
    """
    tree = jax.lax.optimization_barrier(tree)
    q = jax.tree.leaves(tree[-1])[0]
    zero = jnp.ravel(q)[0] * 0

    def tie(entry):
        leaves, treedef = jax.tree.flatten(entry)
        if not leaves:
            return entry
        first = leaves[0]
        leaves[0] = first + jnp.broadcast_to(zero.astype(first.dtype), first.shape)
        return jax.tree.unflatten(treedef, leaves)

    return tuple(tie(entry) for entry in tree[:-1]) + (tree[-1],)


def segment_bounds(n_layers: int):
    """``[(start, stop), ...]``: consecutive segments of about sqrt(n_layers) layers."""
    size = max(1, round(math.sqrt(n_layers)))
    return [(start, min(start + size, n_layers)) for start in range(0, n_layers, size)]


def divisor_near_sqrt(n: int) -> int:
    """The divisor of n closest to sqrt(n): the segment length of a repeat under sqrt."""
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: abs(d - math.sqrt(n)))
