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

Curvature extensions read more than q: square-root factors S_{i+1} of each example's
loss Hessian at the layer's output (``funcnet.ad._factors``), which the walk seeds from the
loss and pulls back beside q for the kinds an extension names in ``factor_kinds``;
:func:`factor_diag` and :func:`per_example_factor_diag` turn them into diagonals.

A new extension is one module: a frozen dataclass (hashable: the walk's configuration is
a static argument of compiled code) subclassing :class:`Extension`, plus an export.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, NamedTuple, Tuple

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
      factors: the curvature factors at the layer's output, ``{kind: (Factor, ...)}``
        (``funcnet.ad._factors``), for the kinds the extensions asked for.
    """

    layer: Layer
    params: Any
    z: jax.Array
    q: jax.Array
    pullback: Callable
    grads: Any = None
    factors: Any = None

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

    @property
    def factor_kinds(self) -> Tuple[str, ...]:
        """The curvature factors this extension reads (``funcnet.ad._factors``): the walk
        seeds them from the loss and carries them down beside q. None by default."""
        return ()

    def check_network(self, net: Layer) -> None:
        """Raises, naming the layer, when the extension cannot run on ``net``; called by
        :func:`funcnet.backprop` before any work. Nothing to check by default."""

    def empty_share(self, params) -> Any:
        """The share of a parameterless layer (params ``()``): ``()`` by default."""
        return params

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


def per_example_factor_diag(context: LeafContext, factor):
    """sum_m sign[m, b] (A_b^T S[m, b])^2 entrywise for every example b, leaves
    (B, *leaf shape): the diagonal of A_b^T H_b A_b for the factor's H_b (see
    ``funcnet.ad._factors``). The layer's rule (``"per_example_factor_diag"``, dense:
    z_b^2 (sum_m sign S[m, b]^2)^T) when it brings one and it applies, else
    :func:`per_example_grads` of every column, squared, signed and summed."""
    rule = context.layer.rule("per_example_factor_diag")
    result = rule(context.layer, context.params, context.z, *factor) if rule else None
    if result is not None:
        return result

    def column(s, signs):
        grads = per_example_grads(context._replace(q=s))
        weight = 1 if signs is None else signs
        return jax.tree.map(lambda a: jnp.square(a) * _expand(weight, a), grads)

    return jax.tree.map(lambda a: jnp.sum(a, axis=0), jax.vmap(column)(*factor))


def factor_diag(context: LeafContext, factor):
    """sum_b sum_m sign[m, b] (A_b^T S[m, b])^2 entrywise, leaves like params: the layer's
    rule (``"factor_diag"``, dense: (Z^2)^T (sum_m sign S_m^2)) when it applies, else
    :func:`sum_of_squares` of every column (signed columns split into their positive and
    negative parts, A_b^T being linear) summed."""
    rule = context.layer.rule("factor_diag")
    result = rule(context.layer, context.params, context.z, *factor) if rule else None
    if result is not None:
        return result

    def column(s, signs):
        if signs is None:
            return sum_of_squares(context._replace(q=s))
        positive = sum_of_squares(context._replace(q=s * _expand(signs > 0, s)))
        negative = sum_of_squares(context._replace(q=s * _expand(signs < 0, s)))
        return jax.tree.map(jnp.subtract, positive, negative)

    return jax.tree.map(lambda a: jnp.sum(a, axis=0), jax.vmap(column)(*factor))


def _expand(weight, like):
    """A per-example weight (B,) shaped to multiply ``like`` (B, ...)."""
    weight = jnp.asarray(weight, like.dtype)
    return weight.reshape(weight.shape + (1,) * (like.ndim - weight.ndim))
