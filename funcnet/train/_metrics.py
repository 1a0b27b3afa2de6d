"""Metrics: accuracy, and a jitted evaluation of loss and accuracy."""

from __future__ import annotations

from typing import Dict, Optional

import jax
import jax.numpy as jnp

from funcnet import losses as _losses
from funcnet._arguments import check_bool
from funcnet._errors import LayerError, shape_str
from funcnet.ad._inputs import check_batch, check_loss, check_targets, output_struct
from funcnet.ad._reverse import Loss
from funcnet.nn._layer import Layer


def accuracy(out: jax.Array, y: jax.Array) -> jax.Array:
    """Fraction of correct predictions.

    Multiclass: out (B, K) logits and y integer labels (B,) or probability rows (B, K)
    (argmax compared). Binary: out (B,) or (B, 1) logits and y in {0, 1}: out > 0 predicts 1.
    """
    if jnp.ndim(out) < 1 or jnp.ndim(y) < 1 or jnp.shape(y)[0] != jnp.shape(out)[0]:
        raise LayerError(f"accuracy: targets y of shape {shape_str(jnp.shape(y))} do not have "
                         f"the outputs' batch (shape {shape_str(jnp.shape(out))}); pass one "
                         f"target per example.")
    if jnp.ndim(out) == 2 and jnp.shape(out)[1] > 1:
        labels = y if jnp.ndim(y) == 1 else jnp.argmax(y, axis=1)
        return jnp.mean(jnp.argmax(out, axis=1) == labels)
    logits = out.reshape(jnp.shape(out)[0])
    return jnp.mean((logits > 0) == (y.reshape(jnp.shape(out)[0]) > 0.5))


_CLASSIFICATION_LOSSES = (_losses.softmax_cross_entropy, _losses.logistic)


def evaluate(net: Layer, loss: Loss, params, x, y,
             with_accuracy: Optional[bool] = None) -> Dict[str, float]:
    """``{"loss": ..., "accuracy": ...}`` of ``params`` on (x, y), one jitted forward pass.

    ``with_accuracy`` defaults to True for the classification losses of
    ``funcnet.losses`` (softmax_cross_entropy, logistic), else False. The inputs, params
    and targets are checked first, as everywhere (label ranges included).
    """
    check_loss(loss)
    out_shape = check_batch(net, params, x)
    check_targets(output_struct(params, x, out_shape), y, loss)
    if with_accuracy is not None:
        check_bool("with_accuracy", with_accuracy)
    return measure(net, loss, params, x, y, with_accuracy)


def measure(net: Layer, loss: Loss, params, x, y,
            with_accuracy: Optional[bool] = None) -> Dict[str, float]:
    """:func:`evaluate` without its checks, for callers that made them once (fit, every
    epoch on the same eval_data)."""
    if with_accuracy is None:
        with_accuracy = loss in _CLASSIFICATION_LOSSES
    loss_value, acc = _evaluate_jit(net, loss, bool(with_accuracy), params, x, y)
    result = {"loss": float(loss_value)}
    if with_accuracy:
        result["accuracy"] = float(acc)
    return result


def _evaluate(net, loss, with_accuracy, params, x, y):
    out = net.apply(params, x)
    return loss(out, y), (accuracy(out, y) if with_accuracy else jnp.zeros(()))


_evaluate_jit = jax.jit(_evaluate, static_argnums=(0, 1, 2))


