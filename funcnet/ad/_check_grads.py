"""check_grads: the hand-written gradient against jax.grad (and finite differences), per layer.

Three metrics, each per top-level layer i of z_{i+1} = g_i(w_i; z_i):

- the jax.grad comparison: p_i (the walk's) against ref_i (``jax.grad``). It sees a wrong
  walk, but not a wrong rule the two share (a ``jax.custom_vjp`` inside a layer);
- ``fd_rel_error`` (end to end): <p_i, v> against a central difference of the loss along
  v. A wrong rule anywhere above layer i (or in the loss) shows here too: a wrong input
  cotangent B_j^T of layer j > i corrupts q_{j}, hence every p_i below it;
- ``fd_local_rel_error`` (the layer's own derivative): layer i alone, at its input z_i,
  against finite differences of g_i (see :func:`_own_derivative_error`). It does not
  depend on the other layers, so it names the layer whose rule is wrong.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from funcnet._arguments import check_bool, check_real
from funcnet._errors import ArgumentError, Path, format_path
from funcnet.ad._reverse import Loss, backprop, layer_vjp
from funcnet.nn._chain import Chain, top_level
from funcnet.nn._layer import Layer, apply_with_key
from funcnet.nn._residual import Residual

_DEFAULT_RTOL = {"float64": 1e-10, "float32": 1e-5, "bfloat16": 2e-2, "float16": 2e-2}

#: The metrics a layer can fail, in the order a failure message leads with them.
METRICS = ("max_abs_error", "fd_local_rel_error", "fd_rel_error")


@dataclasses.dataclass(frozen=True)
class LayerCheck:
    """One top-level layer's comparison.

    max_abs_error: max |p_i - ref_i| over the layer's parameter entries (ref_i: jax.grad).
    max_rel_error: max_abs_error / max |ref_i| (normwise; 0 when both are zero).
    fd_rel_error: with finite differences, the end-to-end check of p_i:
      |<p_i, v> - fd| / max(||p_i|| ||v||, |fd|), fd = (f(w + h v) - f(w - h v)) / 2h the
      central difference of the loss f along a random direction v of the layer's params;
      None without finite differences or params. A wrong rule in a layer ABOVE this one
      (its input cotangent) or in the loss shows here as well.
    fd_local_rel_error: with finite differences, the check of the layer's OWN derivative
      at its input z_i, independent of the other layers: for a random output cotangent u
      and direction (v_w, v_z), d = <A_i^T u, v_w> + <B_i^T u, v_z> from the layer's
      pullback (as the walk computes it) against the central difference fd of
      <u, g_i(w_i + h v_w; z_i + h v_z)>; |d - fd| / max(||(A_i^T u, B_i^T u)||
      ||(v_w, v_z)||, |fd|). None without finite differences (or with nothing to perturb).
      Both fd errors are normwise (at most about 1): a gradient off by e shows as about
      (||e|| / ||gradient||) |N(0, 1)| / sqrt(n) for n entries perturbed, so a wrong rule
      in a large layer reads small, yet orders of magnitude over fd_rtol and the noise.
    ok: no metric over its tolerance.
    failed: the metrics over tolerance, by field name, in the order of :data:`METRICS`
      (the jax.grad comparison is reported as "max_abs_error").
    fd_local_culprit, fd_local_culprit_error: when fd_local_rel_error fails, the path
      (outermost first, this layer first) of the innermost layer whose own derivative
      fails, found by descending into chains and residuals, and its own relative error;
      this layer itself when it is a leaf or none of its sublayers fails alone. () and None
      when the own-derivative check passes or did not run.
    """

    index: int
    name: str
    max_abs_error: float
    max_rel_error: float
    fd_rel_error: Optional[float]
    fd_local_rel_error: Optional[float]
    ok: bool
    failed: Tuple[str, ...] = ()
    fd_local_culprit: Path = ()
    fd_local_culprit_error: Optional[float] = None


@dataclasses.dataclass(frozen=True)
class GradCheckReport:
    """Every top-level layer's :class:`LayerCheck` and the tolerances used (``fd_rtol``
    None without finite differences). ``print`` it for a table."""

    layers: Tuple[LayerCheck, ...]
    rtol: float
    atol: float
    fd_rtol: Optional[float]

    @property
    def ok(self) -> bool:
        return all(layer.ok for layer in self.layers)

    @property
    def worst(self) -> LayerCheck:
        """The layer a failure message names: a failing layer first, by the metric it
        fails that comes first in :data:`METRICS` (the jax.grad comparison, then its own
        derivative, then the end-to-end one), then by that metric's error."""
        def badness(layer):
            if layer.ok:
                return (0, 0, layer.max_rel_error)
            metric = layer.failed[0]
            value = layer.max_rel_error if metric == "max_abs_error" else getattr(layer, metric)
            return (1, len(METRICS) - METRICS.index(metric), value)

        return max(self.layers, key=badness)

    def __str__(self) -> str:
        lines = [f"{'layer':<28} {'max abs err':>12} {'max rel err':>12} {'fd rel err':>12} "
                 f"{'fd local err':>12}  ok"]
        for layer in self.layers:
            fd, local = ("-" if e is None else f"{e:.2e}"
                         for e in (layer.fd_rel_error, layer.fd_local_rel_error))
            label = format_path(((layer.index, layer.name),))
            lines.append(
                f"{label:<28} {layer.max_abs_error:>12.2e} {layer.max_rel_error:>12.2e} "
                f"{fd:>12} {local:>12}  {'yes' if layer.ok else 'NO'}"
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


def _dot(a, b) -> float:
    return float(sum(float(jnp.vdot(x, y))
                     for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))))


def _normal_like(key, tree):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves)) if leaves else []
    return jax.tree.unflatten(
        treedef, [jax.random.normal(k, jnp.shape(leaf), jnp.result_type(leaf))
                  for k, leaf in zip(keys, leaves)]
    )


def _relative(directional: float, fd: float, scale: float) -> float:
    """|directional - fd| / max(scale, |fd|); scale = ||gradient|| ||v|| bounds the true
    |fd| (Cauchy-Schwarz) unless the gradient is wrong, so the error is at most about 1."""
    denominator = max(scale, abs(fd))
    return abs(directional - fd) / denominator if denominator > 0 else 0.0


#: fold_in data of the dropout masks check_grads draws from its key
_MASKS = 0x6D61736B


def check_grads(net: Layer, loss: Loss, params, x, y, rtol: Optional[float] = None,
                atol: float = 0.0, finite_differences: bool = False,
                fd_rtol: float = 1e-6, fd_step: float = 1e-6,
                key: Optional[jax.Array] = None) -> GradCheckReport:
    """Compares funcnet's hand-written gradient with ``jax.grad``, layer by layer, and
    with ``finite_differences=True`` also with finite differences.

    For each top-level layer i, p_i (from :func:`funcnet.backprop`) is compared with
    ref_i = jax.grad(lambda w: loss(net.apply(w, x), y))(params)[i]; the layer passes when
    max |p_i - ref_i| <= atol + rtol * max |ref_i|.

    ``jax.grad`` uses a layer's ``jax.custom_vjp`` rule just as the walk does, so a wrong
    rule passes that comparison; finite differences (float64 params only) catch it. Per
    layer, with directions v drawn from ``key`` (entries standard normal) and step h:

    - fd_rel_error: <p_i, v> against the central difference of the loss along v (end to
      end: also off for the layers below a layer with a wrong input cotangent);
    - fd_local_rel_error: the layer's own pullback against the central difference of
      <u, g_i(w_i + h v_w; z_i + h v_z)> at its input z_i, for a random cotangent u (the
      layer alone: off only for the layer whose rule is wrong). A failing chain or
      residual is descended into to name the innermost failing layer.

    Args:
      rtol: defaults by dtype: 1e-10 (float64), 1e-5 (float32), 2e-2 (bfloat16).
      atol: absolute tolerance of the jax.grad comparison.
      finite_differences: also run the two finite-difference checks.
      fd_rtol: tolerance of both finite-difference relative errors.
      fd_step: the central-difference step h. The defaults fd_step = fd_rtol = 1e-6 are
        for float64, the only dtype finite differences run in: the truncation error
        O(h^2) ~ 1e-12 and the rounding error O(eps / h) ~ 1e-10 stay far below 1e-6,
        while a wrong rule reads orders of magnitude above it (1e-1 for small layers;
        normwise, see :class:`LayerCheck`). In float32 the best central difference is
        good to about eps^(2/3) ~ 2e-5 only and its step (~5e-3) crosses ReLU kinks, so
        it cannot tell a wrong rule from noise reliably; lower precisions raise.
      key: for the random directions and cotangents; defaults to ``jax.random.key(0)``.
        A net with stochastic layers (dropout) is checked on one draw of its masks, from
        ``jax.random.fold_in(key, 0x6D61736B)``, the same draw on both sides; each
        layer's own-derivative check runs it without a key (dropout as the identity).

    Returns:
      A :class:`GradCheckReport` (``print`` it for a table).

    Raises:
      GradientCheckError: when any layer is over tolerance. The message leads with the
        metric that failed and the layer it names: the jax.grad comparison if it fails
        anywhere; else the layer whose OWN derivative disagrees with finite differences
        (by its path, e.g. ``layer 1 (chain) > layer 0 (bad)``), not the layers below it
        that inherit the error; else the end-to-end check (every layer's own derivative
        agrees: the loss's gradient is the suspect).
      ArgumentError: ``finite_differences=True`` with params that are not float64.
    """
    for name, value in (("atol", atol), ("fd_rtol", fd_rtol), ("fd_step", fd_step)) + (
            (("rtol", rtol),) if rtol is not None else ()):
        if check_real(name, value) < 0 or (name == "fd_step" and value == 0):
            raise ArgumentError(name, f"must be {'positive' if name == 'fd_step' else 'non-negative'}"
                                      f", got {value}.")
    check_bool("finite_differences", finite_differences)
    dtype = jnp.result_type(*jax.tree.leaves(params)) if jax.tree.leaves(params) else jnp.float32
    if rtol is None:
        rtol = _DEFAULT_RTOL.get(jnp.dtype(dtype).name, 1e-5)
    if finite_differences and jnp.dtype(dtype) != jnp.float64:
        raise ArgumentError(
            "finite_differences", f"finite differences need float64 params (got "
                                  f"{jnp.dtype(dtype).name}): enable jax.config.update("
                                  f"'jax_enable_x64', True) and cast params and x to float64.")
    key = jax.random.key(0) if key is None else key
    # a net with dropout is checked on one draw of its masks (both sides the same draw)
    masks = jax.random.fold_in(key, _MASKS) if net.stochastic else None
    record = backprop(net, loss, params, x, y, key=masks)

    def objective(p):
        return loss(apply_with_key(net, p, x, masks), y)

    reference = jax.grad(objective)(params)
    layers, mine = top_level(net, record.grads)
    _, theirs = top_level(net, reference)
    _, layer_params = top_level(net, params)
    checks = []
    for index, (layer, p, ref, w) in enumerate(zip(layers, mine, theirs, layer_params)):
        diff = jax.tree.map(lambda a, b: a - b, p, ref)
        abs_err = _max_abs(diff)
        scale = _max_abs(ref)
        rel_err = abs_err / scale if scale > 0 else (0.0 if abs_err == 0 else float("inf"))
        failed = [] if abs_err <= atol + rtol * scale else ["max_abs_error"]
        fd_err = local_err = culprit_err = None
        culprit: Path = ()
        if finite_differences:
            layer_key = jax.random.fold_in(key, index)
            z = record.activations[index]
            local_key = jax.random.fold_in(layer_key, 1)
            local_err = _own_derivative_error(layer, w, z, fd_step, local_key)
            if local_err is not None and local_err > fd_rtol:
                failed.append("fd_local_rel_error")
                culprit, culprit_err = _culprit(layer, w, z, ((index, layer.name),), local_err,
                                                fd_step, fd_rtol, local_key)
            if jax.tree.leaves(w):
                fd_err = _finite_difference_error(objective, params, index, w, p, fd_step,
                                                  layer_key, isinstance(net, Chain))
                if fd_err > fd_rtol:
                    failed.append("fd_rel_error")
        checks.append(LayerCheck(index, layer.name, abs_err, rel_err, fd_err, local_err,
                                 not failed, tuple(failed), culprit, culprit_err))
    report = GradCheckReport(tuple(checks), rtol, atol, fd_rtol if finite_differences else None)
    if not report.ok:
        raise GradientCheckError(f"{_failure(report)}\n{report}", report)
    return report


def _failure(report: GradCheckReport) -> str:
    """The failure message: the metric that failed first, then the layer it names."""
    worst = report.worst
    where = format_path(((worst.index, worst.name),))
    metric = worst.failed[0]
    if metric == "max_abs_error":
        return (
            f"jax.grad disagrees with the hand-written gradient of {where}: max abs error "
            f"{worst.max_abs_error:.3e} (relative {worst.max_rel_error:.3e}; rtol "
            f"{report.rtol:g}, atol {report.atol:g})."
        )
    if metric == "fd_local_rel_error":
        return (
            f"finite differences disagree with {format_path(worst.fd_local_culprit)}'s own "
            f"derivative: relative error {worst.fd_local_culprit_error:.2e} > fd_rtol "
            f"{report.fd_rtol:g} (fd_local_rel_error).\nIts backward rule is wrong (a "
            f"custom_vjp?); jax.grad uses the same rule, so only finite differences see "
            f"it. A wrong input cotangent also spoils the gradients of the layers below it "
            f"(their fd rel err), though their own derivatives are right."
        )
    return (
        f"finite differences disagree with the end-to-end gradient of {where}: relative "
        f"error {worst.fd_rel_error:.2e} > fd_rtol {report.fd_rtol:g} (fd_rel_error), though "
        f"every layer's own derivative agrees with finite differences.\nThe error enters "
        f"above the layers: check the loss's gradient (a custom_vjp in the loss?)."
    )


def _own_derivative_error(layer: Layer, w, z, step: float, key) -> Optional[float]:
    """Finite differences against layer's own pullback at its input z; None when there is
    nothing to perturb (no params and an integer input).

    With (A^T u, B^T u) = pullback(u) from the walk's own step (:func:`layer_vjp`), a
    random output cotangent u and a random direction (v_w, v_z), both

        d  = <A^T u, v_w> + <B^T u, v_z>
        fd = (<u, g(w + h v_w; z + h v_z)> - <u, g(w - h v_w; z - h v_z)>) / 2h

    equal u^T (A v_w + B v_z), fd up to O(h^2). The result is |d - fd| / max(||(A^T u,
    B^T u)|| ||(v_w, v_z)||, |fd|). Nothing but this layer enters, so a wrong rule
    elsewhere cannot move it. A floating z is taken in float64; an integer one is not
    perturbed.
    """
    perturb_z = jnp.issubdtype(z.dtype, jnp.floating)
    if perturb_z:
        z = z.astype(jnp.float64)
    if not perturb_z and not jax.tree.leaves(w):
        return None
    out, pullback = layer_vjp(layer, w, z)
    key_u, key_w, key_z = jax.random.split(key, 3)
    u = jax.random.normal(key_u, out.shape, out.dtype)
    v_w = _normal_like(key_w, w)
    v_z = jax.random.normal(key_z, z.shape, z.dtype) if perturb_z else None
    p, q = pullback(u)

    def along(sign):
        w_moved = jax.tree.map(lambda a, d: a + sign * step * d, w, v_w)
        z_moved = z + sign * step * v_z if perturb_z else z
        return _dot(u, layer.apply(w_moved, z_moved))

    fd = (along(1.0) - along(-1.0)) / (2 * step)
    if perturb_z:
        return _relative(_dot(p, v_w) + _dot(q, v_z), fd, _norm((p, q)) * _norm((v_w, v_z)))
    return _relative(_dot(p, v_w), fd, _norm(p) * _norm(v_w))


def _sublayers(layer: Layer, params, z):
    """(index, sublayer, its params, its input) of a chain or residual; () otherwise."""
    if isinstance(layer, Chain):
        held = []
        for index, (item, w) in enumerate(zip(layer.layers, params)):
            held.append((index, item, w, z))
            z = item.apply(w, z)
        return held
    if isinstance(layer, Residual):
        return [(0, layer.inner, params, z)]
    return []


def _culprit(layer: Layer, params, z, path: Path, error: float, step: float,
             fd_rtol: float, key):
    """(path, own relative error) of the innermost layer inside ``layer`` (at ``path``,
    own error ``error`` > fd_rtol) whose own derivative fails: the worst failing sublayer,
    descended into in turn; ``layer`` itself when no sublayer fails alone."""
    if jnp.issubdtype(z.dtype, jnp.floating):
        z = z.astype(jnp.float64)
    failing = []
    for index, item, w, z_item in _sublayers(layer, params, z):
        item_key = jax.random.fold_in(key, index)
        item_error = _own_derivative_error(item, w, z_item, step, item_key)
        if item_error is not None and item_error > fd_rtol:
            failing.append((item_error, index, item, w, z_item, item_key))
    if not failing:
        return path, error
    item_error, index, item, w, z_item, item_key = max(failing, key=lambda f: f[0])
    return _culprit(item, w, z_item, path + ((index, item.name),), item_error, step,
                    fd_rtol, item_key)


def _finite_difference_error(objective, params, index, w, p, step, key, is_chain):
    """fd_rel_error of layer ``index``: <p, v> against the central difference of the loss
    along a random direction v of the layer's params (the others fixed)."""
    v = _normal_like(key, w)

    def shifted(sign):
        moved = jax.tree.map(lambda a, d: a + sign * step * d, w, v)
        return params[:index] + (moved,) + params[index + 1:] if is_chain else moved

    fd = (float(objective(shifted(1.0))) - float(objective(shifted(-1.0)))) / (2 * step)
    return _relative(_dot(p, v), fd, _norm(p) * _norm(v))
