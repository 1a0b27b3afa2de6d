"""The one backward walk (``funcnet.ad._walk``): its program, its layout, its extensions.

- Without extensions, the jitted value_and_grad and the train step compile to the
  program ``jax.value_and_grad`` compiles to (XLA's FLOP count, exactly).
- The architecture: no import cycles, no function-level imports that could hide one, no
  module of ``funcnet.ad`` or ``funcnet.train`` that imports a leaf layer's module, and
  ``__init__`` modules that only re-export.
- The extension protocol: an extension written here sees, at every leaf, the layer, its
  params, its input z_i and the cotangent q_{i+1}, and its results come back like params,
  through chains, residuals and repeats, under every memory policy, jitted and vmapped.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import funcnet as fnet
from exactness import assert_close, random_params
from funcnet.nn._layer import abstract_init
from funcnet.train._state import TrainState
from funcnet.train._step import step_fn

PACKAGE = Path(fnet.__file__).resolve().parent
LOSS = fnet.losses.squared_error


def _flops(compiled) -> float:
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    return float(analysis["flops"])


NETS = {
    "mlp": fnet.chain(fnet.dense(64), fnet.tanh, fnet.dense(64), fnet.relu, fnet.dense(3)),
    "nested and residual": fnet.chain(
        fnet.dense(32), fnet.chain(fnet.gelu, fnet.residual(fnet.chain(fnet.dense(32), fnet.tanh))),
        fnet.dense(3)),
}


@pytest.mark.parametrize("name", NETS)
def test_value_and_grad_compiles_to_jax_value_and_grads_program(name):
    net = NETS[name]
    params = abstract_init(net, (16,))[0]
    x = jax.ShapeDtypeStruct((128, 16), jnp.float32)
    y = jax.ShapeDtypeStruct((128, 3), jnp.float32)
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.float32), params)
    ours = _flops(jax.jit(fnet.value_and_grad(net, LOSS)).lower(params, x, y).compile())
    theirs = _flops(jax.jit(jax.value_and_grad(lambda p, x_, y_: LOSS(net.apply(p, x_), y_)))
                    .lower(params, x, y).compile())
    assert ours / theirs == 1.0, (ours, theirs)


@pytest.mark.standard_promotion
def test_the_train_step_compiles_to_the_program_of_a_jax_value_and_grad_step():
    net = NETS["mlp"]
    optimizer = optax.adam(1e-3)
    params = jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), abstract_init(net, (16,))[0])
    state = TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32))
    x = jax.ShapeDtypeStruct((128, 16), jnp.float32)
    y = jax.ShapeDtypeStruct((128, 3), jnp.float32)

    def reference(state, x_, y_):
        value, grads = jax.value_and_grad(lambda p: LOSS(net.apply(p, x_), y_))(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        return TrainState(optax.apply_updates(state.params, updates), opt_state,
                          state.step + 1), value

    ours = _flops(jax.jit(step_fn(net, LOSS, optimizer)).lower(state, x, y).compile())
    theirs = _flops(jax.jit(reference).lower(state, x, y).compile())
    assert ours / theirs == 1.0, (ours, theirs)


# --- The architecture ------------------------------------------------------------------


def _modules():
    """{dotted module name: parsed AST} for every module of the package."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = (path, ast.parse(path.read_text()))
    return found


def _imported(module: str, node) -> list:
    """funcnet modules a (top-level or nested) import statement names."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name.startswith("funcnet")]
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("funcnet"):
        return [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    return []


def test_no_function_level_imports_except_optional_dependencies():
    """An import inside a function can hide a cycle; the ones allowed are optional
    dependencies, imported only when used: tqdm (a progress bar), scikit-learn (its
    bundled data sets), dp-accounting (the privacy spent by DP-SGD)."""
    allowed = {("funcnet.train._fit", "tqdm.auto"), ("funcnet.data", "sklearn"),
               ("funcnet.train._privacy", "dp_accounting"),
               ("funcnet.train._privacy", "dp_accounting.rdp")}
    for name, (path, tree) in _modules().items():
        for function in ast.walk(tree):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    target = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
                    assert (name, target) in allowed, f"{path}:{node.lineno} imports {target} in a function"


def test_the_modules_import_each_other_without_cycles():
    modules = _modules()
    graph = {name: set() for name in modules}
    for name, (_, tree) in modules.items():
        for node in tree.body:
            for target in _imported(name, node):
                if target in modules and target != name:
                    graph[name].add(target)
    # a package imports its own submodules through __init__; that is not a cycle of ours
    for name in graph:
        graph[name] = {t for t in graph[name] if not t.startswith(name + ".")}
    state = {}

    def visit(name, stack):
        state[name] = "open"
        for target in sorted(graph[name]):
            assert state.get(target) != "open", f"import cycle: {' -> '.join(stack + [target])}"
            if target not in state:
                visit(target, stack + [target])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


LEAF_LAYER_MODULES = ("funcnet.nn._dense", "funcnet.nn._activations", "funcnet.nn._reshape",
                      "funcnet.nn._conv", "funcnet.nn._pooling", "funcnet.nn._padding",
                      "funcnet.nn._norm", "funcnet.nn._embedding", "funcnet.nn._attention",
                      "funcnet.nn._dropout")


def test_differentiation_and_training_never_import_a_leaf_layer():
    """Nothing below funcnet.ad or funcnet.train knows which leaf layers exist: what a
    layer knows (FLOPs, what a repeat keeps, faster rules) lives with the layer."""
    checked = 0
    for name, (path, tree) in _modules().items():
        if not name.startswith(("funcnet.ad", "funcnet.train")):
            continue
        checked += 1
        for node in ast.walk(tree):
            for target in _imported(name, node):
                assert not target.startswith(LEAF_LAYER_MODULES), f"{path} imports {target}"
                assert target not in ("funcnet.nn.Dense", "funcnet.nn.Elementwise",
                                      "funcnet.nn.LeakyRelu", "funcnet.nn.Flatten",
                                      "funcnet.nn.Conv", "funcnet.nn.MaxPool",
                                      "funcnet.nn.AvgPool", "funcnet.nn.LayerNorm",
                                      "funcnet.nn.Embedding", "funcnet.nn.SelfAttention",
                                      "funcnet.nn.Reshape", "funcnet.nn.Dropout"), path
    assert checked >= 15


def test_init_modules_only_re_export():
    for name, (path, tree) in _modules().items():
        if path.name != "__init__.py":
            continue
        for node in tree.body:
            is_docstring = isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
            is_import = isinstance(node, (ast.Import, ast.ImportFrom))
            is_listing = isinstance(node, ast.Assign) and all(
                isinstance(t, ast.Name) and t.id in ("__all__", "__version__") for t in node.targets)
            assert is_docstring or is_import or is_listing, f"{path}:{node.lineno}"


# --- The extension protocol -------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class OutputDotCotangent(fnet.extensions.Extension):
    """Per leaf, <q_{i+1}, g_i(w_i; z_i)> broadcast to every entry of every param leaf:
    it reads the layer, its params, z_i and q_{i+1}, so a wrong one of them shows."""

    name = "output_dot_cotangent"

    def at_leaf(self, context):
        value = jnp.vdot(context.q, context.layer.apply(context.params, context.z))
        return jax.tree.map(lambda w: jnp.full(w.shape, value, w.dtype), context.params)


@dataclasses.dataclass(frozen=True)
class PerExampleCotangentNorm(fnet.extensions.Extension):
    """Per leaf and example b, ||q_{i+1}[b]||^2 on every param entry: a batched result."""

    name = "per_example_cotangent_norm"
    batched = True

    def at_leaf(self, context):
        norms = jnp.sum(context.q.reshape(context.q.shape[0], -1) ** 2, axis=1)
        return jax.tree.map(
            lambda w: jnp.broadcast_to(norms.reshape((-1,) + (1,) * w.ndim),
                                       (norms.shape[0],) + w.shape), context.params)


EXTENSIONS = (OutputDotCotangent(), PerExampleCotangentNorm())
BLOCK = fnet.chain(fnet.dense(4), fnet.tanh, fnet.residual(fnet.chain(fnet.dense(4), fnet.relu)))


def _unstack(tree, n, axis):
    return tuple(jax.tree.map(lambda a, k=k: jnp.take(a, k, axis=axis), tree) for k in range(n))


@pytest.mark.parametrize("remat", fnet.ad.REMAT_POLICIES)
def test_an_extension_sees_each_leafs_z_and_q_through_repeats_and_policies(remat):
    """chain(dense, repeat(BLOCK, 4), dense) against the unrolled chain, whose leaves are
    all top-level-reachable: the extension results agree copy by copy, jitted and eager."""
    n = 4
    net = fnet.chain(fnet.dense(4), fnet.repeat(BLOCK, n), fnet.dense(2))
    unrolled = fnet.chain(fnet.dense(4), fnet.chain(*[BLOCK] * n), fnet.dense(2))
    rng = np.random.default_rng(0)
    params, _ = random_params(net, (3,), rng)
    unrolled_params = (params[0], _unstack(params[1], n, 0), params[2])
    x = jnp.asarray(rng.standard_normal((5, 3)))
    y = jnp.asarray(rng.standard_normal((5, 2)))
    reference = fnet.backprop(unrolled, LOSS, unrolled_params, x, y, extensions=EXTENSIONS)
    for run in (jax.jit, lambda f: f):
        record = run(lambda p: fnet.backprop(net, LOSS, p, x, y, extensions=EXTENSIONS,
                                             remat=remat))(params)
        assert_close(record.grads[1], jax.tree.map(lambda *a: jnp.stack(a), *reference.grads[1]),
                     "grads")
        dot, norm = record.extensions["output_dot_cotangent"], record.extensions[
            "per_example_cotangent_norm"]
        ref_dot = reference.extensions["output_dot_cotangent"]
        ref_norm = reference.extensions["per_example_cotangent_norm"]
        assert_close((dot[0], dot[2]), (ref_dot[0], ref_dot[2]), "outer layers")
        assert_close(_unstack(dot[1], n, 0), ref_dot[1], f"copies ({remat})")
        assert_close(_unstack(norm[1], n, 1), ref_norm[1], f"batched copies ({remat})")
        assert jax.tree.leaves(norm[1])[0].shape[:2] == (5, n)


def test_the_extension_results_of_top_level_layers_use_the_notes_z_and_q():
    net = fnet.chain(fnet.dense(6), fnet.softplus, fnet.dense(2))
    rng = np.random.default_rng(1)
    params, _ = random_params(net, (3,), rng)
    x = jnp.asarray(rng.standard_normal((4, 3)))
    y = jnp.asarray(rng.standard_normal((4, 2)))
    record = fnet.backprop(net, LOSS, params, x, y, extensions=EXTENSIONS)
    for i in (0, 2):
        expected = jnp.vdot(record.cotangents[i + 1], record.activations[i + 1])
        for leaf in jax.tree.leaves(record.extensions["output_dot_cotangent"][i]):
            np.testing.assert_allclose(leaf, expected, rtol=1e-12)
    assert record.extensions["output_dot_cotangent"][1] == ()


def test_extensions_work_under_vmap_over_parameter_sets():
    net = fnet.chain(fnet.dense(3), fnet.repeat(fnet.chain(fnet.dense(3), fnet.sigmoid), 2),
                     fnet.dense(1))
    rng = np.random.default_rng(2)
    stacked = [random_params(net, (2,), rng)[0] for _ in range(3)]
    params = jax.tree.map(lambda *a: jnp.stack(a), *stacked)
    x = jnp.asarray(rng.standard_normal((4, 2)))
    y = jnp.asarray(rng.standard_normal((4, 1)))

    def run(p):
        return fnet.backprop(net, LOSS, p, x, y, extensions=EXTENSIONS).extensions

    batched = jax.jit(jax.vmap(run))(params)
    for k, one in enumerate(stacked):
        assert_close(jax.tree.map(lambda a, k=k: a[k], batched), run(one), f"param set {k}")


def test_asking_for_an_extension_twice_or_a_non_extension_is_refused():
    net = fnet.dense(1)
    params, _ = net.init(jax.random.key(0), (2,))
    x, y = jnp.ones((3, 2)), jnp.ones((3, 1))
    with pytest.raises(fnet.ArgumentError, match="once"):
        fnet.backprop(net, LOSS, params, x, y, extensions=EXTENSIONS + EXTENSIONS[:1])
    with pytest.raises(fnet.ArgumentError, match="extensions: must be"):
        fnet.backprop(net, LOSS, params, x, y, extensions=("batch_grad",))
