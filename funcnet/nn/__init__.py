"""Layers: the Layer protocol, the built-in layers, and the containers that compose them.

Every layer is a pair of pure functions ``init(key, in_shape) -> (params, out_shape)`` and
``apply(params, z) -> z_next`` (``_layer``), plus what it can say about itself to the
machinery (FLOPs, what a repeat must keep, faster rules). Containers say what they hold:
``chain`` (in sequence), ``residual`` (z + inner(z)), ``repeat`` (n copies, scanned).
"""

from funcnet.nn._activations import (Elementwise, LeakyRelu, gelu, identity, leaky_relu, relu,
                                     sigmoid, softplus, tanh)
from funcnet.nn._attention import SelfAttention, self_attention
from funcnet.nn._chain import Chain, chain
from funcnet.nn._conv import Conv, conv
from funcnet.nn._dense import Dense, dense
from funcnet.nn._dropout import Dropout, dropout
from funcnet.nn._embedding import Embedding, embedding
from funcnet.nn._layer import Layer, layer
from funcnet.nn._norm import LayerNorm, layer_norm
from funcnet.nn._pooling import AvgPool, MaxPool, avg_pool, max_pool
from funcnet.nn._repeat import Repeat, repeat
from funcnet.nn._reshape import Flatten, Reshape, flatten, reshape
from funcnet.nn._residual import Residual, residual
from funcnet.nn._summary import Summary, SummaryRow, summary

__all__ = [
    "AvgPool", "avg_pool", "Chain", "chain", "Conv", "conv", "Dense", "dense", "Dropout",
    "dropout", "Elementwise", "Embedding", "embedding", "Flatten", "flatten", "gelu",
    "identity", "Layer", "layer", "layer_norm", "LayerNorm", "leaky_relu", "LeakyRelu",
    "max_pool", "MaxPool", "relu", "Repeat", "repeat", "Reshape", "reshape", "Residual",
    "residual", "SelfAttention", "self_attention", "sigmoid", "softplus", "Summary",
    "SummaryRow", "summary", "tanh",
]
