"""Layers: the Layer protocol, the built-in layers, and the containers that compose them.

Every layer is a pair of pure functions ``init(key, in_shape) -> (params, out_shape)`` and
``apply(params, z) -> z_next`` (``_layer``), plus what it can say about itself to the
machinery (FLOPs, what a repeat must keep, faster rules). Containers say what they hold:
``chain`` (in sequence), ``residual`` (z + inner(z)), ``repeat`` (n copies, scanned).
"""

from funcnet.nn._activations import (Elementwise, LeakyRelu, gelu, identity, leaky_relu, relu,
                                     sigmoid, softplus, tanh)
from funcnet.nn._chain import Chain, chain
from funcnet.nn._dense import Dense, dense
from funcnet.nn._layer import Layer, layer
from funcnet.nn._repeat import Repeat, repeat
from funcnet.nn._reshape import Flatten, flatten
from funcnet.nn._residual import Residual, residual
from funcnet.nn._summary import Summary, SummaryRow, summary

__all__ = [
    "Chain", "chain", "Dense", "dense", "Elementwise", "Flatten", "flatten", "gelu",
    "identity", "Layer", "layer", "leaky_relu", "LeakyRelu", "relu", "Repeat", "repeat",
    "Residual", "residual", "sigmoid", "softplus", "Summary", "SummaryRow", "summary", "tanh",
]
