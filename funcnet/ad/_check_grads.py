"""check_grads: the hand-written gradient against jax.grad (and finite differences), per layer."""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from funcnet._errors import format_path
from funcnet.ad._reverse import Loss, backprop
from funcnet.nn._chain import Chain, top_level
from funcnet.nn._layer import Layer

_DEFAULT_RTOL = {"float64": 1e-10, "float32": 1e-5, "bfloat16": 2e-2, "float16": 2e-2}


@dataclasses.dataclass(frozen=True)
class LayerCheck:
    """One top-level layer's comparison.

    max_abs_error: max |p_i - ref_i| over the layer's parameter entries.
    max_rel_error: max_abs_error / max |ref_i| (normwise; 0 when both are zero).
    fd_rel_error: with finite differences, |<p_i, v> - (f(w + h v) - f(w - h v)) / 2h|
      / (||p_i|| ||v||) for a random direction v of the layer's params; else None.
    """

    index: int
    name: str
    max_abs_error: float
    max_rel_error: float
    fd_rel_error: Optional[float]
    ok: bool


@dataclasses.dataclass(frozen=True)
class GradCheckReport:
    layers: Tuple[LayerCheck, ...]
    rtol: float
    atol: float
    fd_rtol: Optional[float]

    @property
    def ok(self) -> bool:
        return all(layer.ok for layer in self.layers)

    @property
    def worst(self) -> LayerCheck:
        return max(self.layers, key=lambda layer: (not layer.ok, layer.max_rel_error))

    def __str__(self) -> str:
        lines = [f"{'layer':<28} {'max abs err':>12} {'max rel err':>12} {'fd rel err':>12}  ok"]
        for layer in self.layers:
            fd = "-" if layer.fd_rel_error is None else f"{layer.fd_rel_error:.2e}"
            label = format_path(((layer.index, layer.name),))
            lines.append(
                f"{label:<28} {layer.max_abs_error:>12.2e} {layer.max_rel_error:>12.2e} "
                f"{fd:>12}  {'yes' if layer.ok else 'NO'}"
            )
        return "\n".join(lines)


class GradientCheckError(AssertionError):
    """The hand-written gradient disagrees with the reference; ``.report`` has the details."""

    def __init__(self, message: str, report: GradCheckReport):
        super().__init__(message)
        self.report = report


def _max_abs(tree) -> float:
    leaves = [jnp.max(jnp.abs(leaf)).astype(jnp.float32 if leaf.dtype == jnp.bfloat16 else leaf.dtype)
              for leaf in jax.tree.leaves(tree) if jnp.size(leaf)]
    return float(max(leaves)) if leaves else 0.0


def _norm(tree) -> float:
    return float(np.sqrt(sum(float(jnp.vdot(leaf, leaf)) for leaf in jax.tree.leaves(tree))))


def check_grads(net: Layer, loss: Loss, params, x, y, rtol: Optional[float] = None,
                atol: float = 0.0, finite_differences: bool = False,
                fd_rtol: float = 1e-6, fd_step: float = 1e-6,
                key: Optional[jax.Array] = None) -> GradCheckReport:
    """Compares funcnet's hand-written gradient with ``jax.grad``, layer by layer.

    For each top-level layer i, p_i (from :func:`funcnet.backprop`) is compared with
    ref_i = jax.grad(lambda w: loss(net.apply(w, x), y))(params)[i]; the layer passes when
    max |p_i - ref_i| <= atol + rtol * max |ref_i|. With ``finite_differences=True``
    (float64 params only) each layer's directional derivative <p_i, v_i> along a random
    v_i (drawn from ``key``) is also compared with a central difference of step fd_step.

    Args:
      rtol: defaults by dtype: 1e-10 (float64), 1e-5 (float32), 2e-2 (bfloat16).

    Returns:
      A :class:`GradCheckReport` (``print`` it for a table).

    Raises:
      GradientCheckError: naming the worst layer, when any layer is over tolerance.
    """
    dtype = jnp.result_type(*jax.tree.leaves(params)) if jax.tree.leaves(params) else jnp.float32
    if rtol is None:
        rtol = _DEFAULT_RTOL.get(jnp.dtype(dtype).name, 1e-5)
    if finite_differences and jnp.dtype(dtype) != jnp.float64:
        raise ValueError(
            f"finite differences need float64 params (got {jnp.dtype(dtype).name}): enable "
            f"jax.config.update('jax_enable_x64', True) and cast params and x to float64."
        )
    grads = backprop(net, loss, params, x, y).grads

    def objective(p):
        return loss(net.apply(p, x), y)

    reference = jax.grad(objective)(params)
    layers, mine = top_level(net, grads)
    _, theirs = top_level(net, reference)
    _, layer_params = top_level(net, params)
    key = jax.random.key(0) if key is None else key
    checks = []
    for index, (layer, p, ref) in enumerate(zip(layers, mine, theirs)):
        diff = jax.tree.map(lambda a, b: a - b, p, ref)
        abs_err = _max_abs(diff)
        scale = _max_abs(ref)
        rel_err = abs_err / scale if scale > 0 else (0.0 if abs_err == 0 else float("inf"))
        ok = abs_err <= atol + rtol * scale
        fd_err = None
        if finite_differences and jax.tree.leaves(layer_params[index]):
            fd_err = _finite_difference_error(
                objective, params, index, layer_params[index], p, fd_step,
                jax.random.fold_in(key, index), isinstance(net, Chain),
            )
            ok = ok and fd_err <= fd_rtol
        checks.append(LayerCheck(index, layer.name, abs_err, rel_err, fd_err, bool(ok)))
    report = GradCheckReport(tuple(checks), rtol, atol, fd_rtol if finite_differences else None)
    if not report.ok:
        worst = report.worst
        raise GradientCheckError(
            f"{format_path(((worst.index, worst.name),))}: the hand-written gradient differs "
            f"from the reference by max abs {worst.max_abs_error:.3e} (relative "
            f"{worst.max_rel_error:.3e}; rtol {rtol:g}, atol {atol:g}"
            + ("" if worst.fd_rel_error is None
               else f"; finite-difference relative error {worst.fd_rel_error:.3e}, "
                    f"fd_rtol {fd_rtol:g}")
            + f").\n{report}",
            report,
        )
    return report


def _finite_difference_error(objective, params, index, w, p, step, key, is_chain):
    leaves, treedef = jax.tree.flatten(w)
    keys = jax.random.split(key, len(leaves))
    v = jax.tree.unflatten(
        treedef, [jax.random.normal(k, jnp.shape(leaf), jnp.result_type(leaf))
                  for k, leaf in zip(keys, leaves)]
    )

    def shifted(sign):
        moved = jax.tree.map(lambda a, d: a + sign * step * d, w, v)
        return params[:index] + (moved,) + params[index + 1:] if is_chain else moved

    fd = (float(objective(shifted(1.0))) - float(objective(shifted(-1.0)))) / (2 * step)
    directional = float(sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(p),
                                                            jax.tree.leaves(v))))
    scale = _norm(p) * _norm(v)
    return abs(directional - fd) / scale if scale > 0 else abs(directional - fd)
