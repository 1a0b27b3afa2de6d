"""Curvature: funcnet's diag_ggn, kflr and hvp against the gradient, BackPACK, a ggn_vp
loop, jax.jvp(jax.grad) and kfac-jax.

What is measured, float32 on the CPU, for an MLP 784 -> 256 -> relu -> 256 -> relu -> 10
at batch 128 and for the CNN of benchmarks/peers.py and benchmarks/extensions.py (28 x 28
x 1 inputs, batch 128: conv(16, 3) -> relu -> max_pool(2) -> conv(32, 3) -> relu ->
max_pool(2) -> flatten -> dense(10)), with a softmax cross-entropy on C = 10 classes with
integer labels, every contender on the SAME weights and batch (funcnet's params copied into
PyTorch's layout by benchmarks/extensions.py's helpers: Linear (out, in), Conv2d OIHW on a
channels-first copy of the batch, the rows of the dense after flatten permuted):

- the GGN diagonal: ``fnet.backprop`` with ``extensions=(fnet.extensions.diag_ggn(),)``
  (one walk carrying a C-column square root of the loss Hessian) against BackPACK's
  ``DiagGGNExact`` and against the matrix-free way, one ``fnet.ggn_vp`` product per
  parameter with a unit vector, (G e_i)_i: only feasible on a subset, so ``--directions``
  (64) products with unit vectors spread over all P parameters run, ``jax.vmap`` over
  chunks of 16 dispatched one after the other, and their time is EXTRAPOLATED to P
  products (x P / directions; labelled so);
- the Kronecker factors: ``fnet.backprop`` with ``fnet.extensions.kflr()`` against
  BackPACK's ``KFLR`` and kfac-jax's exact-GGN factors. On the CNN funcnet's kflr has
  factors for the dense layer only (None for conv layers), so BackPACK's KFLR is extended
  on the modules from the first Linear on (the dense layer alone there: the same work);
  BackPACK's KFLR of the whole CNN, conv factors too, is timed beside it for information;
- Hessian-vector products: ``fnet.hvp`` against ``jax.jvp(jax.grad(loss))`` of the plain
  forward pass (both jitted), in one random direction;
- baselines: the plain gradient ``fnet.value_and_grad`` (every "/ gradient" ratio is
  over it) and a plain PyTorch backward.

Every JAX contender is one jitted, ahead-of-time compiled executable; PyTorch and BackPACK
run eagerly with ``torch.set_num_threads`` = the usable cores. All contenders of a
configuration run side by side in one process: ``--repeats`` interleaved rounds (every
contender once per round, in a fresh random order) after ``--warmup`` untimed ones; the
median is reported with its interquartile range, each contender over the gradient and
over the funcnet contender computing the same thing (> 1: funcnet is faster), also as a
paired ratio (within each round, then the median). Memory: XLA's ``memory_analysis()``
temporary bytes of every compiled JAX contender. A contender other than funcnet's own
whose first call takes over ``--slow-seconds`` (10 s) is timed apart, in 3 runs after the
rounds (no paired ratio): the ggn_vp loop on the CNN, about 20 s a call here.

Correctness, checked before timing (max |a - b| / max |b|, float32): funcnet's diag_ggn
against a plain-JAX reference (per example: ``jax.vjp`` of the network at the C columns of
a square root of ``jax.hessian`` of the loss at the logits, by ``eigh``; squares summed,
mean over the batch), the ggn_vp unit-vector entries against the same reference, funcnet's
kflr factors against plain-JAX ones (A = mean_b [z_b; 1][z_b; 1]^T from the layer inputs,
G = mean_b J_b^T H_b J_b with J_b = ``jax.jacfwd`` of the rest of the network), fnet.hvp
against jax.jvp(jax.grad), the gradients against ``jax.grad``; then BackPACK's numbers
against funcnet's. BackPACK's conventions: ``diag_ggn_exact`` is the diagonal of the
batch-mean loss's GGN, funcnet's diag_ggn as it is (the 1/B is in BackPACK's square root of
the mean loss's Hessian, H_b / B = (S_b / sqrt(B))(S_b / sqrt(B))^T); ``weight.kflr`` is
[G, A_w] with G = sum_b (S_b / sqrt(B))(S_b / sqrt(B))^T = mean_b S_b S_b^T (funcnet's G)
and A_w = mean_b z_b z_b^T, the fan_in x fan_in block of funcnet's A, in PyTorch's weight
layout (out, in), so its weight block is kron(G, A_w); ``bias.kflr`` is [G]. funcnet
factors the matrix [w; b] (fan_in + 1, out) flattened row-major, block kron(A, G), whose A
carries the bias row [mean_b z_b; 1] that BackPACK has no counterpart for (checked against
the plain-JAX A only). On the CNN, A's rows and columns are in the channels-last flatten
order, BackPACK's in the channels-first one: permuted before comparing.

Targets (C = 10 classes): fnet diag_ggn and fnet kflr each <= (C + 2) x the gradient;
both faster than BackPACK's (BackPACK / funcnet > 1; on the CNN against BackPACK's KFLR of
the dense layer); fnet.hvp <= 1.2 x jax.jvp(jax.grad); the temporary memory of the
compiled diag_ggn backprop <= C x that of the plain step. Stated for the full sizes.

PyTorch and BackPACK are the optional ``bench`` extra (``pip install -e '.[bench]'``);
kfac-jax is tried by import (``pip install kfac-jax``); a peer that cannot be imported is
reported as *absent* (its targets not met), one that fails while running as *error*.

On a GPU (JAX's default backend) the same script runs the JAX contenders on the GPU, and
PyTorch and BackPACK too when PyTorch sees CUDA (else on the CPU; ``benchmarks/peers.py``'s
``torch_device``): model and batch moved there once, outside the timed calls, each call
waiting for the GPU before the timer reads the clock; ``settings.torch_device`` in the
JSON and the report say where PyTorch ran.

    python benchmarks/curvature.py --help
    python benchmarks/curvature.py --quick          # toy sizes, a few repeats (a smoke run)
    python benchmarks/curvature.py                  # the MLP and the CNN at batch 128
    python benchmarks/curvature.py --configs mlp --batch 32 --hidden 64   # smaller
"""

from __future__ import annotations

import os

# Idle OpenMP threads (PyTorch's) sleep instead of spinning on cores shared with XLA's
# thread pool (see benchmarks/peers.py); the value used is recorded in the JSON.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import importlib  # noqa: E402
import importlib.metadata  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable, Dict, List, NamedTuple  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

import funcnet as fnet  # noqa: E402
from _timing import (benchmark_parser, blocking, environment, max_rel_diff,  # noqa: E402
                     memory_stats, mib, save_results, summarize, table,
                     target_row, targets_table)
from extensions import (_compile, _failed, _to_numpy, add_statistics, time_contenders,  # noqa: E402
                        cross_entropy, library_status, make_problem, torch_batch)
from peers import (CLASSES, CNN_CONFIG, QUICK_CNN_CONFIG, CNNConfig, Config,  # noqa: E402
                   backend_label, chw_to_hwc_rows, machine, machine_line, torch_blocking,
                   torch_device)

NAME = "curvature"
CHECK_TOL = 1e-3  # float32: a correctness check passes below this relative difference
TIME_TARGET = CLASSES + 2  # fnet diag_ggn, kflr / fnet value_and_grad at most (C + 2)
HVP_TARGET = 1.2  # fnet.hvp / jax.jvp(jax.grad) at most
MEMORY_TARGET = CLASSES  # fnet diag_ggn temp / fnet value_and_grad temp at most
DIRECTIONS = 64  # unit-vector ggn_vp products timed (then extrapolated to P)
LOOP_CHUNK = 16  # ... vmapped in chunks of this many, one call per chunk (bounded memory)
SLOW_SECONDS = 10.0  # a contender whose first call takes longer is timed apart ...
SLOW_REPEATS = 3  # ... in this many runs (the ggn_vp loop on the CNN)

MLP_FAN_IN, MLP_HIDDEN, MLP_DEPTH, BATCH = 784, 256, 2, 128
QUICK_FAN_IN, QUICK_HIDDEN, QUICK_BATCH, QUICK_DIRECTIONS = 32, 16, 8, 8
KINDS = ("mlp", "cnn")


class Contender(NamedTuple):
    name: str
    library: str  # funcnet, jax, torch, backpack, kfac-jax
    job: str  # plain, diag_ggn, kflr, hvp
    description: str


FN_GRAD = "fnet value_and_grad"
TORCH_PLAIN = "torch backward"
FN_DIAG = "fnet backprop diag_ggn"
BP_DIAG = "backpack DiagGGNExact"
LOOP_DIAG = "ggn_vp x unit vectors (extrapolated)"
FN_KFLR = "fnet backprop kflr"
BP_KFLR = "backpack KFLR"
BP_KFLR_ALL = "backpack KFLR, conv layers too"
KFAC_JAX = "kfac-jax exact-GGN factors"
FN_HVP = "fnet.hvp"
JAX_HVP = "jax.jvp(jax.grad)"

COUNTERPART = {"plain": FN_GRAD, "diag_ggn": FN_DIAG, "kflr": FN_KFLR, "hvp": FN_HVP}

CONTENDERS = [
    Contender(FN_GRAD, "funcnet", "plain", "fnet.value_and_grad (the plain gradient)"),
    Contender(TORCH_PLAIN, "torch", "plain", "PyTorch: forward, loss.backward()"),
    Contender(FN_DIAG, "funcnet", "diag_ggn",
              "fnet.backprop(..., extensions=(fnet.extensions.diag_ggn(),)): value, grads, "
              "diag(G)"),
    Contender(BP_DIAG, "backpack", "diag_ggn", "BackPACK: backward with DiagGGNExact()"),
    Contender(LOOP_DIAG, "funcnet", "diag_ggn",
              f"fnet.ggn_vp with unit vectors e_i (jax.vmap over chunks of {LOOP_CHUNK}, "
              f"one call per chunk), entry i of each G e_i; the time of --directions products "
              f"x P / directions (EXTRAPOLATED to all P)"),
    Contender(FN_KFLR, "funcnet", "kflr",
              "fnet.backprop(..., extensions=(fnet.extensions.kflr(),)): value, grads, "
              "(A, G) per dense layer"),
    Contender(BP_KFLR, "backpack", "kflr",
              "BackPACK: backward with KFLR(), modules from the first Linear on extended "
              "(the MLP: all; the CNN: the dense layer, as funcnet)"),
    Contender(BP_KFLR_ALL, "backpack", "kflr",
              "BackPACK: backward with KFLR() on the whole CNN, conv factors too "
              "(information; the CNN only)"),
    Contender(KFAC_JAX, "kfac-jax", "kflr",
              "kfac-jax's curvature estimate with exact GGN Kronecker factors"),
    Contender(FN_HVP, "funcnet", "hvp", "fnet.hvp: jax.jvp of funcnet's hand-written gradient"),
    Contender(JAX_HVP, "jax", "hvp",
              "jax.jvp(jax.grad(loss)) of the plain forward pass (net.apply + optax loss)"),
]
BY_NAME = {c.name: c for c in CONTENDERS}
KIND_CONTENDERS = {"mlp": [c.name for c in CONTENDERS if c.name != BP_KFLR_ALL],
                   "cnn": [c.name for c in CONTENDERS]}
KFAC_JAX_HINT = "pip install kfac-jax"


def statuses_of(libraries) -> Dict[str, Any]:
    """(status, detail) of every library: extensions.library_status, kfac-jax tried here."""
    out = {}
    for library in libraries:
        if library != "kfac-jax":
            out[library] = library_status(library)
            continue
        try:
            importlib.import_module("kfac_jax")
        except Exception as error:  # ImportError, or an install broken by this JAX
            out[library] = ("absent", f"not installed or incompatible ({type(error).__name__}: "
                                      f"{error}); {KFAC_JAX_HINT}")
        else:
            # No adapter: kfac-jax could not be imported beside this JAX when this benchmark
            # was written, so none could be checked against funcnet. Say so, never guess.
            out[library] = ("not run", "kfac-jax imports, but this benchmark has no checked "
                                       "adapter for it yet")
    return out


# --- the configurations ---------------------------------------------------------------------


def configurations(kinds, quick: bool, batch=None, hidden=None):
    """The MLP and the CNN (full or ``quick`` sizes), ``batch`` / ``hidden`` overriding."""
    configs = []
    for kind in kinds:
        if kind == "mlp":
            fan_in = QUICK_FAN_IN if quick else MLP_FAN_IN
            width = hidden or (QUICK_HIDDEN if quick else MLP_HIDDEN)
            b = batch or (QUICK_BATCH if quick else BATCH)
            configs.append(Config(f"MLP {fan_in}->{width}x{MLP_DEPTH}->{CLASSES}, batch {b}",
                                  fan_in, width, MLP_DEPTH, b))
        else:
            base = QUICK_CNN_CONFIG if quick else CNN_CONFIG
            if batch:
                base = CNNConfig(base.label.rsplit(", batch", 1)[0] + f", batch {batch}",
                                 base.size, base.channels, base.kernel, batch)
            configs.append(base)
    return configs


# --- the JAX contenders and references ------------------------------------------------------


def funcnet_functions(net):
    loss = fnet.losses.softmax_cross_entropy

    def with_extension(extension):
        def backprop_fn(params, x, y):
            record = fnet.backprop(net, loss, params, x, y, extensions=(extension,))
            return record.value, record.grads, record.extensions[extension.name]

        return backprop_fn

    hvp = fnet.hvp(net, loss)
    return {FN_GRAD: fnet.value_and_grad(net, loss),
            FN_DIAG: with_extension(fnet.extensions.diag_ggn()),
            FN_KFLR: with_extension(fnet.extensions.kflr()),
            FN_HVP: lambda params, x, y, v: hvp(params, x, y, v)}


def plain_loss(net):
    return lambda params, x, y: cross_entropy(net.apply(params, x), y)


def jax_hvp(net):
    """H v by forward-over-reverse of the plain forward pass: jax.jvp(jax.grad(loss))."""
    grad = jax.grad(plain_loss(net))

    def hvp_fn(params, x, y, v):
        return jax.jvp(lambda w: grad(w, x, y), (params,), (v,))[1]

    return hvp_fn


def unit_vector_diag(net, params):
    """``f(params, x, y, indices) -> (G e_i)_i`` for every flat index i (ravel_pytree order),
    one fnet.ggn_vp per unit vector, jax.vmap over them. The benchmark calls it on chunks
    of ``LOOP_CHUNK`` indices: all 64 at once take 4.5 GB of temporaries on the CNN, and
    ``jax.lax.map(..., batch_size=16)`` (a while loop over vmapped chunks) ran 11x slower
    than the same 16 products vmapped, on XLA's CPU backend."""
    ggn_vp = fnet.ggn_vp(net, fnet.losses.softmax_cross_entropy)
    flat, unravel = ravel_pytree(params)
    size = flat.shape[0]

    def diag_entries(params, x, y, indices):
        def one(i):
            v = unravel(jnp.zeros((size,), flat.dtype).at[i].set(1.0))
            return ravel_pytree(ggn_vp(params, x, y, v))[0][i]

        return jax.vmap(one)(indices)

    return diag_entries


def _loss_root(out_b, y_b):
    """A square root S (C, C) of the Hessian of one example's loss at its logits, H = S S^T,
    from jax.hessian and eigh (negative rounding eigenvalues clipped to 0)."""
    hessian = jax.hessian(lambda o: cross_entropy(o[None], y_b[None]))(out_b)
    eigenvalues, vectors = jnp.linalg.eigh(hessian)
    return vectors * jnp.sqrt(jnp.clip(eigenvalues, 0.0))


def reference_diag_ggn(net):
    """diag(G) in plain JAX: per example b (lax.scan), jax.vjp of the network at the C
    columns of S_b; the squares summed over columns and examples, / B."""

    def diag_fn(params, x, y):
        def one(total, example):
            x_b, y_b = example
            out, pullback = jax.vjp(lambda p: net.apply(p, x_b[None])[0], params)
            columns = jax.vmap(lambda s: pullback(s)[0])(_loss_root(out, y_b).T)
            return jax.tree.map(lambda t, c: t + jnp.sum(jnp.square(c), axis=0),
                                total, columns), None

        total, _ = jax.lax.scan(one, jax.tree.map(jnp.zeros_like, params), (x, y))
        return jax.tree.map(lambda t: t / x.shape[0], total)

    return diag_fn


def dense_slots(net, params, x_shape):
    """Indices of the top-level dense layers with vector inputs (where kflr has factors)."""
    slots, shape = [], jax.ShapeDtypeStruct(x_shape, jnp.float32)
    for index, (layer, p) in enumerate(zip(net.layers, params)):
        if isinstance(p, dict) and "w" in p and p["w"].ndim == 2 and len(shape.shape) == 2:
            slots.append(index)
        shape = jax.eval_shape(layer.apply, p, shape)
    return slots


def reference_kflr(net, slots):
    """{slot: (A, G)} in plain JAX: A = mean_b [z_b; 1][z_b; 1]^T from the layer's input,
    G = mean_b J_b^T H_b J_b with J_b = jax.jacfwd of the rest of the network at the
    layer's output and H_b = S_b S_b^T (:func:`_loss_root`)."""

    def kflr_fn(params, x, y):
        factors, z = {}, x
        for index, layer in enumerate(net.layers):
            if index in slots:
                rest = fnet.chain(*net.layers[index + 1:])
                rest_params = params[index + 1:]
                o = layer.apply(params[index], z)

                def ggn(o_b, y_b, rest=rest, rest_params=rest_params):
                    def tail(u):
                        return rest.apply(rest_params, u[None])[0]

                    js = jax.jacfwd(tail)(o_b).T @ _loss_root(tail(o_b), y_b)  # (out, C)
                    return js @ js.T

                g = jnp.mean(jax.vmap(ggn)(o, y), axis=0)
                zbar = jnp.concatenate([z, jnp.ones((z.shape[0], 1), z.dtype)], axis=1)
                factors[index] = (zbar.T @ zbar / z.shape[0], g)
            z = layer.apply(params[index], z)
        return factors

    return kflr_fn


# --- the PyTorch contenders -----------------------------------------------------------------


def _extend_from_first_linear(model):
    """BackPACK's hooks on the modules from the first Linear on (they are all the model for
    the MLP, the final dense layer for the CNN): KFLR of the dense layers only."""
    import torch
    from backpack import extend

    modules = list(model)
    first = next(i for i, m in enumerate(modules) if isinstance(m, torch.nn.Linear))
    for module in modules[first:]:
        extend(module)
    return model


def build_torch(name, problem):
    """(call, outputs) of a PyTorch / BackPACK contender on :func:`peers.torch_device`:
    call runs one forward and backward, outputs() reads what the checks compare (numpy,
    PyTorch's layouts)."""
    import torch
    import torch.nn.functional as F

    x, y = torch_batch(problem.torch_x, problem.y_np)
    model = problem.torch_model()
    if name == TORCH_PLAIN:
        def call():
            model.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss.detach()

        return call, lambda: {"grads": [p.grad for p in model.parameters()]}

    from backpack import backpack, extend
    from backpack import extensions as bpx

    if name == BP_DIAG:
        model, extension, attribute = extend(model), bpx.DiagGGNExact, "diag_ggn_exact"
    elif name == BP_KFLR:
        model, extension, attribute = _extend_from_first_linear(model), bpx.KFLR, "kflr"
    elif name == BP_KFLR_ALL:
        model, extension, attribute = extend(model), bpx.KFLR, "kflr"
    else:
        raise KeyError(name)
    lossfunc = extend(torch.nn.CrossEntropyLoss())  # the batch mean, like funcnet's loss

    def call():
        model.zero_grad(set_to_none=True)
        loss = lossfunc(model(x), y)
        # a fresh extension object every call: BackPACK keeps the quantities backpropagated
        # to a module's input in the object, keyed by the input's data_ptr(), and with only
        # the dense layer extended (BP_KFLR on the CNN) nothing below consumes the one at
        # its input; a reused object finds it again on a later call whose input lands at
        # the same address, and raises "No accumulation rule for backpropagated info"
        with backpack(extension()):
            loss.backward()
        return loss.detach()

    def outputs():
        params = list(model.parameters())
        return {"grads": [p.grad for p in params],
                attribute: [getattr(p, attribute, None) for p in params],
                "linear": [isinstance(m, torch.nn.Linear) for m in model
                           for _ in m.parameters()]}

    return call, outputs


def _numpy_outputs(value):
    """PyTorch tensors (nested in lists and dicts) as numpy copies; None stays None."""
    if isinstance(value, dict):
        return {k: _numpy_outputs(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_numpy_outputs(v) for v in value]
    if hasattr(value, "detach"):
        return value.detach().cpu().numpy().copy()
    return value


# --- one configuration ----------------------------------------------------------------------


def run_config(config, statuses, repeats: int, warmup: int, seed: int, directions: int,
               slow_seconds: float = math.inf):
    """Build, check and time every contender of one configuration; (rows, summary)."""
    problem = make_problem(config, seed)
    net, params, x, y = problem.net, problem.params, problem.x, problem.y
    names = KIND_CONTENDERS[config.kind]
    rows: Dict[str, Dict[str, Any]] = {}
    for name in names:
        c = BY_NAME[name]
        status, detail = statuses[c.library]
        rows[name] = {"config": config.label, "contender": name, "library": c.library,
                      "job": c.job, "description": c.description, "status": status,
                      "detail": detail}

    flat = ravel_pytree(params)[0]
    n_params = int(flat.shape[0])
    directions = max(1, min(directions, n_params))
    indices_np = np.unique(np.linspace(0, n_params - 1, directions).round().astype(np.int32))
    chunk = min(LOOP_CHUNK, indices_np.size)
    indices_np = indices_np[:indices_np.size // chunk * chunk]  # whole chunks
    directions = int(indices_np.size)
    chunks = [jax.device_put(c) for c in indices_np.reshape(-1, chunk)]
    v = jax.device_put(jax.tree.map(
        lambda a: np.random.default_rng(seed + 3).standard_normal(a.shape).astype(np.float32),
        _to_numpy(params)))
    slots = dense_slots(net, params, x.shape)

    # the plain-JAX references, computed once (not timed)
    start = time.perf_counter()
    diag_fn, kflr_fn, grad_fn = (reference_diag_ggn(net), reference_kflr(net, slots),
                                 jax.grad(plain_loss(net)))
    reference = _to_numpy(jax.jit(lambda p, x, y: {  # one executable: one compile
        "diag_ggn": diag_fn(p, x, y), "kflr": kflr_fn(p, x, y), "grads": grad_fn(p, x, y)})(
            params, x, y))
    print(f"    plain-JAX references in {time.perf_counter() - start:.1f} s", flush=True)

    jax_fns: Dict[str, Any] = dict(funcnet_functions(net))
    jax_fns[JAX_HVP] = jax_hvp(net)
    jax_fns[LOOP_DIAG] = unit_vector_diag(net, params)
    arguments = {FN_HVP: (params, x, y, v), JAX_HVP: (params, x, y, v),
                 LOOP_DIAG: (params, x, y, chunks[0])}

    calls: Dict[str, Callable[[], Any]] = {}
    outputs: Dict[str, Any] = {}
    for name in names:
        row = rows[name]
        if row["status"] != "ok":
            continue
        try:
            if name in jax_fns:
                args = arguments.get(name, (params, x, y))
                compiled, compile_s = _compile(jax_fns[name], *args)
                memory = memory_stats(compiled)
                row.update({"compile_s": compile_s, "temp_bytes": memory["temp_size_in_bytes"],
                            "temp_mib": mib(memory["temp_size_in_bytes"])})
                call = blocking(compiled, *args)
                if name == LOOP_DIAG:  # every chunk, dispatched one after the other
                    call = _chunked(compiled, params, x, y, chunks)
                start = time.perf_counter()
                outputs[name] = _to_numpy(call())
                row["first_call_s"] = time.perf_counter() - start
            else:
                call, read = build_torch(name, problem)
                call = torch_blocking(call, torch_device())
                start = time.perf_counter()
                call()
                row["first_call_s"] = time.perf_counter() - start
                outputs[name] = _numpy_outputs(read())
            calls[name] = call
            print(f"    {name}: " + (f"compiled in {row['compile_s']:.1f} s, "
                                     if "compile_s" in row else "")
                  + f"first call {row['first_call_s']:.2f} s", flush=True)
        except Exception as error:  # a peer whose API moved: say so, keep going
            _failed(row, error)

    checks = correctness(problem, outputs, reference, indices_np, slots)
    del reference, outputs

    times, slow = time_contenders(calls, rows, repeats, warmup, seed, slow_seconds,
                                  SLOW_REPEATS)
    scale = n_params / directions
    if LOOP_DIAG in times:  # the subset's times, extrapolated to all P unit vectors
        measured = summarize(times[LOOP_DIAG])
        rows[LOOP_DIAG].update({"directions": directions, "extrapolation_factor": scale,
                                "measured_ms": 1e3 * measured["median"],
                                "measured_samples_ms": [1e3 * t for t in times[LOOP_DIAG]]})
        times[LOOP_DIAG] = [t * scale for t in times[LOOP_DIAG]]
    add_statistics(rows, times, slow, FN_GRAD, lambda name: COUNTERPART[BY_NAME[name].job])
    summary = {"config": config._asdict(), "label": config.label, "kind": config.kind,
               "n_params": n_params, "directions": directions,
               "direction_indices": indices_np.tolist(), "loop_chunk": chunk,
               "extrapolation_factor": scale,
               "kflr_slots": slots, "checks": checks}
    return list(rows.values()), summary


def _chunked(compiled, params, x, y, chunks):
    """A zero-argument callable running ``compiled`` on every chunk of indices in turn,
    blocking until all are ready; the entries concatenated."""
    def call():
        return jnp.concatenate(jax.block_until_ready(
            [compiled(params, x, y, c) for c in chunks]))

    return call


# --- correctness ----------------------------------------------------------------------------


def _torch_to_funcnet(problem, arrays):
    return problem.to_funcnet(arrays)


def _kflr_pairs(problem, torch_kflr, linear_mask, slots):
    """BackPACK's KFLR lists, per Linear module ([G, A_w] for the weight, [G] for the
    bias), as {slot: (A_w, G_weight, G_bias)} in funcnet's row order: the CNN's dense
    after flatten has its A permuted from the channels-first to the channels-last order."""
    linear = [f for f, is_linear in zip(torch_kflr, linear_mask) if is_linear]
    pairs = {}
    final = problem.config.final_shape() if problem.config.kind == "cnn" else None
    for k, slot in enumerate(slots):
        (g_w, a_w), (g_b,) = linear[2 * k], linear[2 * k + 1]
        if final is not None and a_w.shape[0] == math.prod(final):
            a_w = chw_to_hwc_rows(chw_to_hwc_rows(a_w, final).T, final).T
        pairs[slot] = (a_w, g_w, g_b)
    return pairs


def correctness(problem, outputs, reference, indices, slots) -> Dict[str, float]:
    """Relative differences (max |a - b| / max |b|) of every result against its reference;
    NaN where a contender did not run (absent, error)."""
    checks: Dict[str, float] = {}
    o = outputs

    def check(label, fn, *needs):
        try:
            if not all(n in o for n in needs):
                raise KeyError(needs)
            checks[label] = float(fn())
        except KeyError:  # the contender did not run (absent, error)
            checks[label] = math.nan
        except Exception as error:
            checks[label] = math.nan
            print(f"check {label!r} failed: {type(error).__name__}: {error}", flush=True)

    def fn_kflr(slot, which):
        return o[FN_KFLR][2][slot][which]

    check("fnet value_and_grad grads vs jax.grad",
          lambda: max_rel_diff(o[FN_GRAD][1], reference["grads"]), FN_GRAD)
    check("fnet diag_ggn vs plain-JAX reference",
          lambda: max_rel_diff(o[FN_DIAG][2], reference["diag_ggn"]), FN_DIAG)
    check("fnet backprop diag_ggn grads vs jax.grad",
          lambda: max_rel_diff(o[FN_DIAG][1], reference["grads"]), FN_DIAG)
    check(f"ggn_vp unit vectors ({len(indices)} entries) vs plain-JAX reference",
          lambda: max_rel_diff(o[LOOP_DIAG],
                               ravel_pytree(reference["diag_ggn"])[0][indices]), LOOP_DIAG)
    check(f"ggn_vp unit vectors ({len(indices)} entries) vs fnet diag_ggn",
          lambda: max_rel_diff(o[LOOP_DIAG], ravel_pytree(o[FN_DIAG][2])[0][indices]),
          LOOP_DIAG, FN_DIAG)
    check("fnet kflr: None exactly outside the dense layers with vector inputs",
          lambda: float(sum((o[FN_KFLR][2][i] is None) == (i not in slots)
                            for i in range(len(o[FN_KFLR][2]))) != len(o[FN_KFLR][2])), FN_KFLR)
    check("fnet kflr A vs plain-JAX reference", lambda: max(
        max_rel_diff(fn_kflr(s, 0), reference["kflr"][s][0]) for s in slots), FN_KFLR)
    check("fnet kflr G vs plain-JAX reference", lambda: max(
        max_rel_diff(fn_kflr(s, 1), reference["kflr"][s][1]) for s in slots), FN_KFLR)
    check("fnet kflr grads vs jax.grad",
          lambda: max_rel_diff(o[FN_KFLR][1], reference["grads"]), FN_KFLR)
    check("fnet.hvp vs jax.jvp(jax.grad)", lambda: max_rel_diff(o[FN_HVP], o[JAX_HVP]),
          FN_HVP, JAX_HVP)

    # BackPACK against funcnet on the same weights (see the module docstring's conventions)
    check(f"{TORCH_PLAIN}: grads vs jax.grad", lambda: max_rel_diff(
        _torch_to_funcnet(problem, o[TORCH_PLAIN]["grads"]), reference["grads"]), TORCH_PLAIN)
    check(f"{BP_DIAG}: diag_ggn_exact vs fnet diag_ggn", lambda: max_rel_diff(
        _torch_to_funcnet(problem, o[BP_DIAG]["diag_ggn_exact"]), o[FN_DIAG][2]),
          BP_DIAG, FN_DIAG)
    for name in (BP_KFLR, BP_KFLR_ALL):
        if name not in BY_NAME or name not in KIND_CONTENDERS[problem.config.kind]:
            continue

        def pairs(name=name):
            return _kflr_pairs(problem, o[name]["kflr"], o[name]["linear"], slots)

        check(f"{name}: A (weight) vs fnet kflr A[:fan_in, :fan_in]", lambda pairs=pairs: max(
            max_rel_diff(a_w, fn_kflr(s, 0)[:-1, :-1]) for s, (a_w, _, _) in pairs().items()),
              name, FN_KFLR)
        check(f"{name}: G (weight) vs fnet kflr G", lambda pairs=pairs: max(
            max_rel_diff(g_w, fn_kflr(s, 1)) for s, (_, g_w, _) in pairs().items()),
              name, FN_KFLR)
        check(f"{name}: G (bias) vs fnet kflr G", lambda pairs=pairs: max(
            max_rel_diff(g_b, fn_kflr(s, 1)) for s, (_, _, g_b) in pairs().items()),
              name, FN_KFLR)
    return checks


# --- targets and report ---------------------------------------------------------------------


def make_targets(rows, summaries) -> List[Dict[str, Any]]:
    by = {(r["config"], r["contender"]): r for r in rows}
    targets = []
    for summary in summaries:
        label = summary["label"]

        def get(name, key="step_ms"):
            return by.get((label, name), {}).get(key, math.nan)

        for name, what in ((FN_DIAG, "diag_ggn"), (FN_KFLR, "kflr")):
            ratio = get(name) / get(FN_GRAD)
            targets.append(target_row(f"{label}: fnet {what} / fnet value_and_grad", ratio,
                                      f"<= {TIME_TARGET:g} (C + 2)", ratio <= TIME_TARGET))
        for name in (BP_DIAG, BP_KFLR):
            row = by[label, name]
            what = f"{label}: {name} / {row['counterpart']}"
            if row["status"] != "ok":
                what += f" ({row['status']})"
            ratio = row["over_funcnet"]
            targets.append(target_row(what, ratio, "> 1", row["status"] == "ok" and ratio > 1))
        ratio = get(FN_HVP) / get(JAX_HVP)
        targets.append(target_row(f"{label}: fnet.hvp / jax.jvp(jax.grad)", ratio,
                                  f"<= {HVP_TARGET:g}", ratio <= HVP_TARGET))
        ratio = get(FN_DIAG, "temp_bytes") / get(FN_GRAD, "temp_bytes")
        targets.append(target_row(f"{label}: temp memory, fnet diag_ggn backprop / fnet "
                                  f"value_and_grad", ratio, f"<= {MEMORY_TARGET:g} (C)",
                                  ratio <= MEMORY_TARGET))
    return targets


COLUMNS = ["contender", "status", "step_ms", "iqr_ms", "step_ms_min", "over_plain",
           "over_funcnet", "paired_over_funcnet", "temp_mib", "temp_over_plain", "compile_s"]
HEADERS = ["contender", "status", "ms (median)", "IQR ms", "min ms", "/ gradient",
           "/ its funcnet counterpart", "paired", "temp MiB", "temp / gradient", "compile s"]


def report(results) -> str:
    s = results["settings"]
    lines = ["# Curvature: funcnet's diag_ggn, kflr and hvp against the gradient, BackPACK, "
             "a ggn_vp loop, jax.jvp(jax.grad) and kfac-jax (float32, "
             f"{backend_label(results['machine'])})", "",
             machine_line(results["machine"], results["load_average_end"]), "",
             f"Median over {s['repeats']} interleaved rounds after {s['warmup']} warm-up "
             f"rounds (every contender once per round, in a random order); torch threads "
             f"{s['threads_torch']}, torch device {s['torch_device'] or 'n/a (not run)'}. "
             f"'/ gradient': over {FN_GRAD}. '/ its funcnet "
             f"counterpart': over the funcnet contender computing the same thing (diag(G): "
             f"{FN_DIAG}; Kronecker factors: {FN_KFLR}; H v: {FN_HVP}; plain: {FN_GRAD}); "
             f"> 1: funcnet is faster. 'paired': that ratio within each round, then the "
             f"median. temp MiB: XLA's memory_analysis() of the compiled JAX contender.", ""]
    for summary in results["configs"]:
        rows = [r for r in results["rows"] if r["config"] == summary["label"]]
        loop = next((r for r in rows if r["contender"] == LOOP_DIAG and "step_ms" in r), None)
        about = (f"P = {summary['n_params']} params; C = {CLASSES} classes; kflr factors at "
                 f"top-level layers {summary['kflr_slots']}.")
        if loop:
            about += (f" **{LOOP_DIAG}: EXTRAPOLATED** from {loop['directions']} unit-vector "
                      f"products (jax.vmap over chunks of {summary['loop_chunk']}, one call "
                      f"per chunk; temp MiB: one chunk's), measured "
                      f"{loop['measured_ms']:.3g} ms, x P / {loop['directions']} = "
                      f"{loop['extrapolation_factor']:.4g}.")
        lines += [f"## {summary['label']}", "", about, "", table(rows, COLUMNS, HEADERS), "",
                  table([{"check": k, "rel_diff": v,
                          "ok": (v < CHECK_TOL) if math.isfinite(v) else "n/a"}
                         for k, v in summary["checks"].items()],
                        ["check", "rel_diff", "ok"],
                        ["correctness check", "max |a - b| / max |b|",
                         f"< {CHECK_TOL:g}"]), ""]
    lines += ["BackPACK's conventions: diag_ggn_exact is funcnet's diag_ggn as it is (the 1/B "
              "of the batch mean sits in its square root of the loss Hessian); weight.kflr = "
              "[G, A_w] (G = mean_b S_b S_b^T, A_w = mean_b z_b z_b^T, the weight (out, in) "
              "block kron(G, A_w)), bias.kflr = [G]; funcnet's A is that of [w; b], "
              "(fan_in + 1)^2, whose last row and column (the bias) only the plain-JAX "
              "reference checks. On the CNN, funcnet's kflr has no conv factors (None): "
              f"{BP_KFLR} hooks the dense layer only; {BP_KFLR_ALL} (information, no target) "
              "computes the conv factors too.", ""]
    apart = [r for r in results["rows"] if r.get("timed_apart")]
    if apart:
        lines += ["Timed apart (not interleaved; no paired ratio): " + "; ".join(
            f"{r['config']}: {r['contender']} ({r['timed_apart']})" for r in apart), ""]
    absent = [r for r in results["rows"] if r["status"] != "ok"]
    if absent:
        seen = {}
        for r in absent:
            seen.setdefault((r["contender"], r["status"]), r["detail"])
        lines += ["Not measured: " + "; ".join(f"{name} {status} ({detail})"
                                               for (name, status), detail in seen.items()), ""]
    if s["quick"] or s["batch"] or s["hidden"]:
        lines += ["(Toy or overridden sizes: the targets are stated for the full sizes.)", ""]
    lines += ["## Targets", "", targets_table(results["targets"]), ""]
    return "\n".join(lines)


def main(argv=None):
    parser = benchmark_parser(__doc__, NAME)
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed interleaved rounds per configuration (default 15; 3 quick)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed rounds after the first call (default 2; 1 quick)")
    parser.add_argument("--configs", nargs="+", choices=KINDS, default=list(KINDS),
                        help="which configurations (default both): mlp, cnn")
    parser.add_argument("--batch", type=int, default=None,
                        help=f"the batch of every configuration (default {BATCH}; "
                             f"{QUICK_BATCH} quick)")
    parser.add_argument("--hidden", type=int, default=None,
                        help=f"the MLP's hidden width (default {MLP_HIDDEN}; {QUICK_HIDDEN} "
                             f"quick)")
    parser.add_argument("--directions", type=int, default=None,
                        help=f"unit-vector ggn_vp products timed, then extrapolated to all "
                             f"params (default {DIRECTIONS}; {QUICK_DIRECTIONS} quick)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: the usable cores)")
    parser.add_argument("--quick", action="store_true",
                        help=f"toy sizes (MLP {QUICK_FAN_IN}->{QUICK_HIDDEN}x{MLP_DEPTH}->"
                             f"{CLASSES}, the 8x8 CNN, batch {QUICK_BATCH}), few repeats")
    parser.add_argument("--slow-seconds", type=float, default=SLOW_SECONDS,
                        help=f"a contender (not funcnet's own) whose first call takes longer "
                             f"than this is timed apart, in {SLOW_REPEATS} runs after the "
                             f"interleaved rounds (default {SLOW_SECONDS:g})")
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed")
    args = parser.parse_args(argv)
    configs = configurations(args.configs, args.quick, args.batch, args.hidden)
    repeats = args.repeats or (3 if args.quick else 15)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    directions = args.directions or (QUICK_DIRECTIONS if args.quick else DIRECTIONS)
    m = machine()
    threads = args.threads or m["usable_cores"] or 1
    statuses = statuses_of(("funcnet", "jax", "torch", "backpack", "kfac-jax"))
    torch_on = None
    if statuses["torch"][0] == "ok":
        import torch

        torch.set_num_threads(threads)  # the CPU's threads: harmless when PyTorch runs on CUDA
        torch_on = str(torch_device())
    print(machine_line(m, None), flush=True)
    print("libraries: " + ", ".join(f"{lib} ({status}: {detail})"
                                    for lib, (status, detail) in statuses.items()), flush=True)

    rows, summaries = [], []
    for config in configs:
        start = time.perf_counter()
        print(f"\n  {config.label}", flush=True)
        config_rows, summary = run_config(config, statuses, repeats, warmup, args.seed,
                                          directions, args.slow_seconds)
        summary["seconds"] = time.perf_counter() - start
        rows += config_rows
        summaries.append(summary)
        print(f"  {config.label}: " + ", ".join(
            f"{r['contender']} {r['step_ms']:.3g} ms" if "step_ms" in r
            else f"{r['contender']} {r['status']}" for r in config_rows)
              + f"  ({summary['seconds']:.0f} s)", flush=True)

    results = {
        "benchmark": NAME,
        "settings": {"repeats": repeats, "warmup": warmup, "threads_torch": threads,
                     "torch_device": torch_on, "quick": args.quick, "batch": args.batch,
                     "hidden": args.hidden, "directions": directions, "loop_chunk": LOOP_CHUNK,
                     "slow_seconds": args.slow_seconds, "slow_repeats": SLOW_REPEATS,
                     "seed": args.seed, "dtype": "float32",
                     "classes": CLASSES, "check_tolerance": CHECK_TOL,
                     "time_target": TIME_TARGET, "hvp_target": HVP_TARGET,
                     "memory_target": MEMORY_TARGET,
                     "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY")},
        "environment": environment(),
        "machine": m,
        "libraries": {lib: {"status": status, "detail": detail}
                      for lib, (status, detail) in statuses.items()},
        "contenders": [c._asdict() for c in CONTENDERS],
        "configs": summaries,
        "rows": rows,
    }
    results["targets"] = make_targets(rows, summaries)
    results["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    text = report(results)
    print()
    print(text)
    save_results(NAME, args.results, results, markdown=text)
    return results


if __name__ == "__main__":
    main()
