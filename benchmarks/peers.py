"""The full train step against its peers: funcnet, jax.value_and_grad, Equinox, Flax, PyTorch.

One train step = forward, backward, optax Adam(1e-3) update, for an MLP of dense + relu
hidden layers and a softmax cross-entropy on 10 classes, float32, on the CPU. Every
contender starts from the SAME weights (funcnet's init, copied into each library's
layout) and sees the same sequence of mini-batches, so their first-step losses agree
(a column of the table checks it). The contenders:

- funcnet: ``fnet.train_step(net, loss, optax.adam(1e-3))``: the hand-written backward
  pass, one ``jax.jit``, state donated;
- jax.value_and_grad: the same network as a plain function, ``jax.value_and_grad`` +
  optax in one ``jax.jit`` with params and optimizer state donated (the reference);
- equinox: a list of ``eqx.nn.Linear`` vmapped over the batch, ``eqx.filter_jit``
  (donating model and optimizer state) + optax;
- flax.linen: an ``nn.Dense`` stack, ``jax.jit`` of the step with params and optimizer
  state donated;
- flax.nnx: an ``nnx.List`` of ``nnx.Linear``, ``nnx.Optimizer`` and ``nnx.jit``
  (model and optimizer donated), the idiomatic NNX loop;
- torch (eager): ``nn.Sequential`` of ``nn.Linear`` / ``nn.ReLU``, ``F.cross_entropy``,
  ``torch.optim.Adam(lr=1e-3)``, ``torch.set_num_threads`` = the usable cores.

Equinox, Flax and PyTorch are the optional ``bench`` extra (``pip install -e '.[bench]'``);
a peer that cannot be imported is reported as *absent* (and its targets as not met), one
that fails while running as *error*, never silently dropped.

Method: per configuration, every contender is built and called once (the first call, which
compiles: compile time = first call - steady-state median), then all contenders, plus
XLA's own matmul of square float32 matrices and an optax Adam update alone, run
``--repeats`` interleaved rounds after ``--warmup`` untimed ones. In each round every
contender runs ``--block`` consecutive steps, each timed and blocking on its loss; the
first of each block, which absorbs the switch from the previous contender, is kept apart
(JSON only), the others are the samples, as in a training loop that runs the same step
back to back. The order of the contenders is drawn afresh every round: a fixed rotation
keeps each contender behind the same neighbour (measured here: always following the
2048 x 2048 matmul made funcnet's step 14 to 59% slower than the jax.value_and_grad one,
whose compiled program is the same). Reported: the median step time with its
interquartile range and minimum; each contender's ratio to funcnet (> 1: funcnet is
faster) as a ratio of medians and as a paired ratio (within each round, then the median
over rounds, robust to load that drifts between rounds); the achieved GFLOP/s (6 * batch
* sum(fan_in * fan_out) per step: the forward's matmul FLOPs times 3) as a fraction of the
XLA matmul peak measured in the same rounds, beside the bound that the Adam update alone
(memory-bound) puts on that fraction. A separate section measures XLA's and numpy's
matmul peaks side by side (how far XLA's CPU matmul stands from the best library matmul
here), and a tiny network (4 -> 4 -> 2, batch 1, where compute is negligible) gives the
per-step Python overhead of every contender.

Targets: funcnet <= 1.00x jax.value_and_grad on every configuration; funcnet's tiny step
under 0.1 ms; funcnet faster than Equinox, Flax (linen and NNX) and PyTorch eager on every
configuration; funcnet at >= 90% of XLA's matmul peak on the 784 -> 1024x4 configuration.

    python benchmarks/peers.py --help
    python benchmarks/peers.py --quick       # toy sizes, a few repeats (a smoke run)
    python benchmarks/peers.py               # the three configurations, 30 rounds of 3 steps
"""

from __future__ import annotations

import os

# Idle OpenMP threads (PyTorch's) sleep instead of spinning. Spinning threads, on cores
# shared with XLA's thread pool, other processes or a CPU quota, stall everyone: with the
# default policy a 2-thread torch step was measured 500x slower on a loaded 2-core machine.
# Set OMP_WAIT_POLICY yourself to override; the value used is recorded in the JSON.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import importlib
import math
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))

import funcnet as fnet  # noqa: E402
from _timing import (benchmark_parser, cost_flops, environment, save_results,  # noqa: E402
                     shuffled_times, summarize, table, target_row, targets_table)

NAME = "peers"
LEARNING_RATE = 1e-3
CLASSES = 10
FUNCNET = "funcnet"
REFERENCE = "jax.value_and_grad"
#: (name, module imported to tell whether it is installed)
PEERS = (("equinox", "equinox"), ("flax.linen", "flax.linen"), ("flax.nnx", "flax.nnx"),
         ("torch (eager)", "torch"))
CONTENDERS = (FUNCNET, REFERENCE) + tuple(name for name, _ in PEERS)
#: funcnet / jax.value_and_grad at most this; peers / funcnet above 1
REFERENCE_TARGET = 1.00
OVERHEAD_TARGET_MS = 0.1
PEAK_TARGET = 0.90
PEAK_CONFIG = "784"  # the configuration (its label starts so) whose peak fraction is a target
N_BATCHES = 4  # distinct mini-batches cycled through (no overfitting to one batch)


class Config(NamedTuple):
    label: str
    fan_in: int
    width: int
    depth: int
    batch: int

    def sizes(self) -> List[int]:
        return [self.fan_in] + [self.width] * self.depth + [CLASSES]

    def flops(self) -> float:
        """Matmul FLOPs of one train step: 3 x the forward's 2 * batch * fan_in * fan_out
        (forward, input cotangent and weight gradient)."""
        s = self.sizes()
        return 6.0 * self.batch * sum(a * b for a, b in zip(s[:-1], s[1:]))

    def n_params(self) -> int:
        s = self.sizes()
        return sum((a + 1) * b for a, b in zip(s[:-1], s[1:]))


CONFIGS = [Config("64->256x4->10, batch 128", 64, 256, 4, 128),
           Config("784->1024x4->10, batch 256", 784, 1024, 4, 256),
           Config("512->512x16->10, batch 64", 512, 512, 16, 64)]
QUICK_CONFIGS = [Config("16->32x2->10, batch 8", 16, 32, 2, 8),
                 Config("784->64x2->10, batch 16", 784, 64, 2, 16),
                 Config("32->32x4->10, batch 4", 32, 32, 4, 4)]
TINY = Config("tiny 4->4->2, batch 1 (overhead)", 4, 4, 1, 1)
TINY_CLASSES = 2


# --- the network, its weights and its batches ---------------------------------------------


def funcnet_net(config: Config, classes: int):
    layers = []
    for _ in range(config.depth):
        layers += [fnet.dense(config.width), fnet.relu]
    return fnet.chain(*layers, fnet.dense(classes))


def make_problem(config: Config, classes: int, seed: int):
    """(funcnet net, its params, [(w, b) numpy float32 per dense layer], batches as numpy)."""
    net = funcnet_net(config, classes)
    params, _ = net.init(jax.random.key(seed), (config.fan_in,))
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
    weights = [(np.asarray(p["w"]), np.asarray(p["b"])) for p in params if p != ()]
    rng = np.random.default_rng(seed + 1)
    batches = [(rng.standard_normal((config.batch, config.fan_in)).astype(np.float32),
                rng.integers(0, classes, config.batch).astype(np.int32))
               for _ in range(N_BATCHES)]
    return net, params, weights, batches


def _cycle(batches):
    """A callable giving the next batch, round robin."""
    state = {"i": -1}

    def next_batch():
        state["i"] = (state["i"] + 1) % len(batches)
        return batches[state["i"]]

    return next_batch


def jax_batches(batches):
    return [(jnp.asarray(x), jnp.asarray(y)) for x, y in batches]


def cross_entropy(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


# --- the contenders: each builder returns step() -> loss (blocked), one step per call -----


def build_funcnet(net, params, weights, batches):
    optimizer = optax.adam(LEARNING_RATE)
    step = fnet.train_step(net, fnet.losses.softmax_cross_entropy, optimizer)
    holder = {"state": fnet.init_train_state(params, optimizer)}
    next_batch = _cycle(jax_batches(batches))

    def call():
        holder["state"], loss = step(holder["state"], *next_batch())
        return loss.block_until_ready()

    x, y = jax_batches(batches)[0]
    call.lowered = lambda: step.lower(holder["state"], x, y)
    return call


def mlp_apply(params, x):
    for w, b in params[:-1]:
        x = jax.nn.relu(x @ w + b)
    w, b = params[-1]
    return x @ w + b


def build_reference(net, params, weights, batches):
    """The same network and step written as plain JAX: jax.value_and_grad + optax."""
    optimizer = optax.adam(LEARNING_RATE)
    p = [(jnp.asarray(w), jnp.asarray(b)) for w, b in weights]

    def step(p, opt_state, x, y):
        loss, grads = jax.value_and_grad(lambda p: cross_entropy(mlp_apply(p, x), y))(p)
        updates, opt_state = optimizer.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, loss

    step = jax.jit(step, donate_argnums=(0, 1))
    holder = {"p": p, "s": optimizer.init(p)}
    next_batch = _cycle(jax_batches(batches))

    def call():
        holder["p"], holder["s"], loss = step(holder["p"], holder["s"], *next_batch())
        return loss.block_until_ready()

    x, y = jax_batches(batches)[0]
    call.lowered = lambda: step.lower(holder["p"], holder["s"], x, y)
    return call


def build_equinox(net, params, weights, batches):
    import equinox as eqx

    keys = jax.random.split(jax.random.key(0), len(weights))
    layers = []
    for key, (w, b) in zip(keys, weights):
        linear = eqx.nn.Linear(w.shape[0], w.shape[1], key=key)
        linear = eqx.tree_at(lambda l: (l.weight, l.bias), linear,
                             (jnp.asarray(w.T), jnp.asarray(b)))  # eqx stores (out, in)
        layers.append(linear)

    def forward(layers, x):  # one example; vmapped over the batch below
        for layer in layers[:-1]:
            x = jax.nn.relu(layer(x))
        return layers[-1](x)

    def loss_fn(layers, x, y):
        return cross_entropy(jax.vmap(lambda e: forward(layers, e))(x), y)

    optimizer = optax.adam(LEARNING_RATE)

    @eqx.filter_jit(donate="all-except-first")
    def step(batch, layers, opt_state):
        x, y = batch
        loss, grads = eqx.filter_value_and_grad(loss_fn)(layers, x, y)
        updates, opt_state = optimizer.update(grads, opt_state, eqx.filter(layers, eqx.is_array))
        return eqx.apply_updates(layers, updates), opt_state, loss

    holder = {"m": layers, "s": optimizer.init(eqx.filter(layers, eqx.is_array))}
    next_batch = _cycle(jax_batches(batches))

    def call():
        holder["m"], holder["s"], loss = step(next_batch(), holder["m"], holder["s"])
        return loss.block_until_ready()

    return call


def build_linen(net, params, weights, batches):
    import flax.linen as nn

    widths = [w.shape[1] for w, _ in weights]

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            for width in widths[:-1]:
                x = nn.relu(nn.Dense(width)(x))
            return nn.Dense(widths[-1])(x)

    model = MLP()
    variables = {"params": {f"Dense_{i}": {"kernel": jnp.asarray(w), "bias": jnp.asarray(b)}
                            for i, (w, b) in enumerate(weights)}}
    x0 = jnp.asarray(batches[0][0])
    expected = jax.tree.map(jnp.shape, model.init(jax.random.key(0), x0))
    if jax.tree.map(jnp.shape, variables) != expected:
        raise RuntimeError(f"linen params layout changed: {expected}")
    optimizer = optax.adam(LEARNING_RATE)

    def step(variables, opt_state, x, y):
        loss, grads = jax.value_and_grad(lambda v: cross_entropy(model.apply(v, x), y))(variables)
        updates, opt_state = optimizer.update(grads, opt_state, variables)
        return optax.apply_updates(variables, updates), opt_state, loss

    step = jax.jit(step, donate_argnums=(0, 1))
    holder = {"v": variables, "s": optimizer.init(variables)}
    next_batch = _cycle(jax_batches(batches))

    def call():
        holder["v"], holder["s"], loss = step(holder["v"], holder["s"], *next_batch())
        return loss.block_until_ready()

    return call


def build_nnx(net, params, weights, batches):
    from flax import nnx

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.layers = nnx.List([nnx.Linear(w.shape[0], w.shape[1], rngs=rngs)
                                    for w, _ in weights])

        def __call__(self, x):
            for layer in self.layers[:-1]:
                x = nnx.relu(layer(x))
            return self.layers[-1](x)

    model = MLP(nnx.Rngs(0))
    for layer, (w, b) in zip(model.layers, weights):
        layer.kernel.value = jnp.asarray(w)
        layer.bias.value = jnp.asarray(b)
    optimizer = nnx.Optimizer(model, optax.adam(LEARNING_RATE), wrt=nnx.Param)

    @nnx.jit(donate_argnums=(0, 1))
    def step(model, optimizer, x, y):
        loss, grads = nnx.value_and_grad(lambda m: cross_entropy(m(x), y))(model)
        optimizer.update(model, grads)
        return loss

    next_batch = _cycle(jax_batches(batches))

    def call():
        return step(model, optimizer, *next_batch()).block_until_ready()

    return call


def build_torch(net, params, weights, batches, threads: int):
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    modules = []
    for w, b in weights:
        linear = torch.nn.Linear(w.shape[0], w.shape[1])
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(np.ascontiguousarray(w.T)))  # (out, in)
            linear.bias.copy_(torch.from_numpy(np.array(b)))
        modules += [linear, torch.nn.ReLU()]
    model = torch.nn.Sequential(*modules[:-1])
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    next_batch = _cycle([(torch.from_numpy(x), torch.from_numpy(y.astype(np.int64)))
                         for x, y in batches])

    def call():
        x, y = next_batch()
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return call


# --- peers that may be absent ---------------------------------------------------------------


def peer_status(module: str):
    """(status, detail): ("ok", version) when ``module`` imports, else ("absent", why)."""
    try:
        imported = importlib.import_module(module)
    except Exception as error:  # ImportError, or a broken install
        return "absent", f"not installed ({type(error).__name__}: {error}); pip install -e '.[bench]'"
    top = sys.modules.get(module.split(".")[0], imported)
    return "ok", str(getattr(top, "__version__", "?"))


def builders(threads: int) -> Dict[str, Callable]:
    return {FUNCNET: build_funcnet, REFERENCE: build_reference, "equinox": build_equinox,
            "flax.linen": build_linen, "flax.nnx": build_nnx,
            "torch (eager)": lambda *a: build_torch(*a, threads=threads)}


# --- timing ---------------------------------------------------------------------------------


def xla_matmul(n: int, seed: int = 0):
    a = jax.random.normal(jax.random.key(seed), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(seed + 1), (n, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    dot(a, b).block_until_ready()
    return lambda: dot(a, b).block_until_ready()


def adam_update_alone(weights):
    """One jitted optax Adam update of params shaped like the network's (grads fixed),
    params and state donated: the memory-bound part of a step that no matmul speeds up."""
    optimizer = optax.adam(LEARNING_RATE)
    params = [(jnp.asarray(w), jnp.asarray(b)) for w, b in weights]
    grads = jax.tree.map(lambda a: jnp.full_like(a, 1e-3), params)

    def update(params, opt_state, grads):
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    update = jax.jit(update, donate_argnums=(0, 1))
    holder = {"p": params, "s": optimizer.init(params)}

    def call():
        holder["p"], holder["s"] = update(holder["p"], holder["s"], grads)
        return jax.block_until_ready(holder["p"][0][0])

    call()
    return call


def numpy_matmul(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n, n)).astype(np.float32)
    b = rng.standard_normal((n, n)).astype(np.float32)
    return lambda: np.dot(a, b)


def matmul_gflops(n: int, seconds: float) -> float:
    return 2.0 * n ** 3 / seconds / 1e9


def _blas_threads(threads: Optional[int]):
    """A context limiting numpy's BLAS to ``threads`` (None: its default), via threadpoolctl
    when it is installed (it comes with scikit-learn); else a no-op."""
    import contextlib

    if threads is None:
        return contextlib.nullcontext()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=threads, user_api="blas")


def numpy_matmul_limited(n: int, threads: Optional[int]):
    matmul = numpy_matmul(n)

    def call():
        with _blas_threads(threads):
            return matmul()

    return call


def matmul_peaks(sizes: Sequence[int], repeats: int, warmup: int) -> List[Dict[str, Any]]:
    """XLA's jitted jnp.dot and numpy's np.dot of square float32 matrices, interleaved.

    numpy runs with its BLAS's default threads and with one thread (threadpoolctl): on a
    loaded machine a multi-threaded BLAS can lose most of its speed to threads waiting
    for each other, so the best of the two is numpy's peak.
    """
    fns = {}
    for n in sizes:
        fns[("xla", n)] = xla_matmul(n)
        fns[("numpy", n)] = numpy_matmul_limited(n, None)
        fns[("numpy 1 thread", n)] = numpy_matmul_limited(n, 1)
    times, _ = shuffled_times(fns, repeats=repeats, warmup=warmup, block=2)
    rows = []
    for n in sizes:
        xla = matmul_gflops(n, statistics.median(times[("xla", n)]))
        default = matmul_gflops(n, statistics.median(times[("numpy", n)]))
        single = matmul_gflops(n, statistics.median(times[("numpy 1 thread", n)]))
        best = max(default, single)
        rows.append({"n": n, "xla_gflops": xla, "numpy_gflops_default_threads": default,
                     "numpy_gflops_1_thread": single, "numpy_gflops": best,
                     "numpy_over_xla": best / xla})
    return rows


def _round_medians(samples: Sequence[float], per_round: int) -> List[float]:
    """The median of each round's samples (``per_round`` consecutive ones)."""
    return [statistics.median(samples[i:i + per_round])
            for i in range(0, len(samples) - per_round + 1, per_round)]


def run_config(config: Config, classes: int, names: Sequence[str], statuses, threads: int,
               peak_sizes: Sequence[int], repeats: int, warmup: int, seed: int, block: int):
    """One configuration: build every contender, time them interleaved; the rows."""
    net, params, weights, batches = make_problem(config, classes, seed)
    build = builders(threads)
    fns, rows, xla_flops = {}, {}, {}
    for name in names:
        status, detail = statuses[name]
        row = {"config": config.label, "library": name, "status": status, "detail": detail}
        rows[name] = row
        if status != "ok":
            continue
        try:
            call = build[name](net, params, weights, batches)
            start = time.perf_counter()
            loss = call()
            row["first_call_s"] = time.perf_counter() - start
            row["loss_step1"] = float(loss)
            if hasattr(call, "lowered"):  # XLA's cost analysis of the lowered (HLO) step
                xla_flops[name] = cost_flops(call.lowered())
            fns[name] = call
        except Exception as error:  # a peer whose API moved: say so, keep going
            row["status"] = "error"
            row["detail"] = f"{type(error).__name__}: {error}"
            traceback.print_exc()
    extra = {f"xla matmul {n}": xla_matmul(n) for n in peak_sizes}
    if peak_sizes:
        extra["adam update alone"] = adam_update_alone(weights)
    times, switches = shuffled_times({**fns, **extra}, repeats=repeats, warmup=warmup,
                                     seed=seed, block=block)
    in_round_peak = max((matmul_gflops(n, statistics.median(times[f"xla matmul {n}"]))
                         for n in peak_sizes), default=math.nan)
    flops = config.flops()
    adam_s = statistics.median(times["adam update alone"]) if peak_sizes else math.nan
    matmul_s = flops / (in_round_peak * 1e9)
    for name in fns:
        row = rows[name]
        stats = summarize(times[name])
        row.update({
            "step_ms": 1e3 * stats["median"], "step_ms_q1": 1e3 * stats["q1"],
            "step_ms_q3": 1e3 * stats["q3"], "samples_ms": [1e3 * t for t in times[name]],
            "first_of_block_ms": [1e3 * t for t in switches[name]],
            "compile_s": max(0.0, row["first_call_s"] - stats["median"]),
            "gflops": flops / stats["median"] / 1e9,
        })
        row["fraction_of_xla_peak"] = row["gflops"] / in_round_peak
        if name in xla_flops:
            row["xla_cost_flops"] = xla_flops[name]
    per_round = max(1, block - 1) if block > 1 else 1
    funcnet_rounds = _round_medians(times.get(FUNCNET, []), per_round)
    for name in fns:
        rows[name]["step_ms_min"] = 1e3 * min(times[name])
        # the ratio within each round (same load), then the median over rounds
        peer_rounds = _round_medians(times[name], per_round)
        rows[name]["paired_ratio_to_funcnet"] = (
            statistics.median(p / f for p, f in zip(peer_rounds, funcnet_rounds))
            if funcnet_rounds else math.nan)
    base = rows[FUNCNET].get("step_ms", math.nan)
    loss0 = rows[FUNCNET].get("loss_step1", math.nan)
    for row in rows.values():
        row["ratio_to_funcnet"] = row.get("step_ms", math.nan) / base
        row.setdefault("paired_ratio_to_funcnet", math.nan)
        row["loss_step1_diff"] = abs(row.get("loss_step1", math.nan) - loss0)
        row["iqr_ms"] = (f"{row['step_ms_q1']:.3g}-{row['step_ms_q3']:.3g}"
                         if "step_ms" in row else "")
    summary = {"config": config._asdict(), "label": config.label, "flops_per_step": flops,
               "xla_matmul_gflops_in_rounds": in_round_peak,
               "adam_update_alone_ms": 1e3 * adam_s,
               # a step's matmuls at XLA's peak plus the Adam update alone: the best step
               "peak_fraction_bound_with_adam": matmul_s / (matmul_s + adam_s),
               # XLA's cost analysis of the two lowered steps: the same program?
               "xla_flops_funcnet_over_reference": (xla_flops.get(FUNCNET, math.nan)
                                                    / xla_flops.get(REFERENCE, math.nan))}
    return list(rows.values()), summary


# --- reporting ------------------------------------------------------------------------------


def machine() -> Dict[str, Any]:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as handle:
            models = [line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")]
        cpu = models[0] if models else cpu
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {"cpu": cpu or platform.machine(), "cpu_count": os.cpu_count(), "usable_cores": usable,
            "jax_backend": jax.default_backend(), "platform": platform.platform(),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def machine_line(m: Dict[str, Any], load_end) -> str:
    load = m["load_average"]
    load_text = (f"; load average {load[0]:.1f} at start, {load_end[0]:.1f} at end "
                 f"(more than {m['usable_cores']} means other jobs shared the cores)"
                 if load and load_end else "")
    return (f"Machine: {m['cpu']}, {m['cpu_count']} CPUs ({m['usable_cores']} usable), "
            f"JAX backend {m['jax_backend']}{load_text}.")


def make_targets(rows, summaries, tiny_rows):
    targets = []
    by = {(r["config"], r["library"]): r for r in rows}
    for summary in summaries:
        label = summary["label"]
        ratio = by[label, FUNCNET].get("step_ms", math.nan) / by[label, REFERENCE].get("step_ms", math.nan)
        targets.append(target_row(f"{label}: funcnet / jax.value_and_grad step time", ratio,
                                  f"<= {REFERENCE_TARGET:.2f}", ratio <= REFERENCE_TARGET))
    tiny = {r["library"]: r for r in tiny_rows}
    overhead = tiny[FUNCNET].get("step_ms", math.nan)
    targets.append(target_row("funcnet step on the tiny net (Python overhead), ms", overhead,
                              f"< {OVERHEAD_TARGET_MS:g}", overhead < OVERHEAD_TARGET_MS))
    for summary in summaries:
        label = summary["label"]
        for peer, _ in PEERS:
            if (label, peer) not in by:  # not selected with --only
                continue
            row = by[label, peer]
            ratio = row["ratio_to_funcnet"]
            what = f"{label}: {peer} / funcnet step time"
            if row["status"] != "ok":
                what += f" ({row['status']})"
            targets.append(target_row(what, ratio, "> 1", row["status"] == "ok" and ratio > 1))
    for summary in summaries:
        if summary["label"].startswith(PEAK_CONFIG):
            fraction = by[summary["label"], FUNCNET].get("fraction_of_xla_peak", math.nan)
            targets.append(target_row(f"{summary['label']}: funcnet GFLOP/s / XLA matmul peak",
                                      fraction, f">= {PEAK_TARGET:.2f}", fraction >= PEAK_TARGET))
    return targets


COLUMNS = ["library", "status", "step_ms", "iqr_ms", "step_ms_min", "ratio_to_funcnet",
           "paired_ratio_to_funcnet", "compile_s", "gflops", "fraction_of_xla_peak", "loss_step1"]
HEADERS = ["library", "status", "step ms (median)", "IQR ms", "min ms", "time / funcnet",
           "paired ratio", "compile s", "GFLOP/s", "/ XLA peak", "loss at step 1"]


def report(results) -> str:
    lines = ["# Train step against peers (forward + backward + Adam, float32, CPU)", "",
             machine_line(results["machine"], results["load_average_end"]), "",
             "Median step time over {repeats} rounds after {warmup} warm-up rounds, each "
             "running every contender (in a random order) for {block} consecutive steps, "
             "the first left out (tiny net: {tiny_repeats} rounds of {tiny_block}); "
             "time / funcnet (ratio of medians; > 1: funcnet is faster) and paired ratio "
             "(the ratio within each round, then the median over rounds: robust to load "
             "that drifts between rounds); compile s = first call - median; "
             "GFLOP/s from 6 * batch * sum(fan_in * fan_out) per step, against the XLA "
             "matmul peak measured in the same rounds.".format(**results["settings"]), ""]
    for summary in results["configs"]:
        rows = [r for r in results["rows"] if r["config"] == summary["label"]]
        lines += [f"## {summary['label']}", "",
                  f"{summary['flops_per_step'] / 1e9:.3g} GFLOP per step; XLA matmul peak "
                  f"in these rounds: {summary['xla_matmul_gflops_in_rounds']:.3g} GFLOP/s; "
                  f"the Adam update alone (jitted optax, donated) takes "
                  f"{summary['adam_update_alone_ms']:.3g} ms, so a step whose matmuls ran at "
                  f"that peak would still reach at most "
                  f"{summary['peak_fraction_bound_with_adam']:.0%} of it; "
                  f"XLA's cost analysis, funcnet's step / jax.value_and_grad's: "
                  f"{summary['xla_flops_funcnet_over_reference']:.5f} FLOPs.", "",
                  table(rows, COLUMNS, HEADERS), ""]
    lines += ["## Per-step overhead: " + results["tiny"]["label"], "",
              table(results["tiny_rows"], ["library", "status", "step_ms", "iqr_ms",
                                           "step_ms_min", "ratio_to_funcnet",
                                           "paired_ratio_to_funcnet", "compile_s"],
                    ["library", "status", "step ms (median)", "IQR ms", "min ms",
                     "time / funcnet", "paired ratio", "compile s"]), ""]
    peaks = results["matmul_peaks"]
    best = max(peaks, key=lambda r: r["xla_gflops"])
    best_numpy = max(r["numpy_gflops"] for r in peaks)
    lines += ["## Matmul peaks (square float32, interleaved)", "",
              table(peaks, ["n", "xla_gflops", "numpy_gflops_default_threads",
                            "numpy_gflops_1_thread", "numpy_over_xla"],
                    ["n", "XLA jnp.dot GFLOP/s", "numpy np.dot GFLOP/s (default threads)",
                     "numpy, 1 thread", "best numpy / XLA"]), "",
              f"XLA's CPU matmul peak ({best['xla_gflops']:.3g} GFLOP/s) stands at "
              f"{best['xla_gflops'] / best_numpy:.2f}x the best library matmul on this machine "
              f"(numpy's, {best_numpy:.3g} GFLOP/s; numpy / XLA = "
              f"{best_numpy / best['xla_gflops']:.2f}): a fraction of XLA's peak is not a "
              f"fraction of the hardware's.", ""]
    absent = [r for r in results["rows"] + results["tiny_rows"] if r["status"] != "ok"]
    if absent:
        seen = {}
        for r in absent:
            seen.setdefault((r["library"], r["status"]), r["detail"])
        lines += ["Not measured: " + "; ".join(f"{lib} {status} ({detail})"
                                               for (lib, status), detail in seen.items()), ""]
    lines += ["## Targets", "", targets_table(results["targets"]), ""]
    return "\n".join(lines)


def main(argv=None):
    parser = benchmark_parser(__doc__, NAME)
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed interleaved rounds per configuration (default 30; 3 quick)")
    parser.add_argument("--block", type=int, default=None,
                        help="consecutive steps per contender and round, the first left out "
                             "(default 3; 2 quick; 50 on the tiny net)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed rounds after the first call (default 3; 1 quick)")
    parser.add_argument("--peak-sizes", type=int, nargs="+", default=None,
                        help="square matmul sizes for the XLA / numpy peak (default 1024 2048)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: the usable cores)")
    parser.add_argument("--only", nargs="+", choices=CONTENDERS, default=None,
                        help="time only these contenders (funcnet always included)")
    parser.add_argument("--quick", action="store_true",
                        help="toy configurations, 128/256 matmuls, few repeats (a smoke run)")
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed")
    args = parser.parse_args(argv)
    configs = QUICK_CONFIGS if args.quick else CONFIGS
    repeats = args.repeats or (3 if args.quick else 30)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    block = args.block or (2 if args.quick else 3)
    tiny_repeats, tiny_block = (5, 10) if args.quick else (20, 50)
    peak_sizes = args.peak_sizes or ([128, 256] if args.quick else [1024, 2048])
    m = machine()
    threads = args.threads or m["usable_cores"] or 1
    names = [n for n in CONTENDERS if args.only is None or n in args.only or n == FUNCNET]
    statuses = {FUNCNET: ("ok", fnet.__name__), REFERENCE: ("ok", jax.__version__)}
    for name, module in PEERS:
        if name in names:
            statuses[name] = peer_status(module)
    print(machine_line(m, None), flush=True)
    print("contenders: " + ", ".join(f"{n} ({statuses[n][0]})" for n in names), flush=True)

    peaks = matmul_peaks(peak_sizes, repeats=max(3, repeats // 5), warmup=1)
    rows, summaries = [], []
    for config in configs:
        start = time.perf_counter()
        config_rows, summary = run_config(config, CLASSES, names, statuses, threads, peak_sizes,
                                          repeats, warmup, args.seed, block)
        rows += config_rows
        summaries.append(summary)
        print(f"  {config.label}: " + ", ".join(
            f"{r['library']} {r['step_ms']:.3g} ms" if "step_ms" in r else f"{r['library']} {r['status']}"
            for r in config_rows) + f"  ({time.perf_counter() - start:.0f} s)", flush=True)
    tiny_rows, tiny = run_config(TINY, TINY_CLASSES, names, statuses, threads, [],
                                 tiny_repeats, 1, args.seed, tiny_block)
    for row in tiny_rows:
        row.pop("samples_ms", None)
        row.pop("first_of_block_ms", None)

    results = {
        "benchmark": NAME,
        "settings": {"repeats": repeats, "warmup": warmup, "block": block,
                     "tiny_repeats": tiny_repeats, "tiny_block": tiny_block,
                     "peak_sizes": peak_sizes,
                     "threads_torch": threads, "quick": args.quick, "seed": args.seed,
                     "learning_rate": LEARNING_RATE, "optimizer": "adam", "dtype": "float32",
                     "batches_cycled": N_BATCHES,
                     "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY")},
        "environment": environment(),
        "machine": m,
        "versions": {n: statuses[n][1] for n in names if statuses[n][0] == "ok"},
        "matmul_peaks": peaks,
        "configs": summaries,
        "rows": rows,
        "tiny": tiny,
        "tiny_rows": tiny_rows,
    }
    results["targets"] = make_targets(rows, summaries, tiny_rows)
    results["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    text = report(results)
    print()
    print(text)
    save_results(NAME, args.results, results, markdown=text)
    return results


if __name__ == "__main__":
    main()
