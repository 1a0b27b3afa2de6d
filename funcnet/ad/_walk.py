"""The one backward walk: p_i = A_i^T q_{i+1} and q_i = B_i^T q_{i+1}, computed in one place.

For a chain z_{i+1} = g_i(w_i; z_i), i = 1..L, and a loss l_y(z_{L+1}):

    forward:   z_{i+1} = g_i(w_i; z_i), recording what the backward step will need
    seed:      q_{L+1} = grad l_y(z_{L+1})
    backward:  for i = L, ..., 1:   p_i = A_i^T q_{i+1},   q_i = B_i^T q_{i+1}

where (A_i, B_i) is the Jacobian of g_i split into parameter and input columns. Only
vectors flow: each step is one pullback (``jax.vjp``) of one leaf layer, computed in
:func:`leaf_step` and nowhere else.

The walk has two halves, over a tree of *nodes* that mirrors the network:

- :func:`record` runs the forward pass and returns a node per layer: a :class:`Leaf`
  (the layer's pullback, and its input z_i when an extension will read it), a
  :class:`Sequence` for a chain, a :class:`Skip` for a residual, and for a repeat a node
  of stacked activations (:class:`ScanKeep`) or of segment inputs.
- :func:`walk_down` walks the nodes down from q_{L+1}: through a chain in reverse, through
  a residual as q_i = q_{i+1} + B_inner^T q_{i+1}, through a repeat as a reversed
  ``lax.scan`` whose body rebuilds one copy's nodes and walks them.

The memory policy and the extensions are the walk's arguments (:class:`Walk`): a policy
decides what the forward pass keeps; what it does not keep is a :class:`Deferred` node
(only its inputs kept) that is recorded again when the walk reaches it, tied to the
incoming q so that XLA can neither merge nor hoist the recomputation
(``funcnet.ad._policies``). Extensions see every leaf on the way down
(``funcnet.ad.extensions``); for the curvature extensions the walk carries square-root
factors of the loss Hessian beside q (a :class:`~funcnet.ad._factors.Flow`), every column
pulled back by the same pullback. The walk knows the three ways layers compose (in
sequence, with a skip, repeated) and nothing about leaf layers: what a leaf needs inside a
repeat, and any faster rule, the layer says itself.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
from jax.tree_util import Partial

from funcnet._caches import bounded_cache
from funcnet._errors import ArgumentError
from funcnet.ad import _compiled
from funcnet.ad._factors import Flow, add_curved_terms, join_skip, pull
from funcnet.ad._policies import REMAT_POLICIES, barrier, divisor_near_sqrt, segment_bounds
from funcnet.ad._repeat_plan import INPUT, OUTPUT, RECORD, residual_plan
from funcnet.ad.extensions._base import Extension, LeafContext
from funcnet.nn._chain import Chain, flat_keys, flat_params, nest_params
from funcnet.nn._layer import Layer, apply_with_key
from funcnet.nn._repeat import Repeat
from funcnet.nn._residual import Residual


@dataclasses.dataclass(frozen=True)
class Walk:
    """The walk's arguments: the memory ``policy`` ("keep", "sqrt" or "recompute") and the
    ``extensions`` that ride along. Hashable: a static value of compiled code."""

    policy: str = "keep"
    extensions: Tuple[Extension, ...] = ()

    def __post_init__(self):
        if self.policy not in REMAT_POLICIES:
            raise ArgumentError("remat", f"must be one of {REMAT_POLICIES}, got {self.policy!r}.")
        for extension in self.extensions:
            if not isinstance(extension, Extension):
                raise ArgumentError(
                    "extensions", f"must be fnet.extensions objects such as "
                                  f"fnet.extensions.batch_grad(), got {extension!r}.")
        names = [extension.name for extension in self.extensions]
        if len(set(names)) != len(names):
            raise ArgumentError("extensions", f"each extension may be asked for once, got "
                                              f"{names}.")

    @property
    def keeps_inputs(self) -> bool:
        """Whether leaves keep their input z_i (extensions read it)."""
        return bool(self.extensions)

    @property
    def factor_kinds(self) -> Tuple[str, ...]:
        """The curvature factors carried down beside q (``funcnet.ad._factors``)."""
        return tuple(sorted({kind for extension in self.extensions
                             for kind in extension.factor_kinds}))


def _pytree(*data: str, meta: Tuple[str, ...] = ()):
    """A frozen dataclass registered as a pytree (``data`` fields are its children)."""

    def register(cls):
        cls = dataclasses.dataclass(frozen=True)(cls)
        return jax.tree_util.register_dataclass(cls, data_fields=list(data),
                                                meta_fields=list(meta))

    return register


# --- Nodes: what the forward pass recorded --------------------------------------------


@_pytree("params", "z", "pullback", meta=("layer",))
class Leaf:
    """A leaf layer's record: ``pullback(q) -> (A^T q, B^T q)`` at (params, z); ``z`` is
    None unless an extension needs it."""

    params: Any
    z: Optional[jax.Array]
    pullback: Any
    layer: Layer


@_pytree("children", meta=("spliced",))
class Sequence:
    """A chain's nodes, first layer first. ``spliced``: a segment of the top-level chain
    (its layers count as the chain's own, one p_i and q_i each)."""

    children: Tuple[Any, ...]
    spliced: bool = False


@_pytree("inner")
class Skip:
    """A residual z + inner(z): the inner layer's node."""

    inner: Any


@_pytree("args", "keys", meta=("rebuild",))
class Deferred:
    """Not kept: ``rebuild(*args, keys)`` records it again (its only inputs, ``args``, are
    kept; ``keys``, the PRNG keys of its stochastic layers, redraw the same masks)."""

    args: Tuple[Any, ...]
    keys: Any
    rebuild: Callable

    def resolve(self, q):
        """The node, recorded again now that the walk has reached it with ``q``."""
        return self.rebuild(*barrier(tuple(self.args) + (q,))[:-1], self.keys)


@_pytree("params", "kept", "recorded", "top", meta=("repeat", "inputs_needed"))
class ScanKeep:
    """A repeat under ``keep``: per copy, the activations its layers' steps need
    (``_repeat_plan``) and the nodes of its ``record`` layers, stacked over the copies;
    ``top`` is the repeat's output when the last layer's step is deferred."""

    params: Any
    kept: Tuple[jax.Array, ...]
    recorded: Tuple[Any, ...]
    top: Optional[jax.Array]
    repeat: Repeat
    inputs_needed: bool


@_pytree("segments", "inputs", "keys", meta=("repeat",))
class ScanSegments:
    """A repeat under ``sqrt``: the inputs of its segments of about sqrt(n) copies (and
    the copies' keys, (count, size) like the segments' params, or None)."""

    segments: Any
    inputs: jax.Array
    keys: Any
    repeat: Repeat


@_pytree("params", "z", "keys", meta=("repeat",))
class ScanRecompute:
    """A repeat under ``recompute``: only its input; copy k's input is recomputed from it
    (with the copies' keys, or None)."""

    params: Any
    z: jax.Array
    keys: Any
    repeat: Repeat


# --- The forward half -----------------------------------------------------------------


def record(layer: Layer, params, z, walk: Walk, key=None):
    """``(z_next, node)``: the forward pass of ``layer``, recording its node. ``key``
    (optional) is split over stochastic layers as ``layer.apply`` splits it."""
    if isinstance(layer, Chain):
        nodes = []
        for item, item_params, item_key in zip(layer.layers, params, layer.item_keys(key)):
            z, node = record(item, item_params, z, walk, item_key)
            nodes.append(node)
        return z, Sequence(tuple(nodes))
    if isinstance(layer, Residual):
        out, inner = record(layer.inner, params, z, walk, key)
        return z + out, Skip(inner)
    if isinstance(layer, Repeat):
        return _record_repeat(layer, params, z, walk, layer.copy_keys(key))
    key = key if layer.stochastic else None
    if _compiled.is_concrete(params, z, key):  # called without jit: compiled per-layer code
        out, pullback = _compiled.compiled_vjp(layer)(params, z, key)
        pullback = Partial(_compiled.run_pullback, pullback)
    else:
        out, pullback = jax.vjp(lambda w, z_: apply_with_key(layer, w, z_, key), params, z)
    return out, Leaf(params, z if walk.keeps_inputs else None, pullback, layer)


def record_layers(layers, params, x, walk: Walk, keys=None):
    """The forward pass of a top-level chain under ``walk.policy``.

    Returns (z_{L+1}, [z_1..z_{L+1}], nodes): ``keep`` records every layer; ``sqrt`` keeps
    the inputs of segments of about sqrt(L) layers (one spliced :class:`Deferred` node
    each); ``recompute`` keeps only x (one :class:`Deferred` per layer, recomputing its
    input from x). Repeats inside follow the same policy. ``keys``: per layer, its PRNG
    key or None (``funcnet.nn._chain.top_level_keys``); a deferred node keeps its keys,
    so what is recorded again draws the same masks.
    """
    keys = (None,) * len(layers) if keys is None else tuple(keys)
    activations, nodes, z = [x], [], x
    if walk.policy == "keep":
        for layer, w, key in zip(layers, params, keys):
            z, node = record(layer, w, z, walk, key)
            activations.append(z)
            nodes.append(node)
        return z, activations, nodes
    if walk.policy == "sqrt":
        for start, stop in segment_bounds(len(layers)):
            nodes.append(Deferred((tuple(params[start:stop]), z), keys[start:stop],
                                  functools.partial(_record_segment, tuple(layers[start:stop]),
                                                    walk)))
            for layer, w, key in zip(layers[start:stop], params[start:stop], keys[start:stop]):
                z = apply_with_key(layer, w, z, key)  # nothing recorded: only segment inputs kept
                activations.append(z)
        return z, activations, nodes
    for index, (layer, w, key) in enumerate(zip(layers, params, keys)):
        nodes.append(Deferred((tuple(params[:index + 1]), x), keys[:index + 1],
                              functools.partial(_record_prefix, tuple(layers[:index + 1]), walk)))
        z = apply_with_key(layer, w, z, key)
        activations.append(z)
    return z, activations, nodes


def _record_segment(layers, walk: Walk, params, z, keys):
    """A segment of the top-level chain recorded again from its input."""
    nodes = []
    for layer, w, key in zip(layers, params, keys):
        z, node = record(layer, w, z, walk, key)
        nodes.append(node)
    return Sequence(tuple(nodes), spliced=True)


def _record_prefix(layers, walk: Walk, params, x, keys):
    """Layer i's node, its input z_i recomputed from x through layers 1..i-1."""
    z = x
    for layer, w, key in zip(layers[:-1], params[:-1], keys[:-1]):
        z = apply_with_key(layer, w, z, key)
    return record(layers[-1], params[-1], z, walk, keys[-1])[1]


def _record_repeat(repeat: Repeat, params, z, walk: Walk, keys=None):
    """A repeat's forward pass and node; ``keys``: the copies' keys (n,) or None."""
    if walk.policy == "sqrt":
        size = divisor_near_sqrt(repeat.n)
        count = repeat.n // size
        segments, keys = jax.tree.map(lambda a: a.reshape((count, size) + a.shape[1:]),
                                      (params, keys))
        segment = Repeat(repeat.layer, size)
        out, inputs = jax.lax.scan(
            lambda z_k, copy: (segment.apply_copies(copy[0], z_k, copy[1]), z_k), z,
            (segments, keys), length=count)
        return out, ScanSegments(segments, inputs, keys, repeat)
    if walk.policy == "recompute":
        return repeat.apply_copies(params, z, keys), ScanRecompute(params, z, keys, repeat)
    plan = residual_plan(repeat.layer, walk.keeps_inputs)

    def forward_step(z_k, copy):
        w_k, key_k = copy
        kept, recorded = [], []
        layer_keys = flat_keys(repeat.layer, key_k)
        for j, (layer, w) in enumerate(zip(plan.layers, flat_params(repeat.layer, w_k))):
            if plan.kept[j]:
                kept.append(z_k)
            if plan.needs[j] == RECORD:
                z_k, node = record(layer, w, z_k, walk, layer_keys[j])
                recorded.append(node)
            else:  # (a stochastic layer is always recorded: only its key redraws its mask)
                z_k = layer.apply(w, z_k)
        return z_k, (tuple(kept), tuple(recorded))

    out, (kept, recorded) = jax.lax.scan(forward_step, z, (params, keys), length=repeat.n)
    top = out if plan.last_step_deferred else None
    return out, ScanKeep(params, kept, recorded, top, repeat, walk.keeps_inputs)


# --- The backward half ----------------------------------------------------------------


class Down(NamedTuple):
    """What walking a node down returns: its ``grads`` (like its params), the
    :class:`~funcnet.ad._factors.Flow` ``q`` at its input (the cotangent and any curvature
    factors), and ``extensions``, one pytree like its params per extension."""

    grads: Any
    q: Flow
    extensions: Tuple[Any, ...]


def leaf_step(leaf: Leaf, flow: Flow, walk: Walk) -> Down:
    """THE backward step of leaf layer i: p_i = A_i^T q_{i+1}, q_i = B_i^T q_{i+1} from its
    pullback, the curvature factors pulled back by the same pullback (S_i = B_i^T S_{i+1},
    column by column, plus a curved layer's own terms), and every extension's share from
    the same (w_i, z_i, q_{i+1}, factors at z_{i+1}, pullback)."""
    p, q_in = leaf.pullback(flow.q)
    context = LeafContext(leaf.layer, leaf.params, leaf.z, flow.q, leaf.pullback, p,
                          flow.factors)
    shares = tuple(_at_leaf(extension, context) for extension in walk.extensions)
    factors = add_curved_terms(leaf.layer, leaf.z, flow.q, pull(leaf.pullback, flow.factors))
    return Down(p, Flow(q_in, factors), shares)


def _at_leaf(extension: Extension, context: LeafContext):
    if not context.has_params:  # nothing to say about a parameterless layer
        return extension.empty_share(context.params)
    if _compiled.is_concrete(context.params, context.z, context.q, context.factors):
        return _compiled_at_leaf(extension, context.layer)(
            context.params, context.z, context.q, context.pullback, context.grads,
            context.factors)
    return extension.at_leaf(context)


@bounded_cache(maxsize=1024)
def _compiled_at_leaf(extension: Extension, layer: Layer):
    """An extension's rule at one layer, compiled (for calls without jit)."""
    return jax.jit(lambda params, z, q, pullback, grads, factors: extension.at_leaf(
        LeafContext(layer, params, z, q, pullback, grads, factors)))


def walk_down(node, q: Flow, walk: Walk) -> Down:
    """Walks ``node`` down from the :class:`~funcnet.ad._factors.Flow` ``q`` at its output
    (the cotangent, and the curvature factors when extensions asked for them)."""
    if isinstance(node, Leaf):
        return leaf_step(node, q, walk)
    if isinstance(node, Deferred):
        return walk_down(node.resolve(q), q, walk)
    if isinstance(node, Sequence):
        grads, cotangents, extensions = walk_layers(node.children, q, walk)
        return Down(tuple(grads), cotangents[0], _per_extension(extensions, len(walk.extensions)))
    if isinstance(node, Skip):
        inner = walk_down(node.inner, q, walk)
        return Down(inner.grads, join_skip(q, inner.q), inner.extensions)  # B = I + B_inner
    if isinstance(node, ScanKeep):
        return _walk_scan_keep(node, q, walk)
    if isinstance(node, ScanSegments):
        return _walk_scan_segments(node, q, walk)
    return _walk_scan_recompute(node, q, walk)


def walk_layers(nodes, q: Flow, walk: Walk):
    """Walks a chain's nodes down from the flow of q = q_{L+1}.

    Returns ([p_1..p_L], [flows of q_1..q_{L+1}], [extension shares of layer 1..L]); the
    segments of a top-level chain under ``sqrt`` are recorded again and spliced in layer
    by layer.
    """
    grads, cotangents, extensions = [], [q], []
    for node in reversed(nodes):
        if isinstance(node, Deferred):
            node = node.resolve(q)
        if isinstance(node, Sequence) and node.spliced:
            inner_grads, inner_cotangents, inner_extensions = walk_layers(node.children, q, walk)
            grads[:0] = inner_grads
            extensions[:0] = inner_extensions
            cotangents.extend(reversed(inner_cotangents[:-1]))
            q = inner_cotangents[0]
            continue
        down = walk_down(node, q, walk)  # p_i = A_i^T q_{i+1},  q_i = B_i^T q_{i+1}
        grads.insert(0, down.grads)
        extensions.insert(0, down.extensions)
        q = down.q
        cotangents.append(q)
    return grads, cotangents[::-1], extensions


def _per_extension(shares, count: int) -> Tuple[Any, ...]:
    """[per layer: (share of extension 0, 1, ...)] -> (per extension: (layer 1, 2, ...))."""
    return tuple(tuple(share[k] for share in shares) for k in range(count))


def _copies_last(walk: Walk, extensions, copy_axes: int = 1):
    """Extension results over a repeat's copies, copy axes first, into the params' layout.

    ``copies == "stack"``: a batched result (n, B, ...) becomes (B, n, ...), like the
    stacked params; ``"sum"``: the copies are added, (n, B) -> (B,). With ``copy_axes=2``
    the copies come as (count, size) segments, merged into one axis of n = count * size.
    """
    def params_layout(extension, a):
        if extension.copies == "sum":
            return jnp.sum(a, axis=tuple(range(copy_axes)))
        if extension.batched:
            a = jnp.moveaxis(a, copy_axes, 0)  # the batch axis first
        start = 1 if extension.batched else 0
        return a.reshape(a.shape[:start] + (-1,) + a.shape[start + copy_axes:])

    return tuple(jax.tree.map(functools.partial(params_layout, extension), tree)
                 for extension, tree in zip(walk.extensions, extensions))


def _output_pullback(layer: Layer, params, y, q):
    """The pullback of an ``output`` layer: q_i from its output y alone; no params."""
    return jax.tree.map(jnp.zeros_like, params), layer.input_cotangent_from_output(y, q)


def _copy_nodes(node: ScanKeep, w_k, kept_k, recorded_k):
    """One copy's leaf nodes rebuilt from what the forward scan kept: an ``input`` layer's
    pullback by ``jax.vjp`` at its kept input (the forward product it recomputes is dead
    code, removed by XLA), an ``output`` layer's from the next layer's input, a
    ``record`` layer's node as recorded. The deferred last step is left out."""
    plan = residual_plan(node.repeat.layer, node.inputs_needed)
    weights = flat_params(node.repeat.layer, w_k)
    inputs = iter(kept_k)
    activations = [next(inputs) if keep else None for keep in plan.kept]
    recorded = iter(recorded_k)
    nodes = []
    for j, (layer, w, need) in enumerate(zip(plan.layers, weights, plan.needs)):
        if need == INPUT:
            _, pullback = jax.vjp(layer.apply, w, activations[j])
            nodes.append(Leaf(w, activations[j] if node.inputs_needed else None, pullback, layer))
        elif need == OUTPUT and j < len(plan.layers) - 1:
            pullback = functools.partial(_output_pullback, layer, w, activations[j + 1])
            nodes.append(Leaf(w, None, pullback, layer))
        elif need == RECORD:
            nodes.append(next(recorded))
    return nodes, weights


def _walk_scan_keep(node: ScanKeep, q, walk: Walk) -> Down:
    """The reversed scan over a repeat's copies, each rebuilt and walked layer by layer.

    With ``last_step_deferred`` the last layer's step (an ``output`` one) is taken for the
    top copy before the loop (y = the repeat's output) and for copy k - 1 at the end of
    copy k's iteration (y = copy k's kept input): no activation is carried down the loop.
    """
    repeat = node.repeat
    plan = residual_plan(repeat.layer, node.inputs_needed)
    last = plan.layers[-1]

    def last_step(y, q):
        leaf = Leaf((), None, functools.partial(_output_pullback, last, (), y), last)
        return leaf_step(leaf, q, walk).q

    if plan.last_step_deferred:
        q = last_step(node.top, q)

    def backward_step(q, copy):
        k, w_k, kept_k, recorded_k = copy
        nodes, weights = _copy_nodes(node, w_k, kept_k, recorded_k)
        grads, cotangents, shares = walk_layers(nodes, q, walk)
        q = cotangents[0]
        if plan.last_step_deferred:  # copy k - 1's last step; there is none below copy 0
            grads.append(jax.tree.map(jnp.zeros_like, weights[-1]))
            shares.append(tuple(extension.empty_share(weights[-1])
                                for extension in walk.extensions))
            q = jax.tree.map(lambda below, here: jnp.where(k > 0, below, here),
                             last_step(kept_k[0], q), q)
        extensions = tuple(nest_params(repeat.layer, iter(per_layer))
                           for per_layer in _per_extension(shares, len(walk.extensions)))
        return q, (nest_params(repeat.layer, iter(grads)), extensions)

    q, (grads, extensions) = jax.lax.scan(
        backward_step, q, (jnp.arange(repeat.n), node.params, node.kept, node.recorded),
        reverse=True, length=repeat.n)
    return Down(grads, q, _copies_last(walk, extensions))


def _walk_scan_segments(node: ScanSegments, q, walk: Walk) -> Down:
    """sqrt: a reversed scan over segments; each is recorded again (as a repeat of
    ``size`` copies under ``keep``) from its kept input, then walked."""
    count, size = node.inputs.shape[0], node.repeat.n // node.inputs.shape[0]
    segment = Repeat(node.repeat.layer, size)
    inner_walk = dataclasses.replace(walk, policy="keep")

    def segment_step(q_next, inputs):
        w_segment, z_in, q_next = barrier(inputs[:2] + (q_next,))
        node = _record_repeat(segment, w_segment, z_in, inner_walk, inputs[2])[1]
        down = walk_down(node, q_next, walk)
        extensions = tuple(_copies_first(extension, tree)
                           for extension, tree in zip(walk.extensions, down.extensions))
        return down.q, (down.grads, extensions)

    q, (grads, extensions) = jax.lax.scan(segment_step, q,
                                          (node.segments, node.inputs, node.keys),
                                          reverse=True, length=count)
    grads = jax.tree.map(lambda g: g.reshape((-1,) + g.shape[2:]), grads)
    return Down(grads, q, _copies_last(walk, extensions, copy_axes=2))


def _copies_first(extension: Extension, tree):
    """A segment's result laid out (size, ...) again for the outer scan over segments:
    a batched stacked one (B, size, ...) as (size, B, ...); a summed one (already added
    over the segment's copies) with a copy axis of 1."""
    if extension.copies == "sum":
        return jax.tree.map(lambda a: a[None], tree)
    if extension.batched:
        return jax.tree.map(lambda a: jnp.moveaxis(a, 0, 1), tree)
    return tree


def _walk_scan_recompute(node: ScanRecompute, q, walk: Walk) -> Down:
    """recompute: a reversed scan over the copies; copy k's input is recomputed from the
    repeat's input through copies 0..k-1, then copy k is recorded and walked."""
    layer, n, keys = node.repeat.layer, node.repeat.n, node.keys

    def copy(tree, k):
        return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, k, keepdims=False), tree)

    def step(q_next, k):
        w_all, z_first, q_next = barrier((node.params, node.z, q_next))
        z_k = jax.lax.fori_loop(
            0, k, lambda j, z: apply_with_key(layer, copy(w_all, j), z, copy(keys, j)), z_first)
        down = walk_down(record(layer, copy(w_all, k), z_k, walk, copy(keys, k))[1], q_next, walk)
        return down.q, (down.grads, down.extensions)

    q, (grads, extensions) = jax.lax.scan(step, q, jnp.arange(n), reverse=True)
    return Down(grads, q, _copies_last(walk, extensions))
