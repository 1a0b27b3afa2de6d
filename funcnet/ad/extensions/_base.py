"""The extension protocol: more quantities from the same backward walk.

On its way down, the walk (``funcnet.ad._walk``) reaches every leaf layer i (a layer that
is not a chain, residual or repeat) with everything its backward step uses:

    the layer g_i, its params w_i, its input z_i (B, *in_shape),
    the output cotangent q_{i+1} (B, *out_shape) and the recorded pullback
    q -> (A_i^T q, B_i^T q).

It computes p_i and q_i from the pullback, then hands the same :class:`LeafContext` to
every extension asked for, whose :meth:`Extension.at_leaf` returns that layer's share of
its quantity: a pytree like w_i (with a leading batch axis (B, ...) on every leaf when the
extension is ``batched``). The walk assembles the shares into a pytree like the network's
params, through chains, residuals, repeats (the backward scan stacks the copies' shares
along the params' copy axis) and the segments of every memory policy, and
:func:`funcnet.backprop` returns it as ``record.extensions[extension.name]``.

The q here is the cotangent of the batch loss, which is the mean of the examples' own
losses l_b: row b of q_{i+1} is (1/B) d l_b / d z_{i+1}[b]. An extension that wants
per-example quantities of l_b scales by B.

A new extension is one module: a frozen dataclass (hashable: the walk's configuration is
a static argument of compiled code) subclassing :class:`Extension`, plus an export.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from funcnet.nn._layer import Layer


class LeafContext(NamedTuple):
    """What the walk knows at leaf layer i on its way down.

    Attributes:
      layer: g_i.
      params: w_i.
      z: z_i, the layer's input, (B, *in_shape).
      q: q_{i+1}, the cotangent of the batch loss at the layer's output, (B, *out_shape).
      pullback: ``pullback(q) -> (A_i^T q, B_i^T q)`` at (w_i, z_i), summed over the batch.
      grads: p_i = A_i^T q_{i+1}, the layer's gradient (like ``params``), which the walk
        has already computed.
    """

    layer: Layer
    params: Any
    z: jax.Array
    q: jax.Array
    pullback: Callable
    grads: Any = None

    @property
    def batch_size(self) -> int:
        return self.q.shape[0]

    @property
    def has_params(self) -> bool:
        """False for a parameterless layer, whose share of every quantity is ``()``."""
        return bool(jax.tree.leaves(self.params))


@dataclasses.dataclass(frozen=True)
class Extension:
    """A quantity computed alongside p_i and q_i by the backward walk.

    Subclasses set ``name`` (the key in ``record.extensions``), ``batched`` (whether
    every result leaf carries a leading batch axis) and ``copies`` (how the copies of a
    repeat combine) and implement :meth:`at_leaf`.
    """

    name: ClassVar[str] = "extension"
    batched: ClassVar[bool] = False
    #: How a repeat's copies combine, whose params are stacked along a leading copy axis:
    #: ``"stack"`` (the shares stacked like the params: quantities per parameter entry)
    #: or ``"sum"`` (added: quantities per parameter LEAF, such as a squared norm over it).
    copies: ClassVar[str] = "stack"

    def at_leaf(self, context: LeafContext) -> Any:
        """This leaf layer's share: a pytree like ``context.params`` (leaves prefixed by
        the batch axis when ``batched``)."""
        raise NotImplementedError


def per_example_grads_generic(layer: Layer, params, z, q):
    """A_b^T q_b for every example b, for any layer: the layer's pullback, one example at
    a time (``jax.vmap`` over the batch of ``jax.vjp`` at (w_i, z_i[b])). Leaves
    (B, *leaf shape); their sum over b is p_i."""

    def one_example(z_b, q_b):
        _, pullback = jax.vjp(lambda w: layer.apply(w, z_b[None]), params)
        return pullback(q_b[None])[0]

    return jax.vmap(one_example)(z, q)


def per_example_grads(context: LeafContext):
    """a_b = A_b^T q_b per example: the layer's own rule when it brings one
    (``layer.rule("per_example_grads")``), else :func:`per_example_grads_generic`."""
    rule = context.layer.rule("per_example_grads") or per_example_grads_generic
    return rule(context.layer, context.params, context.z, context.q)


def per_example_sq_norms(context: LeafContext):
    """||a_b||^2 over each params leaf, leaves (B,): the layer's rule
    (``"per_example_sq_norms"``, e.g. dense's ||z_b||^2 ||q_b||^2 without a_b) or the
    squares of :func:`per_example_grads` summed."""
    rule = context.layer.rule("per_example_sq_norms")
    if rule is not None:
        return rule(context.layer, context.params, context.z, context.q)
    return jax.tree.map(lambda a: jnp.sum(jnp.square(a).reshape(a.shape[0], -1), axis=1),
                        per_example_grads(context))


def sum_of_squares(context: LeafContext):
    """sum_b a_b^2 entrywise, leaves like params: the layer's rule (``"sum_of_squares"``,
    e.g. dense's (Z^2)^T (Q^2)) or the squares of :func:`per_example_grads` summed."""
    rule = context.layer.rule("sum_of_squares")
    if rule is not None:
        return rule(context.layer, context.params, context.z, context.q)
    return jax.tree.map(lambda a: jnp.sum(jnp.square(a), axis=0), per_example_grads(context))
