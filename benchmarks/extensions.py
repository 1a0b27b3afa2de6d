"""Per-example gradient quantities: funcnet's one-walk extensions against vmap(jax.grad),
BackPACK, Opacus and jax-privacy.

What is measured, for MLPs of dense + relu hidden layers and for the CNN of
benchmarks/peers.py (28 x 28 x 1 inputs, batch 128: conv(16, 3) -> relu -> max_pool(2) ->
conv(32, 3) -> relu -> max_pool(2) -> flatten -> dense(10)), with a softmax cross-entropy
on 10 classes with integer labels, float32, on the CPU, every contender on the SAME weights
(funcnet's params, copied into PyTorch's layout: Linear (out, in), Conv2d OIHW on
channels-first inputs, the rows of the dense after flatten permuted) and the same batch:

- per-example gradient norms ||g_b|| (g_b: the gradient of example b's own loss):
  ``fnet.per_example_grad_norms`` (one backward walk, dense layers' ||z_b||^2 ||q_b||^2,
  no g_b formed) against the plain-JAX way, ``jax.vmap(jax.grad(example loss))`` and
  the norms of the per-example gradients, BackPACK's ``BatchL2Grad`` alone, and Opacus'
  per-sample gradients (``GradSampleModule``'s hooks, the norms of ``grad_sample``);
- the clipped mean gradient of DP-SGD, mean_b g_b min(1, C / ||g_b||) (before noise),
  with the clipping norm C = the median ||g_b|| of the batch (half the examples clipped):
  ``fnet.clipped_value_and_grad`` against a vmap clipped gradient (vmap grads, norms,
  clip, mean), Opacus (``GradSampleModule`` + ``DPOptimizer`` with noise_multiplier=0,
  the per-sample gradients that ``make_private`` sets up: forward, backward, pre_step),
  Opacus' ghost clipping (``GradSampleModuleFastGradientClipping``, norms without the
  per-sample gradients, a second backward) and jax-privacy's clipped gradient when it
  installs beside this JAX (``pip install jax-privacy --no-deps``);
- gradient statistics: ``fnet.backprop`` with ``batch_l2``, ``second_moment`` and
  ``variance`` (and with ``batch_grad`` too) against BackPACK with ``BatchL2Grad``,
  ``SumGradSquared``, ``Variance`` (and ``BatchGrad`` too), all in one backward;
- baselines: the plain step, ``fnet.value_and_grad`` and ``jax.value_and_grad``, and
  a plain PyTorch backward.

The MLPs run every job; the CNN the norms (funcnet, vmap, BackPACK, Opacus) and the
baselines.

Every JAX contender is one jitted, ahead-of-time compiled executable; the PyTorch ones run
eagerly with ``torch.set_num_threads`` = the usable cores. All contenders of a
configuration run side by side in one process: ``--repeats`` interleaved rounds (each
runs every contender once, in a fresh random order) after ``--warmup`` untimed ones; the
median is reported with its interquartile range, each contender's time over the plain
funcnet step, and each peer's time over the funcnet contender that computes the same thing
(> 1: funcnet is faster), also as a paired ratio (within each round, then the median).
A peer whose first call takes over ``--slow-seconds`` (20 s) is timed apart, in 2 runs
after the rounds: jax-privacy's at the full size, about a minute a call here, which sums
its clipped per-example gradients with ``jnp.sum(axis=0)``, a reduction over the leading
axis that XLA's CPU backend runs tens of times slower than the equivalent product with a
vector (``jnp.tensordot``), which the vmap reference uses.
Memory: XLA's ``memory_analysis()`` temporary bytes of every compiled JAX contender.
Correctness, checked before timing: funcnet's norms, clipped gradient and statistics
against the vmap reference, BackPACK's ``batch_l2`` (and ``sum_grad_squared``) against
funcnet's on the same weights, BackPACK's and Opacus' norms against the vmap reference,
Opacus' and jax-privacy's clipped gradients against the vmap reference, PyTorch's plain
gradients against jax.value_and_grad's (max |a - b| / max |b|).

Targets: per_example_grad_norms >= 20x faster than vmap(jax.grad) + norms on the MLPs,
>= 5x on the CNN; funcnet faster than BackPACK and Opacus on every configuration (the
CNN: their norms against funcnet's); on the MLPs, clipped_value_and_grad >= 5x faster
than the vmap clipped gradient and <= 2x the plain value_and_grad, backprop with
batch_l2, second_moment and variance <= 1.5x the plain value_and_grad, and the norms'
temporary memory <= 2x the plain step's. Targets are stated for the full sizes.

PyTorch, BackPACK and Opacus are the optional ``bench`` extra (``pip install -e
'.[bench]'``); a peer that cannot be imported is reported as *absent* (its targets not
met), one that fails while running as *error*, never silently dropped.

On a GPU (JAX's default backend) the same script runs the JAX contenders on the GPU, and
PyTorch, BackPACK and Opacus too when PyTorch sees CUDA (else on the CPU;
``benchmarks/peers.py``'s ``torch_device``): models and batch moved there once, outside
the timed calls, each call waiting for the GPU before the timer reads the clock;
``settings.torch_device`` in the JSON and the report say where PyTorch ran.

    python benchmarks/extensions.py --help
    python benchmarks/extensions.py --quick    # toy sizes, a few repeats (a smoke run)
    python benchmarks/extensions.py            # 784->1024x2->10 at batch 512,
                                               # 64->256x4->10 at batch 128 and the CNN
    python benchmarks/extensions.py --configs 2   # the CNN only
"""

from __future__ import annotations

import os

# Idle OpenMP threads (PyTorch's) sleep instead of spinning on cores shared with XLA's
# thread pool (see benchmarks/peers.py); the value used is recorded in the JSON.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import importlib  # noqa: E402
import importlib.metadata  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable, Dict, List, NamedTuple, Sequence  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

import funcnet as fnet  # noqa: E402
from _timing import (benchmark_parser, blocking, cost_flops, environment,  # noqa: E402
                     interleaved_times, max_rel_diff, memory_stats, mib,
                     numpy_normal, numpy_params, save_results, summarize, table,
                     target_row, targets_table)
from peers import (CLASSES, CNN_CONFIG, QUICK_CNN_CONFIG, Config, backend_label,  # noqa: E402
                   chw_to_hwc_rows, machine, machine_line, make_net, named_weights,
                   torch_blocking, torch_device, torch_inputs)
from peers import torch_model as peers_torch_model  # noqa: E402

NAME = "extensions"
CHECK_TOL = 1e-3  # float32: a correctness check passes below this relative difference

NORMS_TARGET = 20.0  # vmap norms / fnet norms at least (MLPs)
CNN_NORMS_TARGET = 5.0  # vmap norms / fnet norms at least (the CNN)
CLIPPED_TARGET = 5.0  # vmap clipped / fnet clipped at least
CLIPPED_PLAIN_TARGET = 2.0  # fnet clipped / fnet value_and_grad at most
EXT_PLAIN_TARGET = 1.5  # fnet backprop (3 extensions) / fnet value_and_grad at most
MEMORY_TARGET = 2.0  # fnet norms temp / fnet value_and_grad temp at most
SLOW_SECONDS = 20.0  # a peer whose first call takes longer is timed apart (--slow-seconds)
SLOW_REPEATS = 2  # ... in this many runs


CONFIGS = [Config("784->1024x2->10, batch 512", 784, 1024, 2, 512),
           Config("64->256x4->10, batch 128", 64, 256, 4, 128),
           CNN_CONFIG]
QUICK_CONFIGS = [Config("16->32x2->10, batch 8", 16, 32, 2, 8),
                 Config("8->16x3->10, batch 4", 8, 16, 3, 4),
                 QUICK_CNN_CONFIG]
#: the jobs run on each kind of configuration (the CNN: the norms and the plain baselines)
KIND_JOBS = {"mlp": ("norms", "clipped", "stats3", "stats4", "plain"), "cnn": ("norms", "plain")}


class Contender(NamedTuple):
    name: str
    library: str  # funcnet, jax, torch, backpack, opacus, jax-privacy
    job: str  # norms, clipped, stats3, stats4, plain
    description: str


# the funcnet contender of each job: every other contender's time is compared with it
FN_NORMS = "fnet per_example_grad_norms"
FN_CLIPPED = "fnet clipped_value_and_grad"
FN_STATS3 = "fnet backprop +3 ext"
FN_STATS4 = "fnet backprop +4 ext"
FN_PLAIN = "fnet value_and_grad"
VMAP_NORMS = "vmap(jax.grad) + norms"
VMAP_CLIPPED = "vmap clipped grad"
JAX_PLAIN = "jax.value_and_grad"
TORCH_PLAIN = "torch backward"
BP_L2 = "backpack BatchL2Grad"
BP_STATS3 = "backpack +3 ext"
BP_STATS4 = "backpack +4 ext"
OPACUS = "opacus clipping (hooks)"
OPACUS_NORMS = "opacus per-sample norms"
OPACUS_GHOST = "opacus ghost clipping"
JAX_PRIVACY = "jax-privacy clipped grad"

COUNTERPART = {"norms": FN_NORMS, "clipped": FN_CLIPPED, "stats3": FN_STATS3,
               "stats4": FN_STATS4, "plain": FN_PLAIN}

CONTENDERS = [
    Contender(FN_NORMS, "funcnet", "norms", "fnet.per_example_grad_norms: one walk, batch_l2"),
    Contender(VMAP_NORMS, "jax", "norms",
              "jax.vmap(jax.grad(example loss)), then the norm of each example's gradient"),
    Contender(BP_L2, "backpack", "norms", "BackPACK: backward with BatchL2Grad()"),
    Contender(OPACUS_NORMS, "opacus", "norms",
              "Opacus GradSampleModule (hooks): backward, then the norms of grad_sample"),
    Contender(FN_CLIPPED, "funcnet", "clipped",
              "fnet.clipped_value_and_grad: one walk, norms, reweighted cotangents"),
    Contender(VMAP_CLIPPED, "jax", "clipped",
              "jax.vmap(jax.value_and_grad(example loss)), norms, clip factors, mean"),
    Contender(OPACUS, "opacus", "clipped",
              "Opacus GradSampleModule (hooks) + DPOptimizer(noise_multiplier=0).pre_step()"),
    Contender(OPACUS_GHOST, "opacus", "clipped",
              "Opacus ghost clipping: GradSampleModuleFastGradientClipping + "
              "DPOptimizerFastGradientClipping + DPLossFastGradientClipping (two backwards)"),
    Contender(JAX_PRIVACY, "jax-privacy", "clipped",
              "jax-privacy's per-example clipped gradient (vmap inside)"),
    Contender(FN_STATS3, "funcnet", "stats3",
              "fnet.backprop with batch_l2, second_moment, variance"),
    Contender(BP_STATS3, "backpack", "stats3",
              "BackPACK: backward with BatchL2Grad, SumGradSquared, Variance"),
    Contender(FN_STATS4, "funcnet", "stats4",
              "fnet.backprop with batch_grad, batch_l2, second_moment, variance"),
    Contender(BP_STATS4, "backpack", "stats4",
              "BackPACK: backward with BatchGrad, BatchL2Grad, SumGradSquared, Variance"),
    Contender(FN_PLAIN, "funcnet", "plain", "fnet.value_and_grad (the plain step)"),
    Contender(JAX_PLAIN, "jax", "plain", "jax.value_and_grad of the plain forward pass"),
    Contender(TORCH_PLAIN, "torch", "plain", "PyTorch: forward, loss.backward()"),
]
BY_NAME = {c.name: c for c in CONTENDERS}
#: the module whose import tells whether a library is installed, and how to get it
LIBRARIES = {"torch": ("torch", "torch", "pip install -e '.[bench]'"),
             "backpack": ("backpack", "backpack-for-pytorch", "pip install -e '.[bench]'"),
             "opacus": ("opacus", "opacus", "pip install -e '.[bench]'"),
             "jax-privacy": ("jax_privacy", "jax-privacy", "pip install jax-privacy --no-deps")}
PEER_NAMES = [c.name for c in CONTENDERS if c.library not in ("funcnet",)
              and c.name not in (VMAP_NORMS, VMAP_CLIPPED)]


# --- the problem ----------------------------------------------------------------------------


class Problem(NamedTuple):
    """One configuration's network, weights and batch, for JAX and for PyTorch."""

    config: Any
    net: Any
    params: Any  # funcnet's params, on the device
    x: Any  # on the device, channels last for the CNN
    y: Any
    y_np: np.ndarray
    weights: Any  # peers.named_weights: what PyTorch's model is built from
    torch_x: np.ndarray  # x in PyTorch's layout (channels first for the CNN)
    structure: tuple  # () or {"w", "b"} per layer, like params

    def torch_model(self):
        """A fresh PyTorch model with funcnet's weights (peers.torch_model)."""
        return torch_model(self.config, self.weights)

    def to_funcnet(self, arrays):
        """PyTorch-parameter-shaped numpy arrays, in parameter order -> funcnet's layout."""
        final = self.config.final_shape() if self.config.kind == "cnn" else None
        return to_funcnet_layout_np(arrays, self.structure, final)


def make_problem(config, seed: int) -> Problem:
    """The MLPs: weights drawn with NumPy (``numpy_params``, N(0, 1 / fan_in)); the CNN:
    funcnet's own init (its kernels' fan-in is kernel size x input channels)."""
    net = make_net(config, CLASSES)
    if config.kind == "mlp":
        params_np = numpy_params(net, config.in_shape(), seed)
    else:
        params_np = jax.tree.map(np.asarray,
                                 net.init(jax.random.key(seed), config.in_shape())[0])
    x_np = numpy_normal((config.batch, *config.in_shape()), seed + 1)
    y_np = np.random.default_rng(seed + 2).integers(0, CLASSES, config.batch).astype(np.int32)
    params, x, y = jax.device_put((params_np, x_np, y_np))
    structure = tuple(() if p == () else {"w": None, "b": None} for p in params_np)
    return Problem(config, net, params, x, y, y_np, named_weights(config, params_np),
                   torch_inputs(config, x_np), structure)


def cross_entropy(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _sq_norms(tree):
    """Per-example squared norms over each leaf of a tree of (B, ...) leaves."""
    return jax.tree.map(lambda g: jnp.sum(jnp.square(g).reshape(g.shape[0], -1), axis=1), tree)


def _total(tree):
    leaves = jax.tree.leaves(tree)
    return sum(leaves[1:], leaves[0])


def vmap_functions(net):
    """The plain-JAX references: per-example gradients by jax.vmap(jax.grad(...))."""

    def example_loss(params, xb, yb):
        return cross_entropy(net.apply(params, xb[None]), yb[None])

    per_example = jax.vmap(jax.value_and_grad(example_loss), in_axes=(None, 0, 0))

    def norms(params, x, y):
        _, grads = per_example(params, x, y)
        return jnp.sqrt(_total(_sq_norms(grads)))

    def clipped(max_norm):
        def clipped_fn(params, x, y):
            losses, grads = per_example(params, x, y)
            n = jnp.sqrt(_total(_sq_norms(grads)))
            factors = jnp.where(n > max_norm, max_norm / jnp.where(n > 0, n, 1.0), 1.0)
            mean = jax.tree.map(lambda g: jnp.tensordot(factors, g, axes=1) / g.shape[0], grads)
            return jnp.mean(losses), mean

        return clipped_fn

    def statistics_(params, x, y):
        """The reference for the extensions: batch_l2, second_moment, variance, norms."""
        _, grads = per_example(params, x, y)
        l2 = _sq_norms(grads)
        # means over the batch as products with a vector of 1/B: XLA's CPU reduction over
        # the leading axis of a (B, fan_in, out) array is tens of times slower
        def mean(g):
            return jnp.tensordot(jnp.full((g.shape[0],), 1.0 / g.shape[0], g.dtype), g, axes=1)

        second = jax.tree.map(lambda g: mean(jnp.square(g)), grads)
        variance = jax.tree.map(lambda g, m: m - jnp.square(mean(g)), grads, second)
        return {"batch_l2": l2, "second_moment": second, "variance": variance,
                "norms": jnp.sqrt(_total(l2))}

    def plain(params, x, y):
        return cross_entropy(net.apply(params, x), y)

    return {"norms": norms, "clipped": clipped, "statistics": statistics_,
            "plain": jax.value_and_grad(plain)}


EXT3 = (fnet.extensions.batch_l2(), fnet.extensions.second_moment(), fnet.extensions.variance())
EXT4 = (fnet.extensions.batch_grad(),) + EXT3


def funcnet_functions(net, max_norm: float):
    loss = fnet.losses.softmax_cross_entropy

    def stats(extensions):
        def stats_fn(params, x, y):
            record = fnet.backprop(net, loss, params, x, y, extensions=extensions)
            return record.value, record.grads, record.extensions

        return stats_fn

    return {FN_NORMS: fnet.per_example_grad_norms(net, loss),
            FN_CLIPPED: fnet.clipped_value_and_grad(net, loss, max_norm),
            FN_STATS3: stats(EXT3), FN_STATS4: stats(EXT4),
            FN_PLAIN: fnet.value_and_grad(net, loss)}


# --- the peers ------------------------------------------------------------------------------


def library_status(library: str):
    """(status, detail): ("ok", version) when the library imports, else ("absent", why)."""
    if library in ("funcnet", "jax"):
        return "ok", (fnet.__name__ if library == "funcnet" else jax.__version__)
    module, distribution, hint = LIBRARIES[library]
    try:
        importlib.import_module(module)
    except Exception as error:  # ImportError, or a broken / incompatible install
        return "absent", f"not installed or incompatible ({type(error).__name__}: {error}); {hint}"
    try:
        return "ok", importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "ok", "?"


def torch_model(config, weights):
    """peers.torch_model: the same network in PyTorch, funcnet's weights copied in, on
    :func:`peers.torch_device`."""
    # PyTorch's note that the input x needs no gradient (BackPACK's and Opacus' hooks)
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    return peers_torch_model(config, weights).to(torch_device())


def torch_batch(x_np, y_np):
    """A numpy batch as PyTorch tensors on :func:`peers.torch_device` (labels int64)."""
    import torch

    device = torch_device()
    return (torch.from_numpy(x_np).to(device),
            torch.from_numpy(y_np.astype(np.int64)).to(device))


def per_leaf_to_funcnet(values, params_structure):
    """[value per weight, value per bias, ...] -> {"w", "b"} per dense layer."""
    out, k = [], 0
    for p in params_structure:
        if p == ():
            out.append(())
        else:
            out.append({"w": values[k], "b": values[k + 1]})
            k += 2
    return tuple(out)


def build_torch_plain(problem, max_norm):
    import torch.nn.functional as F

    model = problem.torch_model()
    x, y = torch_batch(problem.torch_x, problem.y_np)

    def call():
        model.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss.detach()

    return call, lambda: {"grads": [p.grad for p in model.parameters()]}


BACKPACK_EXTENSIONS = {BP_L2: ("BatchL2Grad",),
                       BP_STATS3: ("BatchL2Grad", "SumGradSquared", "Variance"),
                       BP_STATS4: ("BatchGrad", "BatchL2Grad", "SumGradSquared", "Variance")}
BACKPACK_ATTRIBUTES = {"BatchGrad": "grad_batch", "BatchL2Grad": "batch_l2",
                       "SumGradSquared": "sum_grad_squared", "Variance": "variance"}


def build_backpack(name):
    def build(problem, max_norm):
        import torch
        from backpack import backpack, extend
        from backpack import extensions as bpx

        model = extend(problem.torch_model())
        lossfunc = extend(torch.nn.CrossEntropyLoss())  # the batch mean, like funcnet's loss
        x, y = torch_batch(problem.torch_x, problem.y_np)
        names = BACKPACK_EXTENSIONS[name]
        extensions = [getattr(bpx, n)() for n in names]

        def call():
            model.zero_grad(set_to_none=True)
            loss = lossfunc(model(x), y)
            with backpack(*extensions):
                loss.backward()
            return loss.detach()

        def outputs():
            params = list(model.parameters())
            result = {"grads": [p.grad for p in params]}
            for n in names:
                if n != "BatchGrad":  # not kept: as big as B copies of the params
                    result[BACKPACK_ATTRIBUTES[n]] = [getattr(p, BACKPACK_ATTRIBUTES[n])
                                                      for p in params]
            return result

        return call, outputs

    return build


def build_opacus(problem, max_norm):
    """Opacus' DP-SGD path without noise: per-sample gradients by hooks, clipped and
    averaged by the DPOptimizer (what ``make_private`` sets up, without the data loader)."""
    import torch
    import torch.nn.functional as F
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    model = GradSampleModule(problem.torch_model(), batch_first=True, loss_reduction="mean")
    x, y = torch_batch(problem.torch_x, problem.y_np)
    optimizer = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=0.0,
                            max_grad_norm=max_norm, expected_batch_size=x.shape[0],
                            loss_reduction="mean")

    def call():
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.pre_step()  # clip per sample, sum, add (zero) noise, divide by B
        return loss.detach()

    return call, lambda: {"clipped": [p.grad for p in model.parameters()]}


def build_opacus_ghost(problem, max_norm):
    """Opacus' ghost clipping: per-sample norms from the layers' inputs and output
    gradients (no per-sample gradient), then a second backward of the reweighted loss."""
    import torch
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    model = GradSampleModuleFastGradientClipping(
        problem.torch_model(), batch_first=True, loss_reduction="mean",
        max_grad_norm=max_norm, use_ghost_clipping=True)
    x, y = torch_batch(problem.torch_x, problem.y_np)
    optimizer = DPOptimizerFastGradientClipping(
        torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=0.0,
        max_grad_norm=max_norm, expected_batch_size=x.shape[0], loss_reduction="mean")
    criterion = DPLossFastGradientClipping(
        model, optimizer, torch.nn.CrossEntropyLoss(), loss_reduction="mean")

    def call():
        optimizer.zero_grad(set_to_none=True)
        loss = criterion(model(x), y)
        loss.backward()  # both backwards: norms, then the reweighted loss
        optimizer.pre_step()  # add (zero) noise, divide by B
        return loss.detach()

    return call, lambda: {"clipped": [p.grad for p in model.parameters()]}


def build_opacus_norms(problem, max_norm):
    """Opacus' per-sample gradients (``GradSampleModule``'s hooks, what DP-SGD clips):
    forward, backward, then ||g_b|| from every parameter's ``grad_sample``. With
    loss_reduction="mean" Opacus scales the backprops by B, so grad_sample[b] = g_b."""
    import torch
    import torch.nn.functional as F
    from opacus import GradSampleModule

    model = GradSampleModule(problem.torch_model(), batch_first=True, loss_reduction="mean")
    x, y = torch_batch(problem.torch_x, problem.y_np)
    params = [p for p in model.parameters() if p.requires_grad]
    kept = {}

    def call():
        model.zero_grad(set_to_none=True)  # also drops the previous grad_sample
        F.cross_entropy(model(x), y).backward()
        squares = [p.grad_sample.reshape(p.grad_sample.shape[0], -1).square().sum(1)
                   for p in params]
        kept["norms"] = torch.stack(squares).sum(0).sqrt()
        return kept["norms"]

    return call, lambda: {"norms": [kept["norms"]]}


def jax_privacy_function(net, max_norm: float, batch: int):
    """jax-privacy's per-example clipped gradient (``jax_privacy.clipping.clipped_grad``:
    vmap of the per-example value_and_grad, clip, sum), divided by B:
    f(params, x, y) -> mean clipped grad."""
    from jax_privacy import clipping

    def loss(params, x, y):  # called on one example with a batch axis of 1
        return cross_entropy(net.apply(params, x), y)

    return clipping.clipped_grad(loss, l2_clip_norm=max_norm, batch_argnums=(1, 2),
                                 keep_batch_dim=True, normalize_by=batch)


TORCH_BUILDERS = {TORCH_PLAIN: build_torch_plain, BP_L2: build_backpack(BP_L2),
                  BP_STATS3: build_backpack(BP_STATS3), BP_STATS4: build_backpack(BP_STATS4),
                  OPACUS: build_opacus, OPACUS_GHOST: build_opacus_ghost,
                  OPACUS_NORMS: build_opacus_norms}


# --- one configuration ----------------------------------------------------------------------


def _compile(fn, *args):
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - start


def _to_numpy(tree):
    return jax.tree.map(np.asarray, tree)


def run_config(config, names: Sequence[str], statuses, threads: int, repeats: int,
               warmup: int, seed: int, slow_seconds: float = math.inf):
    """Build, check and time every contender of one configuration (those of its kind's
    jobs, ``KIND_JOBS``); (rows, summary)."""
    problem = make_problem(config, seed)
    net, params, x, y = problem.net, problem.params, problem.x, problem.y
    jobs = KIND_JOBS[config.kind]
    kind_names = {c.name for c in CONTENDERS if c.job in jobs}
    names = [name for name in names if name in kind_names]
    vm = vmap_functions(net)
    rows: Dict[str, Dict[str, Any]] = {}
    for name in names:
        c = BY_NAME[name]
        status, detail = statuses[c.library]
        rows[name] = {"config": config.label, "contender": name, "library": c.library,
                      "job": c.job, "description": c.description, "status": status,
                      "detail": detail}

    # the reference first: per-example gradients by vmap, their norms set the clipping norm
    # (without the statistics, the norms alone: the timed vmap contender's own executable)
    compiled_ahead = {}
    if "stats3" in jobs:
        reference_fn, _ = _compile(vm["statistics"], params, x, y)
        reference = _to_numpy(reference_fn(params, x, y))
        del reference_fn
    else:
        compiled_ahead[VMAP_NORMS] = _compile(vm["norms"], params, x, y)
        reference = {"norms": _to_numpy(compiled_ahead[VMAP_NORMS][0](params, x, y))}
    max_norm = float(np.median(reference["norms"]))
    if not max_norm > 0:
        max_norm = 1.0
    clipped_fraction = float(np.mean(reference["norms"] > max_norm))

    jax_fns = dict(funcnet_functions(net, max_norm))
    jax_fns[VMAP_NORMS] = vm["norms"]
    jax_fns[VMAP_CLIPPED] = vm["clipped"](max_norm)
    jax_fns[JAX_PLAIN] = vm["plain"]
    if JAX_PRIVACY in names and rows[JAX_PRIVACY]["status"] == "ok":
        try:
            jax_fns[JAX_PRIVACY] = jax_privacy_function(net, max_norm, config.batch)
        except Exception as error:
            _failed(rows[JAX_PRIVACY], error)

    calls: Dict[str, Callable[[], Any]] = {}
    outputs: Dict[str, Any] = {}
    for name in names:
        row = rows[name]
        if row["status"] != "ok":
            continue
        try:
            if name in jax_fns:
                compiled, compile_s = (compiled_ahead.pop(name, None)
                                       or _compile(jax_fns[name], params, x, y))
                memory = memory_stats(compiled)
                row.update({"compile_s": compile_s, "flops": cost_flops(compiled),
                            "temp_bytes": memory["temp_size_in_bytes"],
                            "temp_mib": mib(memory["temp_size_in_bytes"])})
                call = blocking(compiled, params, x, y)
                start = time.perf_counter()
                outputs[name] = call()
                row["first_call_s"] = time.perf_counter() - start
                if name == FN_STATS4:  # keep only what the checks read: B copies of the params
                    batch_grad = outputs.pop(name)[2]["batch_grad"]
                    outputs[name] = {"batch_grad_sq_norms": _to_numpy(
                        jax.jit(_sq_norms)(batch_grad))}
                    del batch_grad
                else:
                    outputs[name] = _to_numpy(outputs[name])
            else:
                call, read = TORCH_BUILDERS[name](problem, max_norm)
                call = torch_blocking(call, torch_device())
                start = time.perf_counter()
                call()
                row["first_call_s"] = time.perf_counter() - start
                outputs[name] = {k: [t.detach().cpu().numpy().copy() for t in v]
                                 for k, v in read().items()}
            calls[name] = call
            print(f"    {name}: " + (f"compiled in {row['compile_s']:.1f} s, " if "compile_s" in row
                                     else "") + f"first call {row['first_call_s']:.2f} s",
                  flush=True)
        except Exception as error:  # a peer whose API moved: say so, keep going
            _failed(row, error)

    checks = correctness(problem, outputs, reference, kind_names)
    del reference, outputs

    times, slow = time_contenders(calls, rows, repeats, warmup, seed, slow_seconds,
                                  SLOW_REPEATS)
    add_statistics(rows, times, slow, FN_PLAIN, lambda name: COUNTERPART[BY_NAME[name].job])
    summary = {"config": config._asdict(), "label": config.label, "kind": config.kind,
               "jobs": list(jobs), "n_params": config.n_params(),
               "max_norm": max_norm,
               "clipped_fraction": clipped_fraction,
               "per_example_grads_mib": mib(4.0 * config.batch * config.n_params()),
               "checks": checks}
    return list(rows.values()), summary


def time_contenders(calls: Dict[str, Callable[[], Any]], rows, repeats: int, warmup: int,
                    seed: int, slow_seconds: float, slow_repeats: int):
    """``(times, slow)``: every call timed in ``repeats`` interleaved rounds after
    ``warmup`` (with a progress bar), except the contenders (not funcnet's own) whose
    first call took over ``slow_seconds``: those (``slow``) are timed apart afterwards, in
    ``slow_repeats`` runs of their own, and their rows say so."""
    slow = {name: calls.pop(name) for name in list(calls)
            if rows[name]["first_call_s"] > slow_seconds and not name.startswith("fnet")}
    times = interleaved_times(_with_progress(calls, repeats + warmup), repeats=repeats,
                              warmup=warmup, seed=seed)
    for name, call in slow.items():
        runs = max(1, min(repeats, slow_repeats))
        print(f"    timing {name} apart: first call {rows[name]['first_call_s']:.0f} s > "
              f"{slow_seconds:g} s, {runs} runs", flush=True)
        times[name] = interleaved_times({name: call}, repeats=runs, warmup=0)[name]
        rows[name]["timed_apart"] = (f"first call {rows[name]['first_call_s']:.0f} s > "
                                     f"{slow_seconds:g} s: {runs} runs after the "
                                     f"interleaved rounds")
    return times, slow


def add_statistics(rows, times, slow, plain: str, counterpart_of: Callable[[str], str]):
    """Fills every row with its median, quartiles and samples (ms), its time and temporary
    memory over the ``plain`` row's, and its time over its funcnet counterpart's (also
    paired: the median of the per-round ratios, for contenders timed in the rounds)."""
    for name, ts in times.items():
        stats = summarize(ts)
        rows[name].update({"step_ms": 1e3 * stats["median"], "step_ms_q1": 1e3 * stats["q1"],
                           "step_ms_q3": 1e3 * stats["q3"], "step_ms_min": 1e3 * stats["min"],
                           "samples_ms": [1e3 * t for t in ts]})
    plain_ms = rows[plain].get("step_ms", math.nan)
    plain_temp = rows[plain].get("temp_bytes", math.nan)
    for name, row in rows.items():
        counterpart = counterpart_of(name)
        row["counterpart"] = counterpart
        row["over_plain"] = row.get("step_ms", math.nan) / plain_ms
        row["over_funcnet"] = (row.get("step_ms", math.nan)
                               / rows[counterpart].get("step_ms", math.nan))
        row["paired_over_funcnet"] = (
            statistics.median(a / b for a, b in zip(times[name], times[counterpart]))
            if name in times and counterpart in times and name not in slow else math.nan)
        row["temp_over_plain"] = row.get("temp_bytes", math.nan) / plain_temp
        row["iqr_ms"] = (f"{row['step_ms_q1']:.3g}-{row['step_ms_q3']:.3g}"
                         if "step_ms" in row else "")
        if "first_call_s" in row and "step_ms" in row and "compile_s" not in row:
            row["compile_s"] = max(0.0, row["first_call_s"] - row["step_ms"] / 1e3)


def _with_progress(calls: Dict[str, Callable[[], Any]], rounds: int):
    """The same callables, printing a line after every round (every contender once)."""
    state = {"n": 0, "start": time.perf_counter()}

    def wrap(call):
        def wrapped():
            result = call()
            state["n"] += 1
            if state["n"] % len(calls) == 0:
                print(f"    round {state['n'] // len(calls)}/{rounds} done "
                      f"({time.perf_counter() - state['start']:.0f} s)", flush=True)
            return result

        return wrapped

    return {name: wrap(call) for name, call in calls.items()}


def _failed(row, error):
    row["status"] = "error"
    row["detail"] = f"{type(error).__name__}: {error}"
    traceback.print_exc()


def correctness(problem, outputs, reference, kind_names) -> Dict[str, Any]:
    """Relative differences (max |a - b| / max |b|) of every result against its reference:
    those whose contenders (``needs``) the configuration's kind runs; NaN where one of them
    did not run (absent, error, not selected)."""
    checks: Dict[str, Any] = {}
    batch = problem.config.batch
    structure = problem.structure

    def check(label, fn, *needs):
        if not set(needs) <= kind_names:
            return
        try:
            checks[label] = float(fn())
        except KeyError:  # the contender did not run (absent, error, not selected)
            checks[label] = math.nan
        except Exception as error:
            checks[label] = math.nan
            print(f"check {label!r} failed: {type(error).__name__}: {error}", flush=True)
            traceback.print_exc()

    o = outputs
    check("fnet norms vs vmap", lambda: max_rel_diff(o[FN_NORMS], reference["norms"]), FN_NORMS)
    check("vmap norms (timed) vs vmap reference",
          lambda: max_rel_diff(o[VMAP_NORMS], reference["norms"]), VMAP_NORMS)
    check("fnet clipped grads vs vmap clipped",
          lambda: max_rel_diff(o[FN_CLIPPED][1], o[VMAP_CLIPPED][1]), FN_CLIPPED, VMAP_CLIPPED)
    check("fnet clipped value vs vmap (abs)",
          lambda: abs(float(o[FN_CLIPPED][0]) - float(o[VMAP_CLIPPED][0])), FN_CLIPPED,
          VMAP_CLIPPED)
    for key in ("batch_l2", "second_moment", "variance"):
        check(f"fnet backprop {key} vs vmap",
              lambda key=key: max_rel_diff(o[FN_STATS3][2][key], reference[key]), FN_STATS3)
    check("fnet backprop grads vs jax.value_and_grad",
          lambda: max_rel_diff(o[FN_STATS3][1], o[JAX_PLAIN][1]), FN_STATS3, JAX_PLAIN)
    check("fnet value_and_grad grads vs jax.value_and_grad",
          lambda: max_rel_diff(o[FN_PLAIN][1], o[JAX_PLAIN][1]), FN_PLAIN, JAX_PLAIN)
    check("fnet backprop batch_grad squared norms vs vmap",
          lambda: max_rel_diff(o[FN_STATS4]["batch_grad_sq_norms"], reference["batch_l2"]),
          FN_STATS4)
    # BackPACK scales by the batch mean: grad_batch[b] = g_b / B, so batch_l2 = ||g_b||^2 / B^2,
    # sum_grad_squared = sum_b g_b^2 / B^2 = second_moment / B, and its variance,
    # sum_grad_squared / B - (grad / B)^2, is funcnet's / B^2
    fn_ext = o.get(FN_STATS3, (None, None, {}))[2]
    for name in (BP_L2, BP_STATS3):
        check(f"{name}: batch_l2 * B^2 vs fnet batch_l2", lambda name=name: max_rel_diff(
            per_leaf_to_funcnet([a * batch ** 2 for a in o[name]["batch_l2"]], structure),
            fn_ext["batch_l2"]), name, FN_STATS3)
    check(f"{BP_L2}: sqrt(sum batch_l2) * B vs vmap norms", lambda: max_rel_diff(
        np.sqrt(sum(a.astype(np.float64) for a in o[BP_L2]["batch_l2"])) * batch,
        reference["norms"]), BP_L2)
    check(f"{OPACUS_NORMS}: norms vs vmap norms",
          lambda: max_rel_diff(o[OPACUS_NORMS]["norms"][0], reference["norms"]), OPACUS_NORMS)
    check(f"{BP_STATS3}: sum_grad_squared * B vs fnet second_moment", lambda: max_rel_diff(
        problem.to_funcnet([a * batch for a in o[BP_STATS3]["sum_grad_squared"]]),
        fn_ext["second_moment"]), BP_STATS3, FN_STATS3)
    check(f"{BP_STATS3}: variance * B^2 vs fnet variance", lambda: max_rel_diff(
        problem.to_funcnet([a * batch ** 2 for a in o[BP_STATS3]["variance"]]),
        fn_ext["variance"]), BP_STATS3, FN_STATS3)
    check(f"{TORCH_PLAIN}: grads vs jax.value_and_grad", lambda: max_rel_diff(
        problem.to_funcnet(o[TORCH_PLAIN]["grads"]), o[JAX_PLAIN][1]), TORCH_PLAIN, JAX_PLAIN)
    for name in (OPACUS, OPACUS_GHOST):
        check(f"{name}: clipped grads vs vmap clipped", lambda name=name: max_rel_diff(
            problem.to_funcnet(o[name]["clipped"]), o[VMAP_CLIPPED][1]), name, VMAP_CLIPPED)
    check(f"{JAX_PRIVACY}: clipped grads vs vmap clipped",
          lambda: max_rel_diff(o[JAX_PRIVACY], o[VMAP_CLIPPED][1]), JAX_PRIVACY, VMAP_CLIPPED)
    return checks


def to_funcnet_layout_np(arrays, structure, final_shape=None):
    """[weight-shaped, bias-shaped, ...] numpy arrays in PyTorch's layouts -> funcnet's:
    Linear (out, in) -> (in, out); Conv2d OIHW -> HWIO; with ``final_shape`` (H, W, C) of a
    CNN's last feature map, the rows of the dense after flatten from the channels-first
    order back to the channels-last one."""
    out, k = [], 0
    for p in structure:
        if p == ():
            out.append(())
            continue
        w, b = np.asarray(arrays[k]), np.asarray(arrays[k + 1])
        k += 2
        if w.ndim == 4:
            w = w.transpose(2, 3, 1, 0)
        else:
            w = w.T
            if final_shape is not None and w.shape[0] == math.prod(final_shape):
                w = chw_to_hwc_rows(w, final_shape)
        out.append({"w": w, "b": b})
    return tuple(out)


# --- targets and report ---------------------------------------------------------------------


def make_targets(rows, summaries) -> List[Dict[str, Any]]:
    by = {(r["config"], r["contender"]): r for r in rows}
    targets = []
    for summary in summaries:
        label = summary["label"]

        def get(name, key="step_ms"):
            return by.get((label, name), {}).get(key, math.nan)

        mlp = summary.get("kind", "mlp") == "mlp"
        norms = get(VMAP_NORMS) / get(FN_NORMS)
        limit = NORMS_TARGET if mlp else CNN_NORMS_TARGET
        targets.append(target_row(f"{label}: vmap(jax.grad) + norms / fnet per_example_grad_norms",
                                  norms, f">= {limit:g}", norms >= limit))
        if not mlp:  # the CNN: the norms against the peers that compute them
            for name in (BP_L2, OPACUS_NORMS):
                _peer_target(targets, by, label, name)
            continue
        clipped = get(VMAP_CLIPPED) / get(FN_CLIPPED)
        targets.append(target_row(f"{label}: vmap clipped / fnet clipped_value_and_grad",
                                  clipped, f">= {CLIPPED_TARGET:g}", clipped >= CLIPPED_TARGET))
        over = get(FN_CLIPPED) / get(FN_PLAIN)
        targets.append(target_row(f"{label}: fnet clipped_value_and_grad / fnet value_and_grad",
                                  over, f"<= {CLIPPED_PLAIN_TARGET:g}",
                                  over <= CLIPPED_PLAIN_TARGET))
        over = get(FN_STATS3) / get(FN_PLAIN)
        targets.append(target_row(f"{label}: fnet backprop (batch_l2, second_moment, variance) "
                                  f"/ fnet value_and_grad", over, f"<= {EXT_PLAIN_TARGET:g}",
                                  over <= EXT_PLAIN_TARGET))
        for name in (BP_L2, OPACUS_NORMS, BP_STATS3, BP_STATS4, OPACUS, OPACUS_GHOST):
            _peer_target(targets, by, label, name)
        memory = get(FN_NORMS, "temp_bytes") / get(FN_PLAIN, "temp_bytes")
        targets.append(target_row(f"{label}: temp memory, fnet per_example_grad_norms / fnet "
                                  f"value_and_grad", memory, f"<= {MEMORY_TARGET:g}",
                                  memory <= MEMORY_TARGET))
    return targets


def _peer_target(targets, by, label, name):
    """A peer's target: slower than its funcnet counterpart (> 1); not met when absent."""
    if (label, name) not in by:  # not selected
        return
    row = by[label, name]
    what = f"{label}: {name} / {row['counterpart']}"
    if row["status"] != "ok":
        what += f" ({row['status']})"
    ratio = row["over_funcnet"]
    targets.append(target_row(what, ratio, "> 1", row["status"] == "ok" and ratio > 1))


COLUMNS = ["contender", "status", "step_ms", "iqr_ms", "step_ms_min", "over_plain",
           "over_funcnet", "paired_over_funcnet", "temp_mib", "temp_over_plain", "compile_s"]
HEADERS = ["contender", "status", "ms (median)", "IQR ms", "min ms", "/ fnet value_and_grad",
           "/ its funcnet counterpart", "paired", "temp MiB", "temp / plain", "compile s"]


def report(results) -> str:
    s = results["settings"]
    lines = ["# Per-example gradient quantities: funcnet's extensions against vmap, BackPACK, "
             f"Opacus, jax-privacy (float32, {backend_label(results['machine'])})", "",
             machine_line(results["machine"], results["load_average_end"]), "",
             f"Median over {s['repeats']} interleaved rounds after {s['warmup']} warm-up "
             f"rounds (every contender once per round, in a random order); torch threads "
             f"{s['threads_torch']}, torch device {s['torch_device'] or 'n/a (not run)'}. "
             f"'/ its funcnet counterpart': the contender's time over "
             f"that of the funcnet contender computing the same thing (norms: "
             f"{FN_NORMS}; clipped: {FN_CLIPPED}; 3 statistics: {FN_STATS3}; with per-example "
             f"gradients too: {FN_STATS4}; plain: {FN_PLAIN}); > 1: funcnet is faster. "
             f"'paired': that ratio within each round, then the median. temp MiB: XLA's "
             f"memory_analysis() of the compiled JAX contender.", ""]
    for summary in results["configs"]:
        rows = [r for r in results["rows"] if r["config"] == summary["label"]]
        about = (f"{summary['n_params']} params; per-example gradients "
                 f"{summary['per_example_grads_mib']:.0f} MiB")
        if "clipped" in summary["jobs"]:
            about += (f"; clipping norm C = {summary['max_norm']:.4g} (the median ||g_b||: "
                      f"{summary['clipped_fraction']:.0%} of the examples clipped)")
        else:
            about += f"; jobs: {', '.join(summary['jobs'])} only"
        lines += [f"## {summary['label']}", "", about + ".", "",
                  table(rows, COLUMNS, HEADERS), "",
                  table([{"check": k, "rel_diff": v,
                          "ok": (v < CHECK_TOL) if math.isfinite(v) else "n/a"}
                         for k, v in summary["checks"].items()],
                        ["check", "rel_diff", "ok"],
                        ["correctness check", "max |a - b| / max |b|",
                         f"< {CHECK_TOL:g}"]), ""]
    apart = [r for r in results["rows"] if r.get("timed_apart")]
    if apart:
        lines += ["Timed apart (not interleaved; no paired ratio): " + "; ".join(
            f"{r['config']}: {r['contender']} ({r['timed_apart']})" for r in apart), ""]
    lines += ["PyTorch's float32 results differ from JAX's by up to ~1e-3 of the largest "
              "entry where a ReLU input lies within rounding of 0: the two libraries' "
              "matmuls round it to opposite signs, which flips one mask entry and changes one "
              "example's gradient column. The differences among the JAX contenders, which "
              "share XLA's matmuls, are at rounding level.", ""]
    absent = [r for r in results["rows"] if r["status"] != "ok"]
    if absent:
        seen = {}
        for r in absent:
            seen.setdefault((r["contender"], r["status"]), r["detail"])
        lines += ["Not measured: " + "; ".join(f"{name} {status} ({detail})"
                                               for (name, status), detail in seen.items()), ""]
    if s["quick"]:
        lines += ["(--quick: toy sizes; the targets are stated for the full sizes.)", ""]
    lines += ["## Targets", "", targets_table(results["targets"]), ""]
    return "\n".join(lines)


def main(argv=None):
    parser = benchmark_parser(__doc__, NAME)
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed interleaved rounds per configuration (default 15; 3 quick)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed rounds after the first call (default 2; 1 quick)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: the usable cores)")
    parser.add_argument("--peers", nargs="*", choices=PEER_NAMES, default=None,
                        help="which peer contenders to run (default all; the funcnet and vmap "
                             "contenders always run)")
    parser.add_argument("--configs", type=int, nargs="+", default=None,
                        help="which configurations, by index (default all): 0 and 1 the "
                             "MLPs, 2 the CNN")
    parser.add_argument("--slow-seconds", type=float, default=SLOW_SECONDS,
                        help=f"a peer whose first call takes longer than this is timed apart, "
                             f"in {SLOW_REPEATS} runs after the interleaved rounds (default "
                             f"{SLOW_SECONDS:g})")
    parser.add_argument("--quick", action="store_true",
                        help="toy configurations, few repeats (a smoke run)")
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed")
    args = parser.parse_args(argv)
    configs = QUICK_CONFIGS if args.quick else CONFIGS
    if args.configs is not None:
        configs = [configs[i] for i in args.configs]
    repeats = args.repeats or (3 if args.quick else 15)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    m = machine()
    threads = args.threads or m["usable_cores"] or 1
    peers = PEER_NAMES if args.peers is None else args.peers
    names = [c.name for c in CONTENDERS if c.name not in PEER_NAMES or c.name in peers]
    statuses = {library: library_status(library)
                for library in ("funcnet", "jax", "torch", "backpack", "opacus", "jax-privacy")
                if library in {BY_NAME[n].library for n in names} | {"funcnet", "jax"}}
    torch_on = None
    if statuses.get("torch", ("ok",))[0] == "ok" and any(
            BY_NAME[n].library in ("torch", "backpack", "opacus") for n in names):
        import torch

        torch.set_num_threads(threads)  # the CPU's threads: harmless when PyTorch runs on CUDA
        torch_on = str(torch_device())
    print(machine_line(m, None), flush=True)
    print("libraries: " + ", ".join(f"{lib} ({status}: {detail})"
                                    for lib, (status, detail) in statuses.items()), flush=True)

    rows, summaries = [], []
    for config in configs:
        start = time.perf_counter()
        config_rows, summary = run_config(config, names, statuses, threads, repeats, warmup,
                                          args.seed, args.slow_seconds)
        rows += config_rows
        summaries.append(summary)
        print(f"  {config.label}: " + ", ".join(
            f"{r['contender']} {r['step_ms']:.3g} ms" if "step_ms" in r
            else f"{r['contender']} {r['status']}" for r in config_rows)
              + f"  ({time.perf_counter() - start:.0f} s)", flush=True)

    results = {
        "benchmark": NAME,
        "settings": {"repeats": repeats, "warmup": warmup, "threads_torch": threads,
                     "torch_device": torch_on, "quick": args.quick, "seed": args.seed,
                     "dtype": "float32", "classes": CLASSES, "check_tolerance": CHECK_TOL,
                     "slow_seconds": args.slow_seconds, "slow_repeats": SLOW_REPEATS,
                     "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY")},
        "environment": environment(),
        "machine": m,
        "libraries": {lib: {"status": status, "detail": detail}
                      for lib, (status, detail) in statuses.items()},
        "contenders": [c._asdict() for c in CONTENDERS if c.name in names],
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
