"""Square roots of the loss Hessian: the seed of the curvature factors.

For example b with output o_b (per-example shape ``o``, C = prod(o) entries) and its own
loss l_b (the batch loss is the mean of the l_b), H_b = d2 l_b / d o_b^2 (C x C). A
square root is S_b with S_b S_b^T = H_b; here it is laid out as columns first,
S: (C, B, *o), S[m, b] the m-th column of S_b:

    squared_error          0.5 ||o - y||^2          S_b = I
    logistic               binary cross entropy     S_b = diag(sqrt(sigma(o) (1 - sigma(o))))
    softmax_cross_entropy  logsumexp(o) - <y, o>    S_b = diag(sqrt(p)) - p sqrt(p)^T,
                                                     p = softmax(o): column m is
                                                     sqrt(p_m) (e_m - p)

(check: (diag(sqrt p) - p sqrt(p)^T)(diag(sqrt p) - sqrt(p) p^T) = diag(p) - p p^T).
Any other loss: H_b by ``jax.hessian`` of the loss on example b alone and an
eigendecomposition H_b = V diag(lambda) V^T, S_b = V diag(sqrt(lambda)); the GGN needs
H_b positive semi-definite, so a clearly negative eigenvalue is an error (NaN under jit,
where values are not known when the error would be raised). The Hessian's own diagonal
does not: ``diag_hessian`` takes S_b = V diag(sqrt|lambda|) with signs sign(lambda)
(:func:`signed_hessian_sqrt`).

Sampled (Monte Carlo) square roots have M columns with E[S_b S_b^T] = H_b: for the three
losses, targets y^_m drawn from the model's own predictive distribution (Gaussian with
mean o and identity covariance, Bernoulli(sigma(o)), Categorical(softmax(o))) and
S[m, b] = grad_o l(o_b, y^_mb) / sqrt(M): these losses are negative log-likelihoods
with their natural parameter o, whose Fisher E[g g^T] equals H_b. For any other loss,
S[m, b] = S_b eps_mb / sqrt(M) with eps standard normal, E = S_b S_b^T = H_b.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from funcnet import losses
from funcnet._arguments import check_int, check_key
from funcnet._errors import ArgumentError
from funcnet.ad._compiled import is_concrete


def hessian_sqrt(loss, out, y) -> jax.Array:
    """A square root S (C, B, *o) of every example's loss Hessian: for each b,
    sum_m S[m, b] S[m, b]^T = d2 l_b / d o_b^2 (flattened to C x C).

    Args:
      loss: ``loss(outputs, targets) -> scalar``, the batch mean of per-example losses.
      out: the network's outputs (B, *o); y: the targets.

    Example:
      >>> import jax.numpy as jnp, funcnet as fnet
      >>> s = fnet.hessian_sqrt(fnet.losses.softmax_cross_entropy, jnp.zeros((2, 3)),
      ...                       jnp.array([0, 1]))
      >>> s.shape
      (3, 2, 3)
    """
    jax.eval_shape(loss, out, y)  # the loss's own shape checks, before any work
    batch, shape = out.shape[0], out.shape[1:]
    size = math.prod(shape)
    columns = jnp.eye(size, dtype=out.dtype).reshape((size, 1) + shape)
    if loss is losses.squared_error:
        return jnp.broadcast_to(columns, (size, batch) + shape)
    if loss is losses.logistic:
        return columns * jnp.sqrt(jax.nn.sigmoid(out) * jax.nn.sigmoid(-out))[None]
    if loss is losses.softmax_cross_entropy:
        p = jax.nn.softmax(out, axis=1)
        return jnp.sqrt(p).T[:, :, None] * (columns - p[None])
    return _eigen_sqrt(loss, out, y)[0]


def signed_hessian_sqrt(loss, out, y):
    """``(S, signs)`` with sum_m signs[m, b] S[m, b] S[m, b]^T = H_b for ANY loss, convex or
    not (what ``diag_hessian`` needs): the closed forms with signs None, else the
    eigendecomposition with S = V diag(sqrt|lambda|) and signs = sign(lambda), (C, B)."""
    if loss in (losses.squared_error, losses.logistic, losses.softmax_cross_entropy):
        return hessian_sqrt(loss, out, y), None
    jax.eval_shape(loss, out, y)
    return _eigen_sqrt(loss, out, y, signed=True)


def _eigen_sqrt(loss, out, y, signed: bool = False):
    """(S, signs) from ``jax.hessian`` of the loss on each example alone and ``eigh``;
    unless ``signed``, a clearly negative eigenvalue is an error (signs None)."""
    size = math.prod(out.shape[1:])

    def one_example(o_b, y_b):
        h = jax.hessian(lambda o: loss(o[None], jax.tree.map(lambda a: a[None], y_b)))(o_b)
        return h.reshape(size, size)

    eigenvalues, vectors = jnp.linalg.eigh(jax.vmap(one_example)(out, y))
    if signed:
        return _columns(vectors, jnp.sqrt(jnp.abs(eigenvalues)), out), jnp.sign(eigenvalues).T
    tolerance = 100 * size * jnp.finfo(out.dtype).eps * jnp.max(
        jnp.abs(eigenvalues), axis=1, keepdims=True)
    negative = eigenvalues < -tolerance
    if is_concrete(negative):
        bad = np.argwhere(np.asarray(negative))
        if bad.size:
            b, m = bad[0]
            raise ArgumentError(
                "loss", f"its Hessian with respect to the outputs is not positive "
                        f"semi-definite: example {b} has the eigenvalue "
                        f"{float(eigenvalues[b, m]):.6g} (largest magnitude "
                        f"{float(jnp.max(jnp.abs(eigenvalues[b]))):.6g}). The generalized "
                        f"Gauss-Newton matrix J^T H J needs H >= 0 (a convex loss in the "
                        f"outputs); for the true curvature use fnet.hvp.")
    roots = jnp.sqrt(jnp.where(negative, jnp.nan, jnp.maximum(eigenvalues, 0)))  # rounding
    return _columns(vectors, roots, out), None


def _columns(vectors, roots, out):
    """S (C, B, *o) with S[m, b] = v_bm * roots[b, m], v_bm the m-th eigenvector of H_b."""
    batch, shape = out.shape[0], out.shape[1:]
    s = vectors * roots[:, None, :]  # (B, C, M): column m is v_m root_m
    return jnp.transpose(s, (2, 0, 1)).reshape((-1, batch) + shape)


def sampled_hessian_sqrt(loss, out, y, key, samples: int = 1) -> jax.Array:
    """A Monte Carlo square root S (samples, B, *o) with E[sum_m S[m, b] S[m, b]^T] equal to
    example b's loss Hessian, drawn with ``key`` (see the module docstring).

    Example:
      >>> import jax, jax.numpy as jnp, funcnet as fnet
      >>> s = fnet.sampled_hessian_sqrt(fnet.losses.logistic, jnp.zeros((4, 1)),
      ...                               jnp.ones((4, 1)), jax.random.key(0), samples=2)
      >>> s.shape
      (2, 4, 1)
    """
    check_key("key", key)
    samples = check_int("samples", samples, minimum=1)
    jax.eval_shape(loss, out, y)
    batch = out.shape[0]
    keys = jax.random.split(key, samples)
    if loss is losses.squared_error:
        draws = jax.vmap(lambda k: jax.random.normal(k, out.shape, out.dtype))(keys)
        return draws / math.sqrt(samples)
    if loss in (losses.logistic, losses.softmax_cross_entropy):
        def gradient(k):  # grad of the batch mean, times B: each example's own gradient
            return batch * jax.grad(lambda o: loss(o, _model_targets(loss, out, k)))(out)
        return jax.vmap(gradient)(keys) / math.sqrt(samples)
    exact = hessian_sqrt(loss, out, y)
    eps = jax.vmap(lambda k: jax.random.normal(k, (batch, exact.shape[0]), out.dtype))(keys)
    return jnp.einsum("mbc,cb...->mb...", eps, exact) / math.sqrt(samples)


def _model_targets(loss, out, key):
    """Targets drawn from the model's predictive distribution at the outputs ``out``."""
    if loss is losses.logistic:
        return jax.random.bernoulli(key, jax.nn.sigmoid(out)).astype(out.dtype)
    return jax.random.categorical(key, out, axis=1)
