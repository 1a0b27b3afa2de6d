"""What ``repeat(block, n)`` keeps for its backward pass: activations, not every residual.

The direct way to differentiate a repeat is to scan ``layer_vjp`` over the n copies and
stack each copy's pullback, i.e. whatever residuals ``jax.vjp`` saved. For
``block = chain(dense, tanh)`` that stacks three (n, B, W) arrays: the dense input z_k,
and tanh's two residuals y_k and 1 - y_k, although y_k *is* z_{k+1}, the next copy's
input. Unrolled, XLA sees this and keeps one array per layer; inside a loop it cannot,
and where memory bandwidth is the limit the extra stacks (zero-filled, written, read
back) cost more than the loop itself.

So the repeat plans what to keep from its block's layers (a nested chain is walked as
the flat sequence of its layers), by what each layer says its backward step
p = A^T q, q_in = B^T q needs (``Layer.repeat_keeps``):

- ``input``: e.g. dense (A^T q = (z^T q, sum q), B^T q = q w^T; w is in the stacked
  params already) and the elementwise activations without an output form (gelu,
  softplus, leaky_relu: B^T q = sigma'(z) * q). At copy k the backward scan rebuilds the
  pullback with ``jax.vjp`` at the kept input; the forward product it recomputes for
  dense is dead code there and XLA removes it, an activation costs one elementwise pass.
- ``output``: e.g. tanh, sigmoid, relu, identity, whose derivative is a function of
  their output: q_in = sigma'(y) * q (``Layer.input_cotangent_from_output``).
- ``record`` (``repeat_keeps = None``, the default): any other layer (a residual, a
  nested repeat, flatten, a user layer): its node is recorded in the forward scan and
  stacked, as in the direct way.

When an extension rides along the walk it needs every layer's input z_i, so ``output``
layers are then planned as ``input`` ones.

The forward scan keeps, per copy, only the activations some layer needs: the input of
layer j (0-based) when layer j needs its input or layer j - 1 its output. Copy k's output
is copy k + 1's input, so it is never kept twice: when the last layer is an ``output``
one, its step for copy k is taken in the iteration of copy k + 1, from the input kept
there (for the top copy, before the loop, from the repeat's output). For
``chain(dense, tanh)`` that is one (n, B, W) array instead of three, and only the
cotangent q is carried down the loop.
"""

from __future__ import annotations

from typing import NamedTuple, Tuple

from funcnet._caches import bounded_cache
from funcnet.nn._chain import flat_layers
from funcnet.nn._layer import Layer

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


def needs_of(layer: Layer, inputs_needed: bool = False) -> str:
    """What the backward step of ``layer`` needs from the forward pass."""
    keeps = None if layer.stochastic else layer.repeat_keeps  # only its key redraws a mask
    if keeps == OUTPUT and not inputs_needed:
        return OUTPUT
    if keeps in (INPUT, OUTPUT):
        return INPUT
    return RECORD


@bounded_cache(maxsize=256)
def residual_plan(block: Layer, inputs_needed: bool = False) -> ResidualPlan:
    """The :class:`ResidualPlan` of ``repeat(block, n)`` (the same for every n);
    ``inputs_needed`` when an extension reads every layer's input."""
    layers = flat_layers(block)
    needs = tuple(needs_of(layer, inputs_needed) for layer in layers)
    deferred = needs[-1] == OUTPUT
    kept = tuple((needs[j] == INPUT) or (needs[j - 1] == OUTPUT if j else deferred)
                 for j in range(len(layers)))
    return ResidualPlan(layers, needs, kept, deferred)
