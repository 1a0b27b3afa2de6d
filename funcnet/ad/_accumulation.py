"""The cheapest order to accumulate a chain's Jacobian: a plan by dynamic programming.

For one example, the input Jacobian of a chain of L layers is the product

    J = B_L B_{L-1} ... B_1,      B_l of shape n_{l+1} x n_l (flattened widths).

Forward mode builds it column by column (n_1 jvps through the chain), reverse mode row
by row (n_{L+1} vjps); they are the two extremes of a family. A plan cuts the chain into
segments, takes each segment's Jacobian J[i:j] = B_j ... B_{i+1} directly, by forward mode
(cost n_i * F(i, j)) or by reverse mode (n_j * F(i, j)), where F(i, j) is the segment's
forward FLOPs per example, and multiplies the materialised segment Jacobians in the
cheapest matrix-chain order (an m x k by k x n product costs 2 m k n). The optimal plan
for every interval follows from the recursion

    cost(i, j) = min( n_i F(i, j),  n_j F(i, j),
                      min_{i<k<j} cost(i, k) + cost(k, j) + 2 n_j n_k n_i ),

solved bottom-up in O(L^3) from the layer shapes alone (known at init). On a chain with
a narrow bottleneck (widths 1000, 500, 100, 10, 500, 1000) the plan is "reverse up to the
bottleneck, forward after it, one thin product", far cheaper than either extreme.

(Finding the optimal accumulation of a general computational graph is NP-hard; for a
chain with whole-segment modes this dynamic program is exact under its cost model.)

For the parameter Jacobian every block d out / d w_i = (B_L ... B_{i+1}) A_i has n_{L+1}
rows of size r_i, and its cheapest construction is reverse mode through layer i; the plan
then only chooses between the two whole-chain modes by the same cost model.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Tuple, Union

import jax
import jax.numpy as jnp

from funcnet._caches import bounded_cache
from funcnet.nn._chain import chain, top_level
from funcnet.nn._layer import Layer, abstract_init


@dataclasses.dataclass(frozen=True)
class Segment:
    """Layers [start, stop) of the chain, their Jacobian taken directly in ``mode``."""

    start: int
    stop: int
    mode: str
    flops: int

    def describe(self) -> str:
        return f"J[{self.start}:{self.stop}]"


@dataclasses.dataclass(frozen=True)
class Product:
    """``later @ earlier``: the Jacobian of the layers of both, ``later`` on top."""

    later: "Node"
    earlier: "Node"
    flops: int  # of this multiplication alone

    def describe(self) -> str:
        return f"({self.later.describe()} @ {self.earlier.describe()})"


Node = Union[Segment, Product]


@dataclasses.dataclass(frozen=True)
class JacobianPlan:
    """How :func:`funcnet.jacobian` with ``mode="optimal"`` accumulates the Jacobian.

    Attributes:
      wrt: "input" or "params".
      widths: n_1 .. n_{L+1}, the flattened per-example sizes between top-level layers.
      layer_flops: forward FLOPs per example of each top-level layer.
      root: the plan tree (Segments at the leaves, Products inside).
      predicted_flops: the plan's cost under the model (primal forward pass included).
      forward_flops, reverse_flops: the same model's cost of the two plain modes.
    """

    wrt: str
    widths: Tuple[int, ...]
    layer_flops: Tuple[int, ...]
    root: Node
    predicted_flops: int
    forward_flops: int
    reverse_flops: int

    @property
    def segments(self) -> Tuple[Segment, ...]:
        """The segments, first layers first."""
        found = []

        def walk(node):
            if isinstance(node, Segment):
                found.append(node)
            else:
                walk(node.earlier)
                walk(node.later)

        walk(self.root)
        return tuple(found)

    @property
    def order(self) -> str:
        """The multiplication order, e.g. ``(J[3:5] @ J[0:3])``."""
        return self.root.describe()

    def __str__(self) -> str:
        lines = [f"Jacobian plan (wrt={self.wrt}), widths {' -> '.join(map(str, self.widths))}"]
        for segment in self.segments:
            n_in, n_out = self.widths[segment.start], self.widths[segment.stop]
            lines.append(f"  {segment.describe():<12} {segment.mode:<8} {n_out} x {n_in}"
                         f"   {segment.flops:.3g} FLOPs")
        lines.append(f"  order: {self.order}")
        lines.append(f"  predicted {self.predicted_flops:.3g} FLOPs (forward mode "
                     f"{self.forward_flops:.3g}, reverse mode {self.reverse_flops:.3g})")
        return "\n".join(lines)


@bounded_cache(maxsize=256)
def plan(net: Layer, in_shape: Tuple[int, ...], wrt: str = "input") -> JacobianPlan:
    """The cheapest accumulation plan for ``net`` at per-example input shape ``in_shape``."""
    layers, _ = top_level(net, ())
    shapes, flops = [tuple(in_shape)], []
    for layer in layers:
        flops.append(layer.flops(shapes[-1]))
        shapes.append(abstract_init(layer, shapes[-1])[1])
    widths = tuple(math.prod(shape) for shape in shapes)
    total = sum(flops)
    n_layers = len(layers)
    if wrt == "params":
        params, _ = abstract_init(net, tuple(in_shape))
        n_params = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))
        forward, reverse = n_params * total, 2 * widths[-1] * total
        mode = "forward" if forward < reverse else "reverse"
        root = Segment(0, n_layers, mode, min(forward, reverse))
        return JacobianPlan(wrt, widths, tuple(flops), root, total + root.flops,
                            total + forward, total + reverse)

    prefix = [0]
    for f in flops:
        prefix.append(prefix[-1] + f)
    best = {}
    for length in range(1, n_layers + 1):
        for i in range(0, n_layers - length + 1):
            j = i + length
            segment_flops = prefix[j] - prefix[i]
            forward, reverse = widths[i] * segment_flops, widths[j] * segment_flops
            node: Node = Segment(i, j, "forward" if forward < reverse else "reverse",
                                 min(forward, reverse))
            cost = node.flops
            for k in range(i + 1, j):
                multiply = 2 * widths[j] * widths[k] * widths[i]
                split = best[i, k][0] + best[k, j][0] + multiply
                if split < cost:
                    cost, node = split, Product(best[k, j][1], best[i, k][1], multiply)
            best[i, j] = (cost, node)
    cost, root = best[0, n_layers]
    return JacobianPlan(wrt, widths, tuple(flops), root, total + cost,
                        total + widths[0] * total, total + widths[-1] * total)


def optimal_input_jacobian(net: Layer, params, x, build_forward, build_reverse):
    """d out / d x for ONE example x by the plan; shape out_shape + in_shape."""
    the_plan = plan(net, tuple(x.shape), "input")
    if isinstance(the_plan.root, Segment):  # a plain mode is optimal: run exactly that
        build = build_forward if the_plan.root.mode == "forward" else build_reverse
        return build(net, params, x, False)
    layers, layer_params = top_level(net, params)
    starts = {segment.start for segment in the_plan.segments}
    activations = [x]
    for layer, w in zip(layers[:max(starts)], layer_params):
        activations.append(layer.apply(w, activations[-1][None])[0])
    out_shape = abstract_init(net, tuple(x.shape))[1]

    def evaluate(node):
        if isinstance(node, Product):
            return jnp.matmul(evaluate(node.later), evaluate(node.earlier),
                              precision=jax.lax.Precision.HIGHEST)
        segment = chain(*layers[node.start:node.stop])
        build = build_forward if node.mode == "forward" else build_reverse
        block = build(segment, tuple(layer_params[node.start:node.stop]),
                      activations[node.start], False)
        return block.reshape(the_plan.widths[node.stop], the_plan.widths[node.start])

    return evaluate(the_plan.root).reshape(out_shape + x.shape)
