"""The layer type: a progressive layer function g(w; z) with its parameter initialiser.

A layer is a pair of pure functions plus a name::

    init(key, in_shape) -> (params, out_shape)    # shapes exclude the batch axis
    apply(params, z)    -> z_next                 # z carries a leading batch axis

``apply`` is g_i(w_i; z_i) of the lecture notes, batched: for z of shape (B, *in_shape)
it returns z_next of shape (B, *out_shape), and example b of the output depends only on
example b of the input. Layers are immutable and hashable, so they can be passed to
``jax.jit`` as static arguments and used as dictionary keys.

A layer's inputs are floating-point unless it says otherwise: ``in_dtype`` (None for the
default float dtype, or e.g. ``jnp.int32`` for a layer that indexes a table with its
input, such as an embedding). Everything that traces a layer without data (the output
shape of :func:`layer`, the generic FLOP count) probes it with inputs of that dtype.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, ClassVar, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from funcnet._arguments import check_callable, check_key, check_shape
from funcnet._caches import bounded_cache
from funcnet._errors import ArgumentError, LayerError, Path, shape_str

Shape = Tuple[int, ...]
Params = Any
InitFn = Callable[[jax.Array, Shape], Tuple[Params, Shape]]
ApplyFn = Callable[[Params, jax.Array], jax.Array]


class Layer:
    """A progressive layer function ``z_next = apply(params, z)`` and its initialiser.

    Args:
      init: ``init(key, in_shape) -> (params, out_shape)``; ``params`` is any pytree of
        arrays (``()`` for a layer without parameters); shapes exclude the batch axis.
      apply: ``apply(params, z) -> z_next``, pure, for ``z`` of shape ``(B, *in_shape)``.
      name: shown in error messages and summaries.
      rules: optional faster rules this layer brings, ``{quantity: fn}`` (see
        :meth:`rule`); anything not given is derived generically from ``apply``.
      in_dtype: the dtype of the layer's inputs: None (the default) for the default
        float dtype, or e.g. ``jnp.int32`` for integer (index) inputs. Only generic
        tracing without data reads it (the FLOP count of :meth:`flops`); ``init`` and
        ``apply`` are yours.

    Arguments of the wrong kind (a non-callable ``init`` or ``apply``, a ``name`` that is
    not a str, an ``in_dtype`` that is not a dtype) raise
    :class:`~funcnet.ArgumentError` naming the argument.

    Two layers are equal when they are of the same kind with equal settings (built-ins)
    or hold the same ``init`` and ``apply`` functions, name and ``in_dtype`` (layers
    built here), so rebuilding a network does not make ``jax.jit`` retrace.

    What the machinery asks of a layer, beyond ``init`` and ``apply`` (every entry has a
    generic default, so any layer gets every capability; built-ins override some):

    - ``in_dtype`` -- the dtype of the inputs, None for the default float dtype (the
      generic FLOP count probes ``apply`` with it); a container's inputs are those of
      the first layer it holds;
    - :meth:`flops` -- forward FLOPs per example (summaries, the Jacobian plan);
    - ``repeat_keeps`` -- what a ``repeat`` must keep for this layer's backward step:
      ``None`` (record its ``jax.vjp`` pullback), ``"input"`` (rebuild the pullback from
      z_i) or ``"output"`` (q_i from the output alone, :meth:`input_cotangent_from_output`);
    - :meth:`rule` -- faster rules for quantities of the backward pass (extensions);
    - :meth:`sublayers` -- the layers a container holds (summaries);
    - ``stochastic`` -- whether ``apply`` takes ``key=`` (see :func:`apply_with_key`);
    - :meth:`check_input_values` -- checks of a concrete input's values (indices in range);
    - ``curvature`` -- ``"linear"``, ``"elementwise"`` or None (``diag_hessian``);
    - :meth:`model_axes` -- which parameter axes a model-parallel mesh splits.

    Example:
      >>> import jax, jax.numpy as jnp, funcnet as fnet
      >>> def init(key, in_shape):
      ...     return {"scale": jnp.ones(in_shape)}, in_shape
      >>> scale = fnet.Layer(init, lambda p, z: p["scale"][None] * z, name="scale")
      >>> params, out_shape = scale.init(jax.random.key(0), (3,))
      >>> out_shape
      (3,)
    """

    #: What a repeat keeps for this layer's backward step (see the class docstring).
    repeat_keeps: ClassVar[Optional[str]] = None
    #: Faster rules, ``((quantity, fn), ...)``; see :meth:`rule`.
    rules: Tuple[Tuple[str, Callable], ...] = ()
    #: The dtype of the inputs (a numpy dtype), or None for the default float dtype.
    in_dtype: Optional[np.dtype] = None
    #: Whether ``apply`` takes a PRNG key, ``apply(params, z, key=None)``, and draws from
    #: it (dropout); a container is stochastic when a layer it holds is. Without a key a
    #: stochastic layer is deterministic (dropout: the identity).
    stochastic: ClassVar[bool] = False
    #: The layer's second derivatives, which ``diag_hessian`` needs: ``"linear"`` (g is
    #: linear, or piecewise linear, in z for fixed w and in w for fixed z: d2g/dz2 = 0 and
    #: d2g/dw2 = 0), ``"elementwise"`` (no params; g acts entry by entry, so d2g/dz2 is
    #: diagonal), or None (unknown: ``diag_hessian`` refuses the layer).
    curvature: ClassVar[Optional[str]] = None

    def __init__(self, init: InitFn, apply: ApplyFn, name: str = "layer",
                 rules: Optional[Mapping[str, Callable]] = None, in_dtype=None):
        check_callable("init", init, "init(key, in_shape) -> (params, out_shape)")
        check_callable("apply", apply, "apply(params, z) -> z_next")
        object.__setattr__(self, "_init_fn", init)
        object.__setattr__(self, "_apply_fn", apply)
        object.__setattr__(self, "name", check_name(name))
        object.__setattr__(self, "rules", rules_tuple(rules))
        object.__setattr__(self, "in_dtype", check_in_dtype(in_dtype))

    def __setattr__(self, key, value):
        raise dataclasses.FrozenInstanceError(f"layers are immutable; cannot set {key!r}")

    def init(self, key: jax.Array, in_shape: Shape) -> Tuple[Params, Shape]:
        """``(params, out_shape)`` for inputs of per-example shape ``in_shape``, a tuple
        (a bare int such as ``784`` raises :class:`~funcnet.ArgumentError`)."""
        in_shape = check_shape("in_shape", in_shape)
        check_key("key", key)
        params, out_shape = self._init_fn(key, in_shape)
        return params, tuple(out_shape)

    def apply(self, params: Params, z: jax.Array) -> jax.Array:
        """``g(params; z)`` for a batch ``z`` of shape ``(B, *in_shape)``."""
        return self._apply_fn(params, z)

    def __call__(self, params: Params, z: jax.Array) -> jax.Array:
        return self.apply(params, z)

    def check(self, params: Params, in_shape: Shape, path: Path = ()) -> Shape:
        """Checks ``params`` against what ``init`` builds for ``in_shape``; returns out_shape.

        Works on static shapes only (``jax.eval_shape`` of ``init``, cached per layer and
        shape), so a jitted caller pays nothing at run time. Raises :class:`LayerError`
        naming the layer by ``path``.
        """
        expected, out_shape = abstract_init(self, tuple(in_shape), path)
        check_tree_like(expected, params, path, "params", _rebuild_hint(in_shape))
        return out_shape

    def check_input_values(self, z: jax.Array, path: Path = ()) -> None:
        """Checks the VALUES of a concrete input batch ``z`` (its shape is :meth:`check`'s
        business), raising :class:`LayerError` naming the layer by ``path``.

        The entry points call it on x while x is concrete (not under jit), before any work;
        containers pass it to the layer that receives their input. Nothing to check by
        default; an embedding checks that its indices are in range.
        """

    def flops(self, in_shape: Shape) -> int:
        """Forward FLOPs for ONE example of per-example shape ``in_shape``.

        Generic: XLA's own cost analysis of ``apply`` on one example of dtype
        :func:`probe_dtype` (``in_dtype``), compiled once per layer and shape. Built-in
        layers override it with closed forms.
        """
        return xla_flops(self, tuple(int(d) for d in in_shape))

    def input_cotangent_from_output(self, y: jax.Array, q: jax.Array) -> jax.Array:
        """q_i = B_i^T q_{i+1} from the layer's output y = z_{i+1} alone; only for layers
        with ``repeat_keeps == "output"``."""
        raise NotImplementedError(f"{self.name} has no output form of its backward step")

    def rule(self, quantity: str) -> Optional[Callable]:
        """A faster rule this layer brings for ``quantity``, or None (use the generic one).

        A rule is ``fn(layer, params, z, q) -> result`` for a batch z = z_i (B, *in_shape)
        and the output cotangent q = q_{i+1} (B, *out_shape). Quantities asked for today:

        - ``"per_example_grads"``: the per-example parameter pullbacks a_b = A_b^T q_b, a
          pytree like params with a leading batch axis (B, *leaf shape); their sum over b
          is p_i;
        - ``"per_example_sq_norms"``: ||a_b||^2 summed over each params leaf, leaves (B,);
        - ``"sum_of_squares"``: sum_b a_b^2 entrywise, leaves like params.

        The last two default to squaring ``"per_example_grads"``; a rule that gives them
        without forming a_b (dense: ||z_b||^2 ||q_b||^2 and (Z^2)^T (Q^2)) saves the
        (B, *leaf shape) arrays.

        The curvature extensions ask for two more, ``fn(layer, params, z, s, signs)`` with
        a factor s (M, B, *out_shape) and signs (M, B) or None (``funcnet.ad._factors``):
        ``"per_example_factor_diag"``, sum_m sign (A_b^T s[m, b])^2 per example, and
        ``"factor_diag"``, its sum over b. A rule may return None where it does not apply
        (dense: sequence inputs); the generic rule then runs. ``"kronecker_factors"``
        (dense with vector inputs) gives K-FAC's pair (A, G) from the same arguments;
        layers without it get None from ``kflr`` and ``kfac``.
        """
        return dict(self.rules).get(quantity)

    def model_axes(self, params: Params):
        """Which axis of each params leaf a mesh's ``"model"`` axis may split
        (:func:`funcnet.param_shardings`): a tree that is a prefix of ``params`` whose
        leaves are a (negative) axis index or None (not split); None for the whole tree
        by default. Dense and conv name their output-feature axis, containers ask the
        layers they hold. Only memory and communication depend on it, never the numbers.
        """
        return None

    def sublayers(self, in_shape: Shape) -> Tuple[Tuple[Any, "Layer", Shape], ...]:
        """``((label, layer, its in_shape), ...)``: the layers a container holds (none for
        a leaf layer). Summaries walk these."""
        return ()

    def _fields(self):
        return (self._init_fn, self._apply_fn, self.name, self.rules, self.in_dtype)

    def __eq__(self, other):
        return type(self) is type(other) and self._fields() == other._fields()

    def __hash__(self):
        return hash((type(self), self._fields()))

    def describe(self) -> str:
        """What the layer computes, in one line (its repr shows it)."""
        return f"z -> {_function_name(self._apply_fn)}(params, z){_dtype_note(self)}"

    def __repr__(self):
        return f"<layer {self.name}: {self.describe()}>"


def apply_with_key(layer: Layer, params: Params, z: jax.Array, key=None) -> jax.Array:
    """``layer.apply(params, z)``, with ``key=key`` when the layer is stochastic and a key
    is given: a layer that takes no key (any user layer with a two-argument ``apply``) is
    never passed one."""
    if key is None or not layer.stochastic:
        return layer.apply(params, z)
    return layer.apply(params, z, key=key)


def rules_tuple(rules: Optional[Mapping[str, Callable]]) -> Tuple[Tuple[str, Callable], ...]:
    """Rules as a sorted tuple of pairs (hashable, so the layer stays a jit static value)."""
    if rules is None:
        return ()
    if not isinstance(rules, Mapping) or not all(
            isinstance(k, str) and callable(v) for k, v in rules.items()):
        raise TypeError(f"rules must map quantity names (str) to callables, got {rules!r}.")
    return tuple(sorted(rules.items()))


def check_name(name: Any) -> str:
    """A layer's ``name``: a str, else :class:`~funcnet.ArgumentError`."""
    if not isinstance(name, str):
        raise ArgumentError("name", f"must be a str (shown in errors and summaries), got "
                                    f"{name!r} ({type(name).__name__}).")
    return name


def check_in_dtype(in_dtype: Any) -> Optional[np.dtype]:
    """A layer's ``in_dtype`` as a numpy dtype (so ``jnp.int32``, ``np.int32`` and
    ``"int32"`` give equal layers), or None for the default float dtype; anything that is
    not a numeric or bool dtype raises :class:`~funcnet.ArgumentError`."""
    if in_dtype is None:
        return None
    try:
        dtype = np.dtype(in_dtype)
    except (TypeError, ValueError):
        dtype = None
    if dtype is None or not (jnp.issubdtype(dtype, jnp.number)
                             or jnp.issubdtype(dtype, jnp.bool_)):
        raise ArgumentError("in_dtype", f"must be a dtype such as jnp.int32 (for index "
                                        f"inputs) or None (the default float dtype), got "
                                        f"{in_dtype!r} ({type(in_dtype).__name__}).")
    return dtype


def probe_dtype(layer: Layer) -> np.dtype:
    """The dtype of the inputs ``layer`` is traced with when there is no data: its
    ``in_dtype`` (as JAX stores it: int64 is int32 without x64), or the default float."""
    dtype = getattr(layer, "in_dtype", None)
    if dtype is None:
        return jnp.result_type(float)
    return jax.dtypes.canonicalize_dtype(dtype)


def _dtype_note(layer: Layer) -> str:
    dtype = getattr(layer, "in_dtype", None)
    return "" if dtype is None else f" on {np.dtype(dtype).name} inputs"


def _function_name(fn) -> str:
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)


@bounded_cache(maxsize=1024)
def xla_flops(layer: Layer, in_shape: Shape) -> int:
    """XLA's FLOP count of ``layer.apply`` on one example (no data: abstract params, an
    abstract input of dtype :func:`probe_dtype`)."""
    params, _ = abstract_init(layer, in_shape)
    example = jax.ShapeDtypeStruct((1,) + tuple(in_shape), probe_dtype(layer))
    analysis = jax.jit(layer.apply).lower(params, example).compile().cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    return int((analysis or {}).get("flops", math.prod(in_shape)))


def _rebuild_hint(in_shape: Shape) -> str:
    return (
        f"This layer's per-example input shape is {shape_str(in_shape)}: either the "
        f"network's inputs have another shape than the params were built for, or the "
        f"params belong to another network. Rebuild them with net.init(key, x.shape[1:]) "
        f"for the inputs you pass."
    )


@bounded_cache(maxsize=4096)
def _abstract_init_cached(layer: Layer, in_shape: Shape):
    box = {}

    def params_only(key):
        params, out_shape = layer.init(key, in_shape)
        box["out_shape"] = tuple(int(d) for d in out_shape)
        return params

    params = jax.eval_shape(params_only, jax.random.key(0))
    return params, box["out_shape"]


def abstract_init(layer: Layer, in_shape: Shape, path: Path = ()):
    """``(param ShapeDtypeStructs, out_shape)`` of ``layer.init`` for ``in_shape``, no FLOPs.

    Cached on the (hashable) layer and the shape: the answer is a pure function of both.
    """
    try:
        return _abstract_init_cached(layer, tuple(int(d) for d in in_shape))
    except LayerError as error:
        raise LayerError(error.problem, path + error.path) from None
    except (TypeError, ValueError, IndexError) as error:
        raise LayerError(
            f"init failed for per-example input shape {shape_str(in_shape)}: {error}", path
        ) from error


def check_tree_like(reference, candidate, path: Path, what: str, hint: str,
                    check_dtype: bool = False) -> None:
    """Raises LayerError unless ``candidate`` has the tree structure and leaf shapes of
    ``reference`` (and leaf dtypes, with ``check_dtype``)."""
    ref_leaves, ref_tree = jax.tree_util.tree_flatten_with_path(reference)
    cand_leaves, cand_tree = jax.tree_util.tree_flatten_with_path(candidate)
    if ref_tree != cand_tree:
        raise LayerError(
            f"{what} have structure {_describe(cand_tree)}, but this layer expects "
            f"{_describe(ref_tree)}. {hint}",
            path,
        )
    for (key_path, ref), (_, cand) in zip(ref_leaves, cand_leaves):
        where = jax.tree_util.keystr(key_path) or "(the only leaf)"
        cand_shape = jnp.shape(cand)
        if tuple(cand_shape) != tuple(ref.shape):
            raise LayerError(
                f"{what} leaf {where} has shape {shape_str(cand_shape)}, expected "
                f"{shape_str(ref.shape)}. {hint}",
                path,
            )
        if check_dtype and jnp.result_type(cand) != jnp.result_type(ref):
            raise LayerError(
                f"{what} leaf {where} has dtype {jnp.result_type(cand)}, expected "
                f"{jnp.result_type(ref)}. {hint}",
                path,
            )


def _describe(treedef) -> str:
    text = str(treedef).replace("PyTreeDef", "")
    return text if len(text) < 120 else text[:117] + "..."


@dataclasses.dataclass(frozen=True, eq=True, repr=False)
class FunctionLayer(Layer):
    """A layer made from any pure ``g(w, z)``; see :func:`layer`."""

    g: ApplyFn
    init_params: Optional[Callable[[jax.Array, Shape], Params]] = None
    name: str = "function"
    rules: Tuple[Tuple[str, Callable], ...] = ()
    in_dtype: Optional[np.dtype] = None

    def __post_init__(self):
        object.__setattr__(self, "in_dtype", check_in_dtype(self.in_dtype))

    def init(self, key, in_shape):
        """``(params, out_shape)``; out_shape is ``g``'s, traced without data on inputs of
        shape ``(1, *in_shape)`` and dtype ``in_dtype`` (default float)."""
        in_shape = check_shape("in_shape", in_shape)
        check_key("key", key)
        params = () if self.init_params is None else self.init_params(key, in_shape)
        probe = jax.ShapeDtypeStruct((1,) + in_shape, probe_dtype(self))
        try:
            out = jax.eval_shape(self.g, params, probe)
        except (TypeError, IndexError) as error:
            if self.in_dtype is not None:
                raise
            raise LayerError(
                f"init failed for per-example input shape {shape_str(in_shape)}: {error} (g "
                f"was traced on {probe.dtype} inputs; if it takes integer inputs such as "
                f"indices, build the layer with in_dtype=jnp.int32)") from error
        return params, tuple(out.shape[1:])

    def apply(self, params, z):
        return self.g(params, z)

    def describe(self):
        return f"z -> {_function_name(self.g)}(params, z){_dtype_note(self)}"


def layer(g: ApplyFn, init_params: Optional[Callable[[jax.Array, Shape], Params]] = None,
          name: Optional[str] = None,
          rules: Optional[Mapping[str, Callable]] = None, in_dtype=None) -> Layer:
    """Turns any pure ``g(w, z)`` into a layer; the output shape is inferred.

    Args:
      g: ``g(params, z) -> z_next`` for a batch ``z`` of shape ``(B, *in_shape)``; it must
        treat examples independently (no mixing along the batch axis).
      init_params: ``init_params(key, in_shape) -> params`` (any pytree of arrays); leave it
        out for a layer without parameters (its params are ``()``).
      name: for errors and summaries; defaults to ``g.__name__``.
      rules: optional faster rules, ``{quantity: fn}`` (see :meth:`Layer.rule`).
      in_dtype: the dtype of the inputs: None (the default) for the default float dtype,
        or an integer dtype such as ``jnp.int32`` for a layer that indexes with its input
        (an embedding). The output shape and the FLOP count are traced on inputs of this
        dtype.

    A ``g`` or ``init_params`` that is not callable, a ``name`` that is not a str and an
    ``in_dtype`` that is not a dtype raise :class:`~funcnet.ArgumentError` naming the
    argument.

    The layer gets everything a built-in gets through generic rules: both modes of
    differentiation, the memory policies, ``repeat``, Jacobians and their plan, summaries
    with FLOPs (XLA's count) and every extension.

    Example:
      >>> import jax, jax.numpy as jnp, funcnet as fnet
      >>> scale = fnet.layer(lambda w, z: w[None] * z,  # w: (4,), z: (batch, 4)
      ...                    lambda key, shape: jnp.ones(shape), name="scale")
      >>> net = fnet.chain(fnet.dense(4), scale, fnet.tanh)
      >>> params, out_shape = net.init(jax.random.key(0), (3,))
      >>> out_shape
      (4,)

    An embedding written by hand, on integer inputs (indices into a table of 10 rows)::

      >>> embed = fnet.layer(lambda w, z: w[z],
      ...                    lambda key, shape: jax.random.normal(key, (10, 4)),
      ...                    name="embed", in_dtype=jnp.int32)
      >>> params, out_shape = embed.init(jax.random.key(0), (5,))  # 5 indices per example
      >>> out_shape
      (5, 4)
    """
    check_callable("g", g, "g(params, z) -> z_next")
    if init_params is not None:
        check_callable("init_params", init_params, "init_params(key, in_shape) -> params")
    name = getattr(g, "__name__", "function") if name is None else check_name(name)
    return FunctionLayer(g, init_params, name, rules_tuple(rules), check_in_dtype(in_dtype))
