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

from funcnet._errors import ArgumentError, LayerError, shape_str


def _batch_mean(per_example: jax.Array) -> jax.Array:
    return jnp.mean(per_example.reshape(per_example.shape[0], -1).sum(axis=1))


def _check_same_shape(name: str, out, y) -> None:
    if jnp.shape(out) != jnp.shape(y):
        raise LayerError(
            f"{name}: targets y have shape {shape_str(jnp.shape(y))} but the outputs have "
            f"shape {shape_str(jnp.shape(out))}; they must match exactly (batch first). "
            f"Reshape y (nothing is broadcast)."
        )


def _check_targets_given(name: str, y) -> None:
    if y is None:
        raise ArgumentError("y", f"{name}: the targets are None; pass an array with one row "
                                 f"per example.")


def _check_batched(name: str, out) -> None:
    if jnp.ndim(out) < 1:
        raise LayerError(f"{name}: outputs must carry a leading batch axis, got a scalar.")
    if jnp.shape(out)[0] == 0:
        raise ArgumentError("y", f"{name}: the batch holds 0 examples, and the mean over "
                                 f"an empty batch is undefined. Pass at least one example.")


def _concrete_or_none(y):
    """y as a numpy array when its values are known now (not traced under jit), else None."""
    if isinstance(y, jax.core.Tracer):
        return None
    try:
        return np.asarray(y)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def _poison(per_example: jax.Array, valid: jax.Array) -> jax.Array:
    """NaN where a target is invalid, in the value AND (through the product) its gradient,
    so that under jit (values unknown at trace time) a bad target cannot pass unseen."""
    one, nan = jnp.ones((), per_example.dtype), jnp.full((), jnp.nan, per_example.dtype)
    return per_example * jnp.where(valid, one, nan)


def _is_integer(y) -> bool:
    return jnp.issubdtype(jnp.result_type(y), jnp.integer)


def _check_binary_values(out, y) -> None:
    """Raises unless every (concrete) target is 0 or 1."""
    labels = _concrete_or_none(y)
    if labels is None:
        return
    bad = np.flatnonzero((labels != 0) & (labels != 1))
    if bad.size:
        index = tuple(int(i) for i in np.unravel_index(bad[0], labels.shape))
        raise ArgumentError(
            "y", f"logistic takes binary labels, 0 or 1, but y[{', '.join(map(str, index))}] is "
                 f"{labels[index]}. For K classes use softmax_cross_entropy with integer "
                 f"labels in [0, K).")


def _tolerance(dtype) -> float:
    """How far a probability row's sum may be from 1: sqrt(machine epsilon) of its dtype
    (1.5e-8 in float64, 3.5e-4 in float32, 0.09 in bfloat16), far above rounding and far
    below any real mistake such as unnormalised scores."""
    return float(np.sqrt(jnp.finfo(dtype).eps))


def _check_class_targets(out, y) -> None:
    """Raises for concrete integer labels outside [0, classes), or probability rows with
    a negative entry or a sum away from 1."""
    if jnp.ndim(out) != 2:
        return
    classes = jnp.shape(out)[1]
    values = _concrete_or_none(y)
    if values is None:
        return
    if _is_integer(y):
        bad = np.flatnonzero((values < 0) | (values >= classes))
        if bad.size:
            raise ArgumentError(
                "y", f"softmax_cross_entropy: label {values[bad[0]]} at example {bad[0]} is "
                     f"out of range: with {classes} output classes labels must lie in "
                     f"[0, {classes - 1}]. Give the last layer as many outputs as there are "
                     f"classes.")
        return
    if values.ndim != 2:
        return
    negative = np.argwhere(values < 0)
    if negative.size:
        row, column = negative[0]
        raise ArgumentError(
            "y", f"softmax_cross_entropy: probability rows must be non-negative, but "
                 f"y[{row}, {column}] is {values[row, column]}. Pass probabilities (for "
                 f"example jax.nn.softmax of scores), or integer labels.")
    sums = values.astype(np.float64).sum(axis=1)
    off = np.flatnonzero(np.abs(sums - 1) > _tolerance(values.dtype))
    if off.size:
        raise ArgumentError(
            "y", f"softmax_cross_entropy: probability rows must sum to 1, but row "
                 f"{off[0]} sums to {sums[off[0]]:.6g} ({off.size} of {len(sums)} rows are "
                 f"off by more than {_tolerance(values.dtype):.1e}). Normalise them "
                 f"(y / y.sum(axis=1, keepdims=True)), or pass integer labels.")


def squared_error(out: jax.Array, y: jax.Array) -> jax.Array:
    """Mean over the batch of 0.5 * ||out_b - y_b||^2 (least squares).

    Shapes: out and y both (B, ...), equal. Gradient at out: (out - y) / B.
    """
    _check_targets_given("squared_error", y)
    _check_batched("squared_error", out)
    _check_same_shape("squared_error", out, y)
    return _batch_mean(0.5 * jnp.square(out - y))


def logistic(out: jax.Array, y: jax.Array) -> jax.Array:
    """Binary cross-entropy on logits: mean over the batch of
    -y log sigmoid(out) - (1 - y) log sigmoid(-out), summed over any output axes.

    Shapes: out (B,) or (B, k) logits and y of the same shape with entries 0 or 1 (of any
    numeric dtype); as the one documented exception to exact shape matching, out (B, 1)
    with y (B,) is accepted (a one-unit output layer). Computed with log-sigmoid, finite
    for logits of any size. Gradient at out: (sigmoid(out) - y) / B.

    A target other than 0 or 1 raises when y is concrete; under ``jax.jit`` that example's
    loss and gradient are NaN.
    """
    _check_targets_given("logistic", y)
    _check_batched("logistic", out)
    if jnp.ndim(y) == 1 and jnp.ndim(out) == 2 and jnp.shape(out)[1] == 1:
        y = y[:, None]
    _check_same_shape("logistic", out, y)
    _check_binary_values(out, y)
    y = y.astype(out.dtype)
    per_example = -(y * jax.nn.log_sigmoid(out) + (1 - y) * jax.nn.log_sigmoid(-out))
    return _batch_mean(_poison(per_example, (y == 0) | (y == 1)))


def softmax_cross_entropy(out: jax.Array, y: jax.Array) -> jax.Array:
    """Multiclass cross-entropy on logits: mean over the batch of
    logsumexp(out_b) - <y_b, out_b>.

    Shapes: out (B, K) logits; y either integer labels (B,) in [0, K) or probability rows
    (B, K), non-negative and summing to 1. Computed with log-sum-exp, finite for logits of
    any size. Gradient at out: (softmax(out) - onehot(y)) / B.

    Labels out of range and rows that are not probabilities raise an error when y is
    concrete (funcnet checks them through ``softmax_cross_entropy.check_targets`` before
    compiling anything); under ``jax.jit`` (where values are unknown at trace time) an
    out-of-range label makes that example's loss and its gradient NaN, so it cannot pass
    unseen. Float labels of shape (B,) are refused: labels must be integers.
    """
    name = "softmax_cross_entropy"
    _check_targets_given(name, y)
    if jnp.ndim(out) != 2:
        raise LayerError(
            f"{name}: outputs must be logits of shape (batch, classes), got "
            f"{shape_str(jnp.shape(out))}. Flatten or reshape the last layer's output."
        )
    _check_batched(name, out)
    batch, classes = jnp.shape(out)
    if not _is_integer(y) and jnp.shape(y) == (batch,):
        raise ArgumentError(
            "y", f"{name}: labels must be integers, got {jnp.result_type(y)} labels of "
                 f"shape {shape_str(jnp.shape(y))}. Convert them (y.astype(jnp.int32)), or "
                 f"pass probability rows of shape ({batch}, {classes}).")
    _check_class_targets(out, y)
    if _is_integer(y):
        if jnp.shape(y) != (batch,):
            raise LayerError(
                f"{name}: integer labels y must have shape ({batch},), one per example, got "
                f"{shape_str(jnp.shape(y))}."
            )
        picked = jnp.take_along_axis(out, jnp.clip(y, 0, classes - 1)[:, None], axis=1)[:, 0]
        per_example = _poison(jax.nn.logsumexp(out, axis=1) - picked, (y >= 0) & (y < classes))
    else:
        _check_same_shape(name, out, y)
        y = y.astype(out.dtype)
        per_example = -jnp.sum(y * jax.nn.log_softmax(out, axis=1), axis=1)
    return jnp.mean(per_example)


#: Target checks that need values, run by funcnet on concrete targets before tracing.
logistic.check_targets = _check_binary_values
softmax_cross_entropy.check_targets = _check_class_targets

__all__ = ["squared_error", "logistic", "softmax_cross_entropy"]
