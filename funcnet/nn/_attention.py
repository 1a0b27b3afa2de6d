"""Multi-head self-attention over a sequence, with per-example rules that need no
per-example pullback.

Per example, for z (T, D), H heads of width d = D / H:

    u = z @ W_qkv + b_qkv                        (T, 3D): q, k, v = u[:, :D], u[:, D:2D], u[:, 2D:]
    a_h = softmax(q_h k_h^T / sqrt(d)) v_h      (T, d), q_h = q[:, h d:(h + 1) d], same for k, v
    a = [a_0, ..., a_{H-1}]                     (T, D), the heads concatenated in order
    y = a @ W_out + b_out                       (T, D)

with position j > i masked out of row i of the softmax when causal. So the layer is a
dense map (qkv), a parameterless core u -> a that mixes positions but never examples,
and a dense map (out). Its per-example parameter pullbacks are those of the two dense
maps at their inputs (z and a) and output cotangents (q_u and q): q_u for every
example at once is ONE batched pullback of the core, because the core is independent per
example, and dense's own sequence rules do the rest.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp

from funcnet._arguments import check_bool, check_int, check_shape
from funcnet._errors import LayerError, shape_str
from funcnet.nn._dense import Dense
from funcnet.nn._layer import Layer


def _core(layer: "SelfAttention", u):
    """The parameterless attention core: u (B, T, 3D) -> the heads' outputs a (B, T, D)."""
    batch, steps, width = u.shape
    features = width // 3
    heads, head_width = layer.num_heads, features // layer.num_heads
    q, k, v = (u[..., i * features:(i + 1) * features].reshape(batch, steps, heads, head_width)
               for i in range(3))
    scores = jnp.einsum("bthd,bshd->bhts", q, k) / math.sqrt(head_width)
    if layer.causal:
        allowed = jnp.tril(jnp.ones((steps, steps), dtype=bool))[None, None]
        scores = jnp.where(allowed, scores, -jnp.inf)  # the diagonal is always allowed
    weights = jax.nn.softmax(scores, axis=-1)
    return jnp.einsum("bhts,bshd->bthd", weights, v).reshape(batch, steps, features)


def _affine(params, z):
    return z @ params["w"] + params["b"].reshape((1,) * (z.ndim - 1) + params["b"].shape)


def _dense_parts(layer: "SelfAttention", params, z, q):
    """The two dense maps' (layer, params, input, output cotangent): (qkv, z, q_u) and
    (out, a, q), q_u from one batched pullback of the core."""
    features = z.shape[-1]
    a, core_pullback = jax.vjp(lambda u: _core(layer, u), _affine(params["qkv"], z))
    (q_u,) = core_pullback(q @ params["out"]["w"].T)  # q_a = q W_out^T, then the core
    return {"qkv": (Dense(3 * features), params["qkv"], z, q_u),
            "out": (Dense(features), params["out"], a, q)}


def _dense_rule(quantity: str):
    """The attention layer's rule for ``quantity``: dense's rule on both dense maps."""

    def rule(layer: "SelfAttention", params, z, q):
        return {name: dense.rule(quantity)(dense, w, z_in, q_out)
                for name, (dense, w, z_in, q_out) in _dense_parts(layer, params, z, q).items()}

    rule.__name__ = rule.__qualname__ = f"self_attention_{quantity}"
    return rule


@dataclasses.dataclass(frozen=True, repr=False)
class SelfAttention(Layer):
    """Multi-head (optionally causal) self-attention, ``(B, T, D) -> (B, T, D)``.

    Params: ``{"qkv": {"w": (D, 3D), "b": (3D,)}, "out": {"w": (D, D), "b": (D,)}}``, the
    kernels drawn from N(0, 1/D), the biases zero, in JAX's default float dtype. D must
    be a multiple of ``num_heads``. The formulas are in the module docstring.

    Per example, with u, a as there and the output cotangent q (T, D): A_i^T q holds
    (a^T q, sum_t q_t) for ``out`` and (z^T q_u, sum_t q_u,t) for ``qkv``, where
    q_u = C^T (q W_out^T) and C^T the pullback of the core at u; B_i^T q = q_u W_qkv^T.
    A repeat keeps the input z_i and rebuilds the step from it.
    """

    num_heads: int
    causal: bool = False

    repeat_keeps: ClassVar[str] = "input"
    rules: ClassVar = tuple((quantity, _dense_rule(quantity)) for quantity in
                            ("per_example_grads", "per_example_sq_norms", "sum_of_squares"))

    def __post_init__(self):
        object.__setattr__(self, "num_heads",
                           check_int("self_attention(num_heads)", self.num_heads, minimum=1))
        object.__setattr__(self, "causal", check_bool("self_attention(causal)", self.causal))

    @property
    def name(self) -> str:
        return f"self_attention({self.num_heads}" + (", causal)" if self.causal else ")")

    def describe(self) -> str:
        mask = ", position j > i masked" if self.causal else ""
        return (f"{self.num_heads} heads of softmax(q k^T / sqrt(d)) v{mask}, q, k, v from "
                f"z @ qkv.w + qkv.b, heads concatenated @ out.w + out.b")

    def init(self, key, in_shape):
        in_shape = check_shape("in_shape", in_shape)
        if len(in_shape) != 2 or min(in_shape) < 1:
            raise LayerError(
                f"{self.name} takes sequences: a per-example shape (T, D) of T >= 1 "
                f"positions of D >= 1 features, got {shape_str(in_shape)}. Arrays carry a "
                f"leading batch axis: pass x of shape (batch, T, D); reshape other inputs "
                f"first (fnet.reshape)."
            )
        features = in_shape[1]
        if features % self.num_heads:
            raise LayerError(
                f"{self.name} splits the D = {features} features into {self.num_heads} heads "
                f"of equal width, but {features} is not a multiple of {self.num_heads}. Use a "
                f"number of heads that divides {features}, or make D a multiple of "
                f"{self.num_heads} (e.g. a dense layer of "
                f"{-(-features // self.num_heads) * self.num_heads} features before it)."
            )
        qkv_key, out_key = jax.random.split(key)
        scale = 1 / math.sqrt(features)
        params = {
            "qkv": {"w": jax.random.normal(qkv_key, (features, 3 * features)) * scale,
                    "b": jnp.zeros((3 * features,))},
            "out": {"w": jax.random.normal(out_key, (features, features)) * scale,
                    "b": jnp.zeros((features,))},
        }
        return params, in_shape

    def apply(self, params, z):
        return _affine(params["out"], _core(self, _affine(params["qkv"], z)))

    def flops(self, in_shape) -> int:
        """For T positions of D features and H heads: the projections T (8 D^2 + 4 D)
        (qkv 2 D 3D + 3D, out 2 D^2 + D per position), the scores and the weighted sums
        4 T^2 D, the scaling and softmax 6 H T^2 (scale, max, subtract, exp, sum, divide)."""
        steps, features = in_shape
        return (steps * (8 * features * features + 4 * features)
                + 4 * steps * steps * features + 6 * self.num_heads * steps * steps)


def self_attention(num_heads: int, causal: bool = False) -> Layer:
    """Multi-head self-attention on sequences (T, D); see :class:`SelfAttention`.

    Args:
      num_heads: the number of heads H; D must be a multiple of it.
      causal: mask every position j > i out of position i's attention.

    Example:
      >>> import jax, funcnet as fnet
      >>> params, out_shape = fnet.self_attention(2).init(jax.random.key(0), (5, 8))
      >>> params["qkv"]["w"].shape, params["out"]["w"].shape, out_shape
      ((8, 24), (8, 8), (5, 8))
    """
    return SelfAttention(num_heads, causal)
