"""Memory policies for the backward pass: what the forward pass keeps, what is recomputed.

The backward step p_i = A_i^T q_{i+1}, q_i = B_i^T q_{i+1} needs layer i's residuals
(its input z_i and whatever its pullback stores). Keeping them all costs memory that grows
with depth L. The policies trade that memory for recomputation:

- ``keep``: keep every layer's residuals (``funcnet._reverse``; no recomputation).
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

import functools
import math

import jax
import jax.numpy as jnp
from jax.tree_util import Partial

from funcnet._chain import Chain, top_level
from funcnet._inputs import check_batch
from funcnet._repeat import Repeat
from funcnet._reverse import backward_pass, forward_pass, layer_vjp, loss_and_seed

def _barrier(tree):
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


def value_and_grad(net, loss, params, x, y, policy: str):
    """(value, grads) like ``funcnet.value_and_grad``, storing only what ``policy`` keeps."""
    check_batch(net, params, x)
    layers, layer_params = top_level(net, params)
    forward = _sqrt_forward if policy == "sqrt" else _recompute_forward
    out, pullbacks = forward(layers, tuple(layer_params), x)
    value, q = loss_and_seed(loss, out, y)
    grads, _ = backward_pass(pullbacks, q)
    if policy == "sqrt":  # one tuple of grads per segment
        grads = tuple(g for segment in grads for g in segment)
    return value, (grads if isinstance(net, Chain) else grads[0])


def _sqrt_forward(layers, params, x):
    z, pullbacks = x, []
    for start, stop in segment_bounds(len(layers)):
        pullbacks.append(functools.partial(
            _segment_pullback, layers[start:stop], params[start:stop], z))
        for layer, w in zip(layers[start:stop], params[start:stop]):
            z = layer.apply(w, z)  # nothing recorded: only the segment inputs are kept
    return z, pullbacks


def _segment_pullback(layers, params, z_in, q):
    """Recompute one segment from its input, recording pullbacks, then walk it down."""
    params, z_in, q = _barrier((params, z_in, q))
    _, _, pullbacks = forward_pass(layers, params, z_in, "sqrt")
    grads, cotangents = backward_pass(pullbacks, q)
    return grads, cotangents[0]


def _recompute_forward(layers, params, x):
    z = x
    for layer, w in zip(layers, params):
        z = layer.apply(w, z)
    pullbacks = [functools.partial(_recompute_pullback, layers[: i + 1], params[: i + 1], x)
                 for i in range(len(layers))]
    return z, pullbacks


def _recompute_pullback(layers, params, x, q):
    """Recompute z_i from x through layers 1..i-1, then take layer i's vjp at it."""
    params, x, q = _barrier((params, x, q))
    z = x
    for layer, w in zip(layers[:-1], params[:-1]):
        z = layer.apply(w, z)
    _, pullback = layer_vjp(layers[-1], params[-1], z, "recompute")
    return pullback(q)


# --- repeat(layer, n): the same policies over the n stacked copies, as scans ---------------


def _divisor_near_sqrt(n: int) -> int:
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: abs(d - math.sqrt(n)))


def repeat_vjp(repeat: Repeat, params, z, policy: str):
    """``(out, pullback)`` of a repeat under the ``sqrt`` or ``recompute`` policy."""
    if policy == "sqrt":
        size = _divisor_near_sqrt(repeat.n)
        count = repeat.n // size
        segments = jax.tree.map(lambda a: a.reshape((count, size) + a.shape[1:]), params)
        segment = Repeat(repeat.layer, size)
        out, segment_inputs = jax.lax.scan(
            lambda z_k, w_segment: (segment.apply(w_segment, z_k), z_k), z, segments,
            length=count)
        return out, Partial(functools.partial(_repeat_sqrt_pullback, repeat.layer, size, count),
                            segments, segment_inputs)
    out = repeat.apply(params, z)
    return out, Partial(functools.partial(_repeat_recompute_pullback, repeat.layer, repeat.n),
                        params, z)


def _repeat_sqrt_pullback(layer, size, count, segments, segment_inputs, q):
    def segment_step(q_next, segment):
        w_segment, z_in = segment
        w_segment, z_in, q_next = _barrier((w_segment, z_in, q_next))
        _, pullback = layer_vjp(Repeat(layer, size), w_segment, z_in)  # keep within it
        grads, q = pullback(q_next)
        return q, grads

    q, grads = jax.lax.scan(segment_step, q, (segments, segment_inputs), reverse=True,
                            length=count)
    return jax.tree.map(lambda g: g.reshape((-1,) + g.shape[2:]), grads), q


def _repeat_recompute_pullback(layer, n, params, z0, q):
    def copy(tree, k):
        return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, k, keepdims=False), tree)

    def step(q_next, k):
        w_all, z_first, q_next = _barrier((params, z0, q_next))
        z_k = jax.lax.fori_loop(0, k, lambda j, z: layer.apply(copy(w_all, j), z), z_first)
        _, pullback = layer_vjp(layer, copy(w_all, k), z_k)
        p, q = pullback(q_next)
        return q, p

    q, grads = jax.lax.scan(step, q, jnp.arange(n), reverse=True)
    return grads, q
