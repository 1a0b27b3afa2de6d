"""Embedding: integer indices pick rows of a table, with closed-form per-example rules.

An example is an array of T indices (any per-example shape S, T = prod(S)); the output
holds table[idx_t] (features,) at each position t. The output is linear in the table:
per example b, A_b^T q_b is the (num_embeddings, features) array

    G_b[n] = sum over the positions t with idx_bt == n of q_bt

(a scatter-add of the rows of q_b), and the input indices have no derivative (B_i is
empty: an integer input is not differentiated). Squared norms and sums of squares come
either through the table (G_b formed), or through T x T "same index" masks without it:

    ||G_b||^2 = sum_{t,s} [idx_bt == idx_bs] <q_bt, q_bs>
    sum_b G_b^2 = scatter-add over (b, t) of q_bt * r_bt into row idx_bt,
                  r_bt = sum_s [idx_bt == idx_bs] q_bs

whichever is smaller: T^2 against num_embeddings * features per example.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from funcnet._arguments import check_int, check_shape
from funcnet._errors import LayerError, Path
from funcnet.nn._layer import Layer

_EXACT = jax.lax.Precision.HIGHEST  # per-example products in full precision on every backend


def uses_masks(steps: int, num_embeddings: int, features: int) -> bool:
    """Whether the T x T same-index masks (T^2 entries per example) are smaller than the
    per-example table G_b (num_embeddings * features entries)."""
    return steps * steps < num_embeddings * features


def _rows(layer: "Embedding", z, q):
    """The indices as (B, T) and q as (B, T, features): the per-example axes flattened."""
    batch = z.shape[0]
    return z.reshape(batch, -1), q.reshape(batch, -1, layer.features)


def _per_example_grads(layer: "Embedding", params, z, q):
    """G_b = A_b^T q_b per example: the rows of q_b added into the rows of the table their
    indices name (out-of-range indices, which make the forward pass NaN, add nowhere).
    Leaf (B, num_embeddings, features); the sum over b is p_i."""
    idx, q_rows = _rows(layer, z, q)
    scatter = jax.vmap(lambda i, r: jax.ops.segment_sum(r, i, layer.num_embeddings))
    return {"table": scatter(idx, q_rows)}


def _same_index(idx):
    """[idx_bt == idx_bs], (B, T, T)."""
    return idx[:, :, None] == idx[:, None, :]


def _per_example_sq_norms(layer: "Embedding", params, z, q):
    """||G_b||^2, (B,): sum_{t,s} [idx_t == idx_s] <q_t, q_s> when :func:`uses_masks`,
    else G_b formed and squared."""
    idx, q_rows = _rows(layer, z, q)
    if not uses_masks(idx.shape[1], layer.num_embeddings, layer.features):
        grads = _per_example_grads(layer, params, z, q)["table"]
        return {"table": jnp.sum(jnp.square(grads), axis=(1, 2))}
    inner = jnp.einsum("btf,bsf->bts", q_rows, q_rows, precision=_EXACT)
    return {"table": jnp.sum(jnp.where(_same_index(idx), inner, 0), axis=(1, 2))}


def _sum_of_squares(layer: "Embedding", params, z, q):
    """sum_b G_b^2 entrywise, (num_embeddings, features): through the masks (see the
    module docstring) when :func:`uses_masks`, else G_b formed and squared."""
    idx, q_rows = _rows(layer, z, q)
    if not uses_masks(idx.shape[1], layer.num_embeddings, layer.features):
        grads = _per_example_grads(layer, params, z, q)["table"]
        return {"table": jnp.sum(jnp.square(grads), axis=0)}
    same = _same_index(idx).astype(q_rows.dtype)
    grouped = jnp.einsum("bts,bsf->btf", same, q_rows, precision=_EXACT)  # r_bt
    products = (q_rows * grouped).reshape(-1, layer.features)
    return {"table": jax.ops.segment_sum(products, idx.reshape(-1), layer.num_embeddings)}


@dataclasses.dataclass(frozen=True, repr=False)
class Embedding(Layer):
    """Rows of a table picked by integer indices: ``table[z]``.

    Params: ``{"table": (num_embeddings, features)}``, drawn from N(0, 1) in JAX's default
    float dtype. Shapes: integer ``(B, *S) -> (B, *S, features)``; every index must lie
    in [0, num_embeddings).

    A concrete input with an index outside that range (negative ones included), or with
    a non-integer dtype, raises :class:`~funcnet.LayerError` at the entry points
    (:meth:`check_input_values`); a traced one cannot be checked, and an out-of-range
    index then gives a row of NaN (never a clamped or wrapped row), so the loss shows it.

    Per example, A_i^T q is the scatter-add G_b of the module docstring; B_i is empty
    (indices are not differentiated).
    """

    num_embeddings: int
    features: int

    in_dtype: ClassVar = np.dtype(np.int32)
    curvature: ClassVar[str] = "linear"
    rules: ClassVar = (("per_example_grads", _per_example_grads),
                       ("per_example_sq_norms", _per_example_sq_norms),
                       ("sum_of_squares", _sum_of_squares))

    def __post_init__(self):
        object.__setattr__(self, "num_embeddings", check_int(
            "embedding(num_embeddings)", self.num_embeddings, minimum=1))
        object.__setattr__(self, "features", check_int(
            "embedding(features)", self.features, minimum=1))

    @property
    def name(self) -> str:
        return f"embedding({self.num_embeddings}, {self.features})"

    def describe(self) -> str:
        return (f"table[z], one row of {self.features} features per index in "
                f"[0, {self.num_embeddings}), on integer inputs")

    def init(self, key, in_shape):
        in_shape = check_shape("in_shape", in_shape)
        table = jax.random.normal(key, (self.num_embeddings, self.features))
        return {"table": table}, in_shape + (self.features,)

    def apply(self, params, z):
        self._check_dtype(jnp.result_type(z), ())
        # jnp.take wraps negative indices even in "fill" mode: send them out of range too
        idx = jnp.where(z < 0, self.num_embeddings, z)
        return jnp.take(params["table"], idx, axis=0, mode="fill", fill_value=jnp.nan)

    def check_input_values(self, z, path: Path = ()) -> None:
        """Refuses a non-integer ``z`` and any index outside [0, num_embeddings), naming
        the first offending example and position."""
        self._check_dtype(jnp.result_type(z), path)
        values = np.asarray(z)
        bad = (values < 0) | (values >= self.num_embeddings)
        if not bad.any():
            return
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        largest = int(values.max())
        larger_table = (f", or build the layer with num_embeddings > {largest}"
                        if largest >= self.num_embeddings else "")
        raise LayerError(
            f"{self.name} takes indices in [0, {self.num_embeddings}), but "
            f"{int(bad.sum())} of the {values.size} indices are outside, the first "
            f"{values[where]} at x[{', '.join(map(str, where))}] (example {where[0]}). "
            f"Map the inputs into that range (e.g. a reserved index for unknown "
            f"tokens){larger_table}.",
            path,
        )

    def _check_dtype(self, dtype, path: Path) -> None:
        if not jnp.issubdtype(dtype, jnp.integer):
            raise LayerError(
                f"{self.name} takes integer indices, got inputs of dtype {np.dtype(dtype)}. "
                f"Pass x as integers, e.g. x.astype(jnp.int32).",
                path,
            )

    def flops(self, in_shape) -> int:
        """0: a lookup moves rows, it computes nothing."""
        return 0


def embedding(num_embeddings: int, features: int) -> Layer:
    """A table of ``num_embeddings`` rows of ``features``, indexed by integer inputs; see
    :class:`Embedding`.

    Example:
      >>> import jax, funcnet as fnet
      >>> params, out_shape = fnet.embedding(100, 16).init(jax.random.key(0), (12,))
      >>> params["table"].shape, out_shape
      ((100, 16), (12, 16))
    """
    return Embedding(num_embeddings, features)
