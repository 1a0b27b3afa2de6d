"""The diagonal of the Hessian of the batch loss, by backpropagating its square roots.

For a chain, the Hessian of l_b with respect to z_{i+1} (the layers above, params fixed)
obeys the second-order backward recursion

    H_i = B_i^T H_{i+1} B_i + sum_k (d l_b / d z_{i+1,k}) d2 g_{i,k} / dz_i^2,

and the block of layer i's params is A_i^T H_{i+1} A_i + sum_k (...) d2 g_{i,k} / dw_i^2.
For layers linear in z and in w separately (dense, conv, pooling, reshapes, dropout,
embedding, relu) both second-derivative terms vanish; an elementwise activation adds
diag(r_b), r_b = (d l_b / d z_{i+1}) * sigma''(z_i). The walk carries H as a signed sum of
square-root factors (``funcnet.ad._factors``, kind ``"hessian"``: the loss Hessian's root,
then one diagonal factor per curved activation passed), so

    diag(H)_i = mean_b sum_factors sum_m sign (A_b^T S[m, b])^2.

Layers whose second derivatives are neither zero nor elementwise (layer_norm,
self_attention, user layers) are refused, as is a repeat of curved activations (each copy
would add factors, which a scan cannot carry); ``fnet.hvp`` handles every layer.
"""

from __future__ import annotations

import dataclasses
from typing import Tuple

import jax

from funcnet._errors import LayerError
from funcnet.ad._factors import HESSIAN
from funcnet.ad.extensions._base import Extension, LeafContext, factor_diag
from funcnet.nn._chain import Chain
from funcnet.nn._layer import Layer
from funcnet.nn._repeat import Repeat
from funcnet.nn._residual import Residual


@dataclasses.dataclass(frozen=True)
class DiagHessian(Extension):
    """diag(H) of the batch loss, leaves like params (see the module docstring). Costs one
    pullback per column: C for the loss, plus the size of every curved activation's
    input for the layers below it."""

    name = "diag_hessian"

    @property
    def factor_kinds(self) -> Tuple[str, ...]:
        return (HESSIAN,)

    def check_network(self, net: Layer) -> None:
        _check_layers(net, ())

    def at_leaf(self, context: LeafContext):
        diagonals = [factor_diag(context, factor) for factor in context.factors[HESSIAN]]
        total = jax.tree.map(lambda *parts: sum(parts), *diagonals)
        return jax.tree.map(lambda a: a / context.batch_size, total)


def _check_layers(layer: Layer, path) -> None:
    if isinstance(layer, Chain):
        for index, item in enumerate(layer.layers):
            _check_layers(item, path + ((index, item.name),))
        return
    if isinstance(layer, Residual):
        _check_layers(layer.inner, path + ((0, layer.inner.name),))
        return
    if isinstance(layer, Repeat):
        _check_layers(layer.layer, path + ((0, layer.layer.name),))
        if _curved(layer.layer):
            raise LayerError(
                f"diag_hessian cannot run through {layer.name}: the layer it repeats holds a "
                f"curved activation, which adds second-derivative factors at every copy, and "
                f"a scan carries a fixed number. Write the copies out as a chain "
                f"(fnet.chain(*[layer] * n)), or use fnet.hvp.", path)
        return
    if layer.curvature not in ("linear", "elementwise"):
        raise LayerError(
            f"diag_hessian needs every layer's second derivatives to be zero (layers linear "
            f"in z and in w, such as dense and conv) or elementwise (activations), but "
            f"{layer.name}'s are neither or unknown (its `curvature` is "
            f"{layer.curvature!r}). Use diag_ggn (the Gauss-Newton part), or fnet.hvp for "
            f"exact Hessian products.", path)


def _curved(layer: Layer) -> bool:
    """Whether a curved elementwise layer sits anywhere inside ``layer``."""
    if isinstance(layer, Chain):
        return any(_curved(item) for item in layer.layers)
    if isinstance(layer, Residual):
        return _curved(layer.inner)
    if isinstance(layer, Repeat):
        return _curved(layer.layer)
    return layer.curvature == "elementwise"


def diag_hessian() -> DiagHessian:
    """The ``"diag_hessian"`` extension: the exact Hessian diagonal, leaves like params.

    Example:
      >>> import jax, jax.numpy as jnp, funcnet as fnet
      >>> net = fnet.chain(fnet.dense(3), fnet.tanh, fnet.dense(2))
      >>> params, _ = net.init(jax.random.key(0), (4,))
      >>> record = fnet.backprop(net, fnet.losses.softmax_cross_entropy, params,
      ...                        jnp.ones((5, 4)), jnp.zeros(5, jnp.int32),
      ...                        extensions=(fnet.extensions.diag_hessian(),))
      >>> record.extensions["diag_hessian"][0]["w"].shape
      (4, 3)
    """
    return DiagHessian()
