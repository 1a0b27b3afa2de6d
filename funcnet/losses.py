"""Losses l_y(z_{L+1}): ``loss(outputs, targets) -> scalar``, the MEAN over the batch.

Each takes the network's outputs (B, ...) and targets, checks their shapes on static
information (so jitted code pays nothing), and returns the mean over the B examples of a
per-example loss. Any callable with the same signature works wherever funcnet takes a loss.

The seed of the backward pass is q_{L+1} = grad l_y(z_{L+1}); for these losses it is
(out - y) / B, (sigmoid(out) - y) / B and (softmax(out) - onehot(y)) / B respectively.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from funcnet._errors import LayerError, shape_str


def _batch_mean(per_example: jax.Array) -> jax.Array:
    return jnp.mean(per_example.reshape(per_example.shape[0], -1).sum(axis=1))


def _check_same_shape(name: str, out, y) -> None:
    if jnp.shape(out) != jnp.shape(y):
        raise LayerError(
            f"{name}: targets y have shape {shape_str(jnp.shape(y))} but the outputs have "
            f"shape {shape_str(jnp.shape(out))}; they must match exactly (batch first). "
            f"Reshape y (nothing is broadcast)."
        )


def _check_batched(name: str, out) -> None:
    if jnp.ndim(out) < 1:
        raise LayerError(f"{name}: outputs must carry a leading batch axis, got a scalar.")


def _concrete_or_none(y):
    """y as a numpy array when its values are known now (not traced under jit), else None."""
    try:
        return np.asarray(y)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def _check_label_range(out, y) -> None:
    """Raises for integer labels outside [0, classes) when their values are known now."""
    if not jnp.issubdtype(jnp.result_type(y), jnp.integer) or jnp.ndim(out) != 2:
        return
    labels = _concrete_or_none(y)
    if labels is None:
        return
    classes = jnp.shape(out)[1]
    bad = np.flatnonzero((labels < 0) | (labels >= classes))
    if bad.size:
        raise LayerError(
            f"softmax_cross_entropy: label {labels[bad[0]]} at example {bad[0]} is out of "
            f"range: with {classes} output classes labels must lie in [0, {classes - 1}]. "
            f"Give the last layer as many outputs as there are classes."
        )


def squared_error(out: jax.Array, y: jax.Array) -> jax.Array:
    """Mean over the batch of 0.5 * ||out_b - y_b||^2 (least squares).

    Shapes: out and y both (B, ...), equal. Gradient at out: (out - y) / B.
    """
    _check_batched("squared_error", out)
    _check_same_shape("squared_error", out, y)
    return _batch_mean(0.5 * jnp.square(out - y))


def logistic(out: jax.Array, y: jax.Array) -> jax.Array:
    """Binary cross-entropy on logits: mean over the batch of
    -y log sigmoid(out) - (1 - y) log sigmoid(-out), summed over any output axes.

    Shapes: out (B,) or (B, k) logits and y of the same shape with entries in {0, 1}
    (or probabilities in [0, 1]); as the one documented exception to exact shape
    matching, out (B, 1) with y (B,) is accepted (a one-unit output layer). Computed with
    log-sigmoid, finite for logits of any size. Gradient at out: (sigmoid(out) - y) / B.
    """
    _check_batched("logistic", out)
    if jnp.ndim(y) == 1 and jnp.ndim(out) == 2 and jnp.shape(out)[1] == 1:
        y = y[:, None]
    _check_same_shape("logistic", out, y)
    y = y.astype(out.dtype)
    per_example = -(y * jax.nn.log_sigmoid(out) + (1 - y) * jax.nn.log_sigmoid(-out))
    return _batch_mean(per_example)


def softmax_cross_entropy(out: jax.Array, y: jax.Array) -> jax.Array:
    """Multiclass cross-entropy on logits: mean over the batch of
    logsumexp(out_b) - <y_b, out_b>.

    Shapes: out (B, K) logits; y either integer labels (B,) in [0, K) or probability rows
    (B, K). Computed with log-sum-exp, finite for logits of any size. Gradient at out:
    (softmax(out) - onehot(y)) / B.

    Labels out of range raise an error when y is concrete (funcnet checks them through
    ``softmax_cross_entropy.check_targets`` before compiling anything); under ``jax.jit``
    (where values are unknown at trace time) such an example's loss and its gradient are
    NaN, so it cannot pass unseen.
    """
    name = "softmax_cross_entropy"
    if jnp.ndim(out) != 2:
        raise LayerError(
            f"{name}: outputs must be logits of shape (batch, classes), got "
            f"{shape_str(jnp.shape(out))}. Flatten or reshape the last layer's output."
        )
    batch, classes = jnp.shape(out)
    if jnp.issubdtype(jnp.result_type(y), jnp.integer):
        if jnp.shape(y) != (batch,):
            raise LayerError(
                f"{name}: integer labels y must have shape ({batch},), one per example, got "
                f"{shape_str(jnp.shape(y))}."
            )
        _check_label_range(out, y)
        valid = (y >= 0) & (y < classes)
        picked = jnp.take_along_axis(out, jnp.clip(y, 0, classes - 1)[:, None], axis=1)[:, 0]
        per_example = jax.nn.logsumexp(out, axis=1) - picked
        # NaN for an out-of-range label, in the value AND (through the product) its gradient
        poison = jnp.where(valid, jnp.ones((), out.dtype), jnp.full((), jnp.nan, out.dtype))
        per_example = per_example * poison
    else:
        _check_same_shape(name, out, y)
        y = y.astype(out.dtype)
        per_example = -jnp.sum(y * jax.nn.log_softmax(out, axis=1), axis=1)
    return jnp.mean(per_example)


#: Target checks that need values, run by funcnet on concrete targets before tracing.
softmax_cross_entropy.check_targets = _check_label_range

__all__ = ["squared_error", "logistic", "softmax_cross_entropy"]
