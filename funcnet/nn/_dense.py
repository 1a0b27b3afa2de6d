"""The affine layer z @ w + b, with its closed-form FLOPs and per-example rules (gradients,
their squared norms and sums of squares) for the extensions."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp

from funcnet._arguments import check_bool, check_int, check_shape
from funcnet._errors import LayerError, shape_str
from funcnet.nn._layer import Layer

_EXACT = jax.lax.Precision.HIGHEST  # per-example products in full precision on every backend


def _rows(layer: "Dense", z, q):
    """z as (B, T, fan_in) and q as (B, T, out): any extra per-example axes flattened into
    T (T = 1 for vector inputs)."""
    batch, fan_in = z.shape[0], z.shape[-1]
    return z.reshape(batch, -1, fan_in), q.reshape(batch, -1, layer.out_features)


def _per_example_grads(layer: "Dense", params, z, q):
    """A_b^T q_b for every example b, without a per-example vjp.

    For z_b of shape (T, fan_in) (T = 1 for a vector input; any extra per-example axes
    are flattened into T) and q_b of shape (T, out): dw_b = z_b^T q_b (fan_in, out) and
    db_b = sum_t q_b[t] (out,). Leaves (B, *leaf shape); their sum over b is p_i.
    """
    z_rows, q_rows = _rows(layer, z, q)
    grads = {"w": jnp.einsum("bti,bto->bio", z_rows, q_rows, precision=_EXACT)}
    if layer.bias:
        grads["b"] = jnp.sum(q_rows, axis=1)
    return grads



def uses_gram(steps: int, fan_in: int, out: int) -> bool:
    """Whether ||z_b^T q_b||^2 is cheaper through the Gram matrices (2 T^2 < fan_in out)
    than by forming z_b^T q_b: the Gram form costs about T^2 (fan_in + out) multiply-adds
    per example against T fan_in out for the product (plus fan_in out to square it)."""
    return 2 * steps * steps < fan_in * out


def _per_example_sq_norms(layer: "Dense", params, z, q):
    """||A_b^T q_b||^2 per params leaf, (B,), without forming A_b^T q_b for vectors.

    Vector inputs (T = 1): ||z_b q_b^T||_F^2 = ||z_b||^2 ||q_b||^2 (Goodfellow, 2015).
    Sequences (T > 1, z_b (T, fan_in), q_b (T, out)): the Gram form
    ||z_b^T q_b||_F^2 = <z_b z_b^T, q_b q_b^T> when :func:`uses_gram` says it is
    cheaper, else z_b^T q_b formed and squared. Bias: ||sum_t q_b[t]||^2.
    """
    z_rows, q_rows = _rows(layer, z, q)
    steps, fan_in = z_rows.shape[1], z_rows.shape[2]
    if steps == 1:
        w = jnp.sum(jnp.square(z_rows[:, 0]), axis=1) * jnp.sum(jnp.square(q_rows[:, 0]), axis=1)
    elif uses_gram(steps, fan_in, layer.out_features):
        z_gram = jnp.einsum("bti,bsi->bts", z_rows, z_rows, precision=_EXACT)
        q_gram = jnp.einsum("bto,bso->bts", q_rows, q_rows, precision=_EXACT)
        w = jnp.sum(z_gram * q_gram, axis=(1, 2))
    else:
        grads = jnp.einsum("bti,bto->bio", z_rows, q_rows, precision=_EXACT)
        w = jnp.sum(jnp.square(grads), axis=(1, 2))
    norms = {"w": w}
    if layer.bias:
        norms["b"] = jnp.sum(jnp.square(jnp.sum(q_rows, axis=1)), axis=1)
    return norms


def _sum_of_squares(layer: "Dense", params, z, q):
    """sum_b (A_b^T q_b)^2 entrywise, like params: for vector inputs (Z^2)^T (Q^2) and
    sum_b q_b^2, one matrix product; for sequences the A_b^T q_b are formed and squared."""
    z_rows, q_rows = _rows(layer, z, q)
    if z_rows.shape[1] == 1:
        w = jnp.einsum("bi,bo->io", jnp.square(z_rows[:, 0]), jnp.square(q_rows[:, 0]),
                       precision=_EXACT)
        squares = {"w": w}
        if layer.bias:
            squares["b"] = jnp.sum(jnp.square(q_rows[:, 0]), axis=0)
        return squares
    return jax.tree.map(lambda a: jnp.sum(jnp.square(a), axis=0),
                        _per_example_grads(layer, params, z, q))


def _column_squares(layer: "Dense", z, s, signs):
    """For vector inputs: z_b^2 (B, fan_in) and sum_m sign[m, b] s[m, b]^2 (B, out), the
    two sides of every diag(A_b^T S_b S_b^T A_b) (A_b^T s = z_b s^T); None for sequences."""
    if z.ndim != 2:
        return None
    weighted = s if signs is None else s * signs[..., None]
    return jnp.square(z), jnp.einsum("mbo,mbo->bo", weighted, s, precision=_EXACT)


def _per_example_factor_diag(layer: "Dense", params, z, s, signs=None):
    """diag(A_b^T S_b S_b^T A_b) per example for vector inputs: w: z_b^2 (sum_m S^2)^T,
    b: sum_m S^2 (signed); None for sequences (the generic rule forms them)."""
    sides = _column_squares(layer, z, s, signs)
    if sides is None:
        return None
    z2, s2 = sides
    result = {"w": z2[:, :, None] * s2[:, None, :]}
    if layer.bias:
        result["b"] = s2
    return result


def _factor_diag(layer: "Dense", params, z, s, signs=None):
    """sum_b diag(A_b^T S_b S_b^T A_b) for vector inputs, one matrix product:
    w: (Z^2)^T (sum_m S_m^2), b: sum over b and m of S^2 (signed); None for sequences."""
    sides = _column_squares(layer, z, s, signs)
    if sides is None:
        return None
    z2, s2 = sides
    result = {"w": jnp.einsum("bi,bo->io", z2, s2, precision=_EXACT)}
    if layer.bias:
        result["b"] = jnp.sum(s2, axis=0)
    return result


def _kronecker_factors(layer: "Dense", params, z, s, signs=None):
    """K-FAC's factors of the block of W = [w; b] for vector inputs, None for sequences:
    A = mean_b zbar_b zbar_b^T (zbar_b = [z_b; 1], no 1 without bias) and
    G = mean_b sum_m sign s[m, b] s[m, b]^T, since A_b^T s = zbar_b s^T makes the block
    mean_b kron(zbar_b zbar_b^T, S_b S_b^T) (``funcnet.ad.extensions._kronecker``)."""
    if z.ndim != 2:
        return None
    batch = z.shape[0]
    if layer.bias:
        z = jnp.concatenate([z, jnp.ones((batch, 1), z.dtype)], axis=1)
    weighted = s if signs is None else s * signs[..., None]
    a = jnp.einsum("bi,bj->ij", z, z, precision=_EXACT) / batch
    g = jnp.einsum("mbo,mbp->op", weighted, s, precision=_EXACT) / batch
    return a, g


@dataclasses.dataclass(frozen=True, repr=False)
class Dense(Layer):
    """``g(w; z) = z @ w["w"] + w["b"]`` over the last axis of z.

    Params: ``{"w": (fan_in, out_features), "b": (out_features,)}`` (no ``"b"`` when
    ``bias=False``), with ``w`` drawn from N(0, 1/fan_in) (LeCun normal) and ``b`` zero,
    in JAX's default float dtype. Shapes: ``(B, ..., fan_in) -> (B, ..., out_features)``.

    Per example, for a vector input z (shape (fan_in,)) and output o = w^T z + b:
    B_i = w^T (out x fan_in); A_i with respect to w is the generalized Jacobian
    dO_k/dw_{jl} = z_j [k == l]; with respect to b it is the identity. So
    p_i = (z^T q, sum q) and q_i = q w^T: a repeat keeps only the input z_i.
    """

    out_features: int
    bias: bool = True

    repeat_keeps: ClassVar[str] = "input"
    curvature: ClassVar[str] = "linear"
    rules: ClassVar = (("per_example_grads", _per_example_grads),
                       ("per_example_sq_norms", _per_example_sq_norms),
                       ("sum_of_squares", _sum_of_squares),
                       ("per_example_factor_diag", _per_example_factor_diag),
                       ("factor_diag", _factor_diag),
                       ("kronecker_factors", _kronecker_factors))

    def __post_init__(self):
        # numpy integers and bools are normalised, so equal layers hash equal
        object.__setattr__(self, "out_features",
                           check_int("dense(out_features)", self.out_features, minimum=1))
        object.__setattr__(self, "bias", check_bool("dense(bias)", self.bias))

    @property
    def name(self) -> str:
        return f"dense({self.out_features})" + ("" if self.bias else ", no bias")

    def describe(self) -> str:
        return "z @ w + b" if self.bias else "z @ w"

    def init(self, key, in_shape):
        in_shape = check_shape("in_shape", in_shape)
        if len(in_shape) == 0 or in_shape[-1] < 1:
            raise LayerError(
                f"{self.name} needs inputs whose per-example shape ends in a positive "
                f"feature axis, got per-example shape {shape_str(in_shape)}. Arrays carry "
                f"a leading batch axis: pass x of shape (batch, features), e.g. x[None] "
                f"for a single example."
            )
        fan_in = in_shape[-1]
        # drawn flat and reshaped: the same numbers, and XLA compiles the flat draw several
        # times faster for some shapes (0.5 s instead of 1.3 s for (256, 10) on a CPU)
        w = jax.random.normal(key, (fan_in * self.out_features,)).reshape(
            fan_in, self.out_features) / jnp.sqrt(fan_in)
        params = {"w": w, "b": jnp.zeros((self.out_features,))} if self.bias else {"w": w}
        return params, in_shape[:-1] + (self.out_features,)

    def model_axes(self, params):
        """The output features (w's and b's last axis): column blocks per device."""
        return {name: -1 for name in params}

    def apply(self, params, z):
        out = z @ params["w"]
        if not self.bias:
            return out
        return out + params["b"].reshape((1,) * (out.ndim - 1) + (self.out_features,))

    def flops(self, in_shape) -> int:
        """2 fan_in out per output row, plus out for the bias."""
        rows = math.prod(in_shape[:-1])
        return rows * (2 * in_shape[-1] * self.out_features + (self.out_features if self.bias else 0))


def dense(out_features: int, bias: bool = True) -> Layer:
    """An affine layer ``z @ w + b`` with ``out_features`` outputs; see :class:`Dense`.

    Example:
      >>> import jax, funcnet as fnet
      >>> params, out_shape = fnet.dense(4).init(jax.random.key(0), (3,))
      >>> params["w"].shape, params["b"].shape, out_shape
      ((3, 4), (4,), (4,))
    """
    return Dense(out_features, bias)
