"""Forward FLOPs per example of a layer, from its shapes alone (known at init).

Used by the Jacobian accumulation planner (``funcnet._accumulation``) and by summaries.
Built-in layers have closed forms; for any other layer the count is XLA's own cost
analysis of ``apply`` on one example, compiled once per layer and shape.
"""

from __future__ import annotations

import functools
import math

import jax

from funcnet._activations import Elementwise, LeakyRelu
from funcnet._chain import Chain, Residual
from funcnet._dense import Dense
from funcnet._layer import Layer, abstract_init
from funcnet._repeat import Repeat
from funcnet._reshape import Flatten


def forward_flops(layer: Layer, in_shape) -> int:
    """Forward FLOPs of ``layer`` for ONE example of per-example shape ``in_shape``.

    dense: 2 * fan_in * out per output row (+ out for the bias); elementwise layers: one
    per entry; flatten: 0; chains: the sum; residual: inner + one add per entry; repeat:
    n times its layer.
    """
    in_shape = tuple(in_shape)
    size = math.prod(in_shape)
    if isinstance(layer, Dense):
        rows = math.prod(in_shape[:-1])
        return rows * (2 * in_shape[-1] * layer.out_features + (layer.out_features if layer.bias else 0))
    if isinstance(layer, (Elementwise, LeakyRelu)):
        return size
    if isinstance(layer, Flatten):
        return 0
    if isinstance(layer, Chain):
        total, shape = 0, in_shape
        for item in layer.layers:
            total += forward_flops(item, shape)
            shape = abstract_init(item, shape)[1]
        return total
    if isinstance(layer, Residual):
        return forward_flops(layer.inner, in_shape) + size
    if isinstance(layer, Repeat):
        return layer.n * forward_flops(layer.layer, in_shape)
    return _xla_flops(layer, in_shape)


@functools.lru_cache(maxsize=1024)
def _xla_flops(layer: Layer, in_shape) -> int:
    params, _ = abstract_init(layer, in_shape)
    example = jax.ShapeDtypeStruct((1,) + tuple(in_shape), jax.numpy.result_type(float))
    analysis = jax.jit(layer.apply).lower(params, example).compile().cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    return int((analysis or {}).get("flops", math.prod(in_shape)))
