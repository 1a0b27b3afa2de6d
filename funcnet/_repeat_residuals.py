"""What ``repeat(block, n)`` keeps for its backward pass: activations, not every residual.

The direct way to differentiate a repeat is to scan ``layer_vjp`` over the n copies and
stack each copy's pullback, i.e. whatever residuals ``jax.vjp`` saved. For
``block = chain(dense, tanh)`` that stacks three (n, B, W) arrays: the dense input z_k,
and tanh's two residuals y_k and 1 - y_k, although y_k *is* z_{k+1}, the next copy's
input. Unrolled, XLA sees this and keeps one array per layer; inside a loop it cannot,
and where memory bandwidth is the limit the extra stacks (zero-filled, written, read
back) cost more than the loop itself.

So the repeat plans what to keep from its block's layers (a nested chain is walked as
the flat sequence of its layers), by what each backward step p = A^T q, q_in = B^T q needs:

- ``input``: dense (A^T q = (z^T q, sum q), B^T q = q w^T; w is in the stacked params
  already) and the elementwise activations without an output form (gelu, softplus,
  leaky_relu: B^T q = sigma'(z) * q). At copy k the backward scan rebuilds the pullback
  with ``jax.vjp`` at the kept input; the forward product it recomputes for dense is
  dead code there and XLA removes it, an activation costs one elementwise pass.
- ``output``: elementwise activations whose derivative is a function of their output
  (tanh, sigmoid, relu, identity; ``Elementwise.derivative_of_output``): q_in = sigma'(y) * q.
- ``record``: any other layer (a residual, a nested repeat, flatten, a user layer): its
  pullback is recorded in the forward scan and stacked, as in the direct way.

The forward scan keeps, per copy, only the activations some layer needs: the input of
layer j (0-based) when layer j needs its input or layer j - 1 its output. Copy k's output
is copy k + 1's input, so it is never kept twice: when the last layer is an ``output``
one, its step for copy k is taken in the iteration of copy k + 1, from the input kept
there (for the top copy, before the loop, from the repeat's output). For
``chain(dense, tanh)`` that is one (n, B, W) array instead of three, and only the
cotangent q is carried down the loop.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Tuple

import jax
import jax.numpy as jnp
from jax.tree_util import Partial

from funcnet._activations import Elementwise, LeakyRelu
from funcnet._chain import Chain
from funcnet._dense import Dense
from funcnet._layer import Layer
from funcnet._repeat import Repeat

INPUT, OUTPUT, RECORD = "input", "output", "record"


class ResidualPlan(NamedTuple):
    """What the forward scan of a repeat keeps, per copy.

    Attributes:
      layers: the block's layers, nested chains flattened, in order.
      needs: per layer, ``"input"``, ``"output"`` or ``"record"`` (see the module doc).
      kept: per layer j, whether its input activation is kept (stacked over the copies).
      last_step_deferred: whether the last layer's backward step (an ``output`` one) for
        copy k is taken in copy k + 1's iteration, from the input kept there.
    """

    layers: Tuple[Layer, ...]
    needs: Tuple[str, ...]
    kept: Tuple[bool, ...]
    last_step_deferred: bool


def needs_of(layer: Layer) -> str:
    """What the backward step of ``layer`` needs from the forward pass."""
    if isinstance(layer, Elementwise) and layer.derivative_of_output is not None:
        return OUTPUT
    if isinstance(layer, (Dense, Elementwise, LeakyRelu)):
        return INPUT
    return RECORD


@functools.lru_cache(maxsize=256)
def residual_plan(block: Layer) -> ResidualPlan:
    """The :class:`ResidualPlan` of ``repeat(block, n)`` (the same for every n)."""
    layers = _flat_layers(block)
    needs = tuple(needs_of(layer) for layer in layers)
    deferred = needs[-1] == OUTPUT
    kept = tuple((needs[j] == INPUT) or (needs[j - 1] == OUTPUT if j else deferred)
                 for j in range(len(layers)))
    return ResidualPlan(layers, needs, kept, deferred)


def repeat_vjp(repeat: Repeat, params, z, layer_vjp):
    """``(out, pullback)`` of a repeat under the ``keep`` policy; ``layer_vjp`` records the
    pullbacks of the ``record`` layers (it is ``funcnet._reverse.layer_vjp``)."""
    plan = residual_plan(repeat.layer)

    def forward_step(z_k, w_k):
        kept, recorded = [], []
        for j, (layer, w) in enumerate(zip(plan.layers, _flat_params(repeat.layer, w_k))):
            if plan.kept[j]:
                kept.append(z_k)
            if plan.needs[j] == RECORD:
                z_k, pullback = layer_vjp(layer, w, z_k)
                recorded.append(pullback)
            else:
                z_k = layer.apply(w, z_k)
        return z_k, (tuple(kept), tuple(recorded))

    out, (kept, recorded) = jax.lax.scan(forward_step, z, params, length=repeat.n)
    top = out if plan.last_step_deferred else None
    return out, Partial(functools.partial(_pullback, repeat.layer, repeat.n),
                        params, kept, recorded, top)


def _pullback(block, n, params, kept, recorded, top, q):
    """The backward loop: a reversed scan over the copies, each walked down layer by layer.

    With ``last_step_deferred`` the last layer's step, q <- sigma'(y) * q, is taken for the
    top copy before the loop (y = the repeat's output) and for copy k - 1 at the end of
    copy k's iteration (y = copy k's kept input): no activation is carried down the loop.
    """
    plan = residual_plan(block)
    last = plan.layers[-1]
    if plan.last_step_deferred:
        q = last.derivative_of_output(top) * q

    def backward_step(q, copy):
        k, w_k, kept_k, recorded_k = copy
        weights = _flat_params(block, w_k)
        inputs = iter(kept_k)
        activations = [next(inputs) if keep else None for keep in plan.kept]
        pullbacks = iter(reversed(recorded_k))
        grads = [None] * len(plan.layers)
        for j in reversed(range(len(plan.layers))):
            layer, w, need = plan.layers[j], weights[j], plan.needs[j]
            if need == OUTPUT:  # B^T q = sigma'(y) * q, y = the next layer's input; no params
                grads[j] = jax.tree.map(jnp.zeros_like, w)
                if j < len(plan.layers) - 1:
                    q = layer.derivative_of_output(activations[j + 1]) * q
            elif need == INPUT:
                _, pullback = jax.vjp(layer.apply, w, activations[j])
                grads[j], q = pullback(q)
            else:
                grads[j], q = next(pullbacks)(q)
        if plan.last_step_deferred:  # copy k - 1's last step; there is none below copy 0
            q = jnp.where(k > 0, last.derivative_of_output(activations[0]) * q, q)
        return q, _nest(block, iter(grads))

    q, grads = jax.lax.scan(backward_step, q, (jnp.arange(n), params, kept, recorded),
                            reverse=True, length=n)
    return grads, q


def _flat_layers(layer: Layer) -> Tuple[Layer, ...]:
    if isinstance(layer, Chain):
        return tuple(leaf for item in layer.layers for leaf in _flat_layers(item))
    return (layer,)


def _flat_params(layer: Layer, params) -> list:
    if isinstance(layer, Chain):
        return [w for item, p in zip(layer.layers, params) for w in _flat_params(item, p)]
    return [params]


def _nest(layer: Layer, flat):
    """The inverse of :func:`_flat_params`: ``flat`` (an iterator) back into ``layer``'s
    params structure."""
    if isinstance(layer, Chain):
        return tuple(_nest(item, flat) for item in layer.layers)
    return next(flat)
