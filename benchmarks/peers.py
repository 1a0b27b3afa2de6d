"""The full train step against its peers: funcnet, jax.value_and_grad, Equinox, Flax, PyTorch.

One train step = forward, backward, optax Adam(1e-3) update, with a softmax cross-entropy
on 10 classes and random integer labels (one label per example), float32, on the CPU, for
three kinds of network:

- MLPs of dense + relu hidden layers (three sizes);
- a CNN: 28 x 28 x 1 inputs, batch 128, conv(16, 3) -> relu -> max_pool(2) -> conv(32, 3)
  -> relu -> max_pool(2) -> flatten -> dense(10) (SAME padding);
- a transformer block: T = 64, D = 128, 4 heads, batch 32, on random normal (T, D) inputs:
  residual(layer_norm -> self_attention(4)) -> residual(layer_norm -> dense(4D) -> gelu
  (exact, not the tanh approximation) -> dense(D)) -> flatten -> dense(10), the loss on one
  label per sequence.

Every contender starts from the SAME weights (funcnet's init, copied into each library's
layout) and sees the same sequence of mini-batches, so their first-step losses agree
(a column of the table checks it). The layouts: JAX is channels last (NHWC, kernels HWIO:
funcnet's, linen's and NNX's); PyTorch and Equinox are channels first (kernels OIHW, the
batches transposed once, outside the timed step, and the rows of the dense after flatten
permuted to the channels-first flatten). Attention: funcnet's qkv.w (D, 3D) holds q, k, v
as column blocks, head h the contiguous columns [h*D/H:(h+1)*D/H] of each; PyTorch's
in_proj_weight is exactly qkv.w^T; Equinox's query / key / value projections are the
blocks' transposes; Flax's (D, H, D/H) kernels are the blocks reshaped; out.w maps to each
library's output projection. Every peer uses its library's own attention module (no
attention written by hand), with biases, no dropout. The contenders:

- funcnet: ``fnet.train_step(net, loss, optax.adam(1e-3))``: the hand-written backward
  pass, one ``jax.jit``, state donated;
- jax.value_and_grad: the same network as a plain function (``lax.conv_general_dilated``
  and ``lax.reduce_window`` for the CNN; layer norm and attention written out with
  ``jnp.einsum`` for the transformer), ``jax.value_and_grad`` + optax in one ``jax.jit``
  with params and optimizer state donated (the reference);
- equinox: ``eqx.nn.Linear`` / ``Conv2d`` / ``MaxPool2d`` / ``LayerNorm`` /
  ``MultiheadAttention`` on one example, vmapped over the batch, ``eqx.filter_jit``
  (donating model and optimizer state) + optax;
- flax.linen: ``nn.Dense`` / ``nn.Conv`` / ``nn.max_pool`` / ``nn.LayerNorm`` /
  ``nn.MultiHeadDotProductAttention``, ``jax.jit`` of the step with params and optimizer
  state donated;
- flax.nnx: ``nnx.Linear`` / ``nnx.Conv`` / ``nnx.max_pool`` / ``nnx.LayerNorm`` /
  ``nnx.MultiHeadAttention``, ``nnx.Optimizer`` and ``nnx.jit`` (model and optimizer
  donated), the idiomatic NNX loop;
- torch (eager): ``nn.Linear`` / ``nn.Conv2d`` / ``nn.MaxPool2d`` / ``nn.LayerNorm`` /
  ``nn.MultiheadAttention`` / ``F.gelu``, ``F.cross_entropy``, ``torch.optim.Adam(lr=1e-3)``,
  ``torch.set_num_threads`` = the usable cores.

Equinox, Flax and PyTorch are the optional ``bench`` extra (``pip install -e '.[bench]'``);
a peer that cannot be imported is reported as *absent* (and its targets as not met), one
that fails while running as *error*, never silently dropped.

On a GPU (JAX's default backend) the same script runs every contender on the GPU, PyTorch
too when it sees CUDA (else on the CPU): its model and batches are moved there once,
outside the timed steps, and each step waits for the GPU (``torch.cuda.synchronize``)
before the timer reads the clock; ``settings.torch_device`` in the JSON and the report say
where PyTorch ran. numpy's matmul peak is then the host CPU's, reported as such.

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
over rounds, robust to load that drifts between rounds); the achieved GFLOP/s (3 x the
forward's matmul and convolution FLOPs per step; for an MLP 6 * batch * sum(fan_in *
fan_out)) as a fraction of the XLA matmul peak measured in the same rounds, beside the
bound that the Adam update alone (memory-bound) puts on that fraction. A separate section
measures XLA's and numpy's matmul peaks side by side (how far XLA's CPU matmul stands from
the best library matmul here), and a tiny network (4 -> 4 -> 2, batch 1, where compute is
negligible; run with the MLPs) gives the per-step Python overhead of every contender.

Targets: funcnet <= 1.00x jax.value_and_grad on every MLP configuration and <= 1.05x on
the CNN and the transformer block; funcnet's tiny step under 0.1 ms; funcnet faster than
Equinox, Flax (linen and NNX) and PyTorch eager on every configuration; funcnet at >= 90%
of XLA's matmul peak on the 784 -> 1024x4 configuration.

    python benchmarks/peers.py --help
    python benchmarks/peers.py --quick       # toy sizes, a few repeats (a smoke run)
    python benchmarks/peers.py               # the five configurations, 30 rounds of 3 steps
    python benchmarks/peers.py --configs cnn transformer   # only these kinds
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
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

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
#: funcnet / jax.value_and_grad at most this, per configuration kind; peers / funcnet above 1
REFERENCE_TARGETS = {"mlp": 1.00, "cnn": 1.05, "transformer": 1.05}
OVERHEAD_TARGET_MS = 0.1
PEAK_TARGET = 0.90
PEAK_CONFIG = "784"  # the configuration (its label starts so) whose peak fraction is a target
N_BATCHES = 4  # distinct mini-batches cycled through (no overfitting to one batch)


class Config(NamedTuple):
    """An MLP: ``depth`` hidden dense layers of ``width`` (each followed by relu), then
    dense(classes), on inputs of ``fan_in`` features."""

    label: str
    fan_in: int
    width: int
    depth: int
    batch: int

    kind = "mlp"

    def in_shape(self) -> Tuple[int, ...]:
        return (self.fan_in,)

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


class CNNConfig(NamedTuple):
    """A CNN on ``size`` x ``size`` x 1 images, channels last: for each entry c of
    ``channels``, conv(c, kernel) (SAME padding, stride 1) -> relu -> max_pool(2); then
    flatten -> dense(classes)."""

    label: str
    size: int
    channels: Tuple[int, ...]
    kernel: int
    batch: int

    kind = "cnn"

    def in_shape(self) -> Tuple[int, ...]:
        return (self.size, self.size, 1)

    def final_shape(self) -> Tuple[int, int, int]:
        """(H, W, C) of the last pooled feature map, the input of flatten."""
        n = self.size
        for _ in self.channels:
            n //= 2
        return (n, n, self.channels[-1])

    def flops(self) -> float:
        """3 x the forward's convolution and matmul FLOPs (2 per multiply-add)."""
        total, n, c_in = 0, self.size, 1
        for c in self.channels:
            total += 2 * n * n * self.kernel ** 2 * c_in * c
            n, c_in = n // 2, c
        total += 2 * n * n * c_in * CLASSES
        return 3.0 * self.batch * total

    def n_params(self) -> int:
        total, c_in = 0, 1
        for c in self.channels:
            total += (self.kernel ** 2 * c_in + 1) * c
            c_in = c
        h, w, c = self.final_shape()
        return total + (h * w * c + 1) * CLASSES


class TransformerConfig(NamedTuple):
    """One pre-norm transformer block on (length, width) inputs, then a classifier head:
    residual(layer_norm -> self_attention(heads)) -> residual(layer_norm -> dense(4 width)
    -> gelu (exact) -> dense(width)) -> flatten -> dense(classes)."""

    label: str
    length: int
    width: int
    heads: int
    batch: int

    kind = "transformer"

    def in_shape(self) -> Tuple[int, ...]:
        return (self.length, self.width)

    def flops(self) -> float:
        """3 x the forward's matmul FLOPs: qkv, q k^T, (softmax) v, out, the MLP, the head."""
        t, d = self.length, self.width
        forward = (2 * t * d * 3 * d + 2 * 2 * t * t * d + 2 * t * d * d
                   + 2 * 2 * t * d * 4 * d + 2 * t * d * CLASSES)
        return 3.0 * self.batch * forward

    def n_params(self) -> int:
        t, d = self.length, self.width
        return (2 * 2 * d + (d + 1) * 3 * d + (d + 1) * d + (d + 1) * 4 * d
                + (4 * d + 1) * d + (t * d + 1) * CLASSES)


CNN_CONFIG = CNNConfig("CNN 28x28x1, conv 16-32 (3x3), batch 128", 28, (16, 32), 3, 128)
TRANSFORMER_CONFIG = TransformerConfig("transformer block T=64 D=128 4 heads, batch 32",
                                       64, 128, 4, 32)
QUICK_CNN_CONFIG = CNNConfig("CNN 8x8x1, conv 4-8 (3x3), batch 8", 8, (4, 8), 3, 8)
QUICK_TRANSFORMER_CONFIG = TransformerConfig("transformer block T=8 D=16 4 heads, batch 4",
                                             8, 16, 4, 4)
CONFIGS = [Config("64->256x4->10, batch 128", 64, 256, 4, 128),
           Config("784->1024x4->10, batch 256", 784, 1024, 4, 256),
           Config("512->512x16->10, batch 64", 512, 512, 16, 64),
           CNN_CONFIG, TRANSFORMER_CONFIG]
QUICK_CONFIGS = [Config("16->32x2->10, batch 8", 16, 32, 2, 8),
                 Config("784->64x2->10, batch 16", 784, 64, 2, 16),
                 Config("32->32x4->10, batch 4", 32, 32, 4, 4),
                 QUICK_CNN_CONFIG, QUICK_TRANSFORMER_CONFIG]
KINDS = ("mlp", "cnn", "transformer")
TINY = Config("tiny 4->4->2, batch 1 (overhead)", 4, 4, 1, 1)
TINY_CLASSES = 2


# --- the networks, their weights and their batches ----------------------------------------


def funcnet_net(config: Config, classes: int):
    layers = []
    for _ in range(config.depth):
        layers += [fnet.dense(config.width), fnet.relu]
    return fnet.chain(*layers, fnet.dense(classes))


def cnn_net(config: CNNConfig, classes: int):
    layers = []
    for c in config.channels:
        layers += [fnet.conv(c, config.kernel), fnet.relu, fnet.max_pool(2)]
    return fnet.chain(*layers, fnet.flatten, fnet.dense(classes))


def transformer_net(config: TransformerConfig, classes: int):
    d = config.width
    attention = fnet.residual(fnet.chain(fnet.layer_norm(), fnet.self_attention(config.heads)))
    mlp = fnet.residual(fnet.chain(fnet.layer_norm(), fnet.dense(4 * d), fnet.gelu,
                                   fnet.dense(d)))
    return fnet.chain(attention, mlp, fnet.flatten, fnet.dense(classes))


def make_net(config, classes: int):
    """funcnet's network for any configuration kind."""
    return {"mlp": funcnet_net, "cnn": cnn_net,
            "transformer": transformer_net}[config.kind](config, classes)


def named_weights(config, params):
    """funcnet's params as numpy float32, in the shape every builder reads:

    - mlp: ``[(w, b)]`` per dense layer;
    - cnn: ``{"convs": [(w HWIO, b)], "dense": (w (H*W*C, classes) rows in HWC order, b)}``;
    - transformer: ``{"ln1": (scale, offset), "qkv": (w (D, 3D), b), "out": (w, b),
      "ln2": (scale, offset), "fc1": (w, b), "fc2": (w, b), "head": (w (T*D, classes), b)}``.
    """
    params = jax.tree.map(lambda a: np.asarray(a, np.float32), params)
    if config.kind == "mlp":
        return [(p["w"], p["b"]) for p in params if p != ()]
    if config.kind == "cnn":
        dense = [(p["w"], p["b"]) for p in params if p != ()]
        return {"convs": dense[:-1], "dense": dense[-1]}
    (ln1, attention), (ln2, fc1, _, fc2), _, head = params
    return {"ln1": (ln1["scale"], ln1["offset"]),
            "qkv": (attention["qkv"]["w"], attention["qkv"]["b"]),
            "out": (attention["out"]["w"], attention["out"]["b"]),
            "ln2": (ln2["scale"], ln2["offset"]), "fc1": (fc1["w"], fc1["b"]),
            "fc2": (fc2["w"], fc2["b"]), "head": (head["w"], head["b"])}


def make_problem(config, classes: int, seed: int):
    """(funcnet net, its params, :func:`named_weights`, batches as numpy)."""
    net = make_net(config, classes)
    params, _ = net.init(jax.random.key(seed), config.in_shape())
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
    weights = named_weights(config, params)
    rng = np.random.default_rng(seed + 1)
    batches = [(rng.standard_normal((config.batch, *config.in_shape())).astype(np.float32),
                rng.integers(0, classes, config.batch).astype(np.int32))
               for _ in range(N_BATCHES)]
    return net, params, weights, batches


def hwc_to_chw_rows(w, final_shape):
    """A dense weight after a channels-last flatten, (H*W*C, out), with its rows put in the
    order of a channels-first flatten (C*H*W, out): what PyTorch and Equinox read."""
    h, width, c = final_shape
    return np.ascontiguousarray(
        w.reshape(h, width, c, -1).transpose(2, 0, 1, 3).reshape(h * width * c, -1))


def chw_to_hwc_rows(w, final_shape):
    """The inverse of :func:`hwc_to_chw_rows`."""
    h, width, c = final_shape
    return np.ascontiguousarray(
        w.reshape(c, h, width, -1).transpose(1, 2, 0, 3).reshape(h * width * c, -1))


def channels_first(x):
    """A channels-last batch (B, H, W, C) as channels-first (B, C, H, W), copied once, with
    the standard strides: ``np.ascontiguousarray`` would keep the transposed stride of a
    size-1 axis (C = 1), which PyTorch reads as channels_last memory format; Opacus 1.6
    then computes wrong per-sample gradients for the convolutions after the first."""
    return np.moveaxis(x, -1, 1).copy(order="C")


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


# --- the networks as plain JAX functions (the jax.value_and_grad reference) ----------------


def mlp_apply(params, x):
    for w, b in params[:-1]:
        x = jax.nn.relu(x @ w + b)
    w, b = params[-1]
    return x @ w + b


def cnn_apply(params, x):
    """params: the "cnn" :func:`named_weights`; x: (B, H, W, 1)."""
    for w, b in params["convs"]:
        x = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        x = jax.nn.relu(x + b)
        x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    w, b = params["dense"]
    return x.reshape(x.shape[0], -1) @ w + b


def layer_norm_apply(z, scale, offset, eps=1e-5):
    mean = jnp.mean(z, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(z - mean), axis=-1, keepdims=True)
    return (z - mean) * jax.lax.rsqrt(var + eps) * scale + offset


def attention_apply(z, qkv, out, heads: int):
    """DESIGN.md's self_attention on a batch (B, T, D): q, k, v the column blocks of
    z @ qkv.w + qkv.b, head h their contiguous columns [h*D/H:(h+1)*D/H]."""
    (w, b), (w_out, b_out) = qkv, out
    batch, length, d = z.shape
    qkv_ = (z @ w + b).reshape(batch, length, 3, heads, d // heads)
    q, k, v = qkv_[:, :, 0], qkv_[:, :, 1], qkv_[:, :, 2]
    scores = jnp.einsum("bthd,bshd->bhts", q, k) / math.sqrt(d // heads)
    mixed = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(scores, axis=-1), v)
    return mixed.reshape(batch, length, d) @ w_out + b_out


def transformer_apply(params, x, heads: int):
    """params: the "transformer" :func:`named_weights`; x: (B, T, D)."""
    x = x + attention_apply(layer_norm_apply(x, *params["ln1"]), params["qkv"], params["out"],
                            heads)
    (w1, b1), (w2, b2) = params["fc1"], params["fc2"]
    h = jax.nn.gelu(layer_norm_apply(x, *params["ln2"]) @ w1 + b1, approximate=False)
    x = x + h @ w2 + b2
    w, b = params["head"]
    return x.reshape(x.shape[0], -1) @ w + b


def plain_apply(config) -> Callable:
    """The network of ``config`` as a plain function of (named weights, x)."""
    if config.kind == "mlp":
        return mlp_apply
    if config.kind == "cnn":
        return cnn_apply
    return lambda params, x: transformer_apply(params, x, config.heads)


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


def build_reference(net, params, weights, batches, apply=mlp_apply):
    """The same network and step written as plain JAX: jax.value_and_grad + optax."""
    optimizer = optax.adam(LEARNING_RATE)
    p = jax.tree.map(jnp.asarray, weights)

    def step(p, opt_state, x, y):
        loss, grads = jax.value_and_grad(lambda p: cross_entropy(apply(p, x), y))(p)
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


# Equinox: per-example modules, vmapped over the batch


def _equinox_call(model, forward, batches):
    """The Equinox step: ``forward(model, one example)`` vmapped over the batch,
    ``eqx.filter_jit`` (model and optimizer state donated) + optax."""
    import equinox as eqx

    def loss_fn(model, x, y):
        return cross_entropy(jax.vmap(lambda e: forward(model, e))(x), y)

    optimizer = optax.adam(LEARNING_RATE)

    @eqx.filter_jit(donate="all-except-first")
    def step(batch, model, opt_state):
        x, y = batch
        loss, grads = eqx.filter_value_and_grad(loss_fn)(model, x, y)
        updates, opt_state = optimizer.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), opt_state, loss

    holder = {"m": model, "s": optimizer.init(eqx.filter(model, eqx.is_array))}
    next_batch = _cycle(jax_batches(batches))

    def call():
        holder["m"], holder["s"], loss = step(next_batch(), holder["m"], holder["s"])
        return loss.block_until_ready()

    return call


def _eqx_linear(w, b, key):
    import equinox as eqx

    linear = eqx.nn.Linear(w.shape[0], w.shape[1], key=key)
    return eqx.tree_at(lambda l: (l.weight, l.bias), linear,
                       (jnp.asarray(w.T), jnp.asarray(b)))  # eqx stores (out, in)


def build_equinox(net, params, weights, batches):
    keys = jax.random.split(jax.random.key(0), len(weights))
    layers = [_eqx_linear(w, b, key) for key, (w, b) in zip(keys, weights)]

    def forward(layers, x):  # one example; vmapped over the batch
        for layer in layers[:-1]:
            x = jax.nn.relu(layer(x))
        return layers[-1](x)

    return _equinox_call(layers, forward, batches)


def build_equinox_cnn(net, params, weights, batches, config: CNNConfig):
    """eqx.nn.Conv2d / MaxPool2d / Linear, channels first (Equinox's layout, one example
    (C, H, W)): the batches transposed once, outside the step; kernels HWIO -> OIHW, the
    dense rows permuted to the channels-first flatten."""
    import equinox as eqx

    keys = iter(jax.random.split(jax.random.key(0), len(weights["convs"]) + 1))
    convs, c_in = [], 1
    for w, b in weights["convs"]:
        conv = eqx.nn.Conv2d(c_in, w.shape[-1], config.kernel, padding="SAME", key=next(keys))
        conv = eqx.tree_at(lambda c: (c.weight, c.bias), conv,
                           (jnp.asarray(w.transpose(3, 2, 0, 1)),  # HWIO -> OIHW
                            jnp.asarray(b.reshape(-1, 1, 1))))
        convs.append(conv)
        c_in = w.shape[-1]
    w, b = weights["dense"]
    model = {"convs": convs,
             "dense": _eqx_linear(hwc_to_chw_rows(w, config.final_shape()), b, next(keys))}
    pool = eqx.nn.MaxPool2d(2, 2)

    def forward(model, x):  # (C, H, W)
        for conv in model["convs"]:
            x = pool(jax.nn.relu(conv(x)))
        return model["dense"](x.reshape(-1))

    return _equinox_call(model, forward, [(channels_first(x), y) for x, y in batches])


def build_equinox_transformer(net, params, weights, batches, config: TransformerConfig):
    """eqx.nn.LayerNorm / MultiheadAttention (biases on; query / key / value projections
    from the column blocks of qkv.w, the output projection from out.w) / Linear; one
    example (T, D), position-wise layers vmapped over T."""
    import equinox as eqx

    keys = iter(jax.random.split(jax.random.key(0), 8))
    d = config.width

    def layer_norm(scale, offset):
        norm = eqx.nn.LayerNorm(d, eps=1e-5)
        return eqx.tree_at(lambda n: (n.weight, n.bias), norm,
                           (jnp.asarray(scale), jnp.asarray(offset)))

    (w, b), (w_out, b_out) = weights["qkv"], weights["out"]
    attention = eqx.nn.MultiheadAttention(
        config.heads, d, use_query_bias=True, use_key_bias=True, use_value_bias=True,
        use_output_bias=True, key=next(keys))
    attention = eqx.tree_at(
        lambda m: (m.query_proj.weight, m.query_proj.bias, m.key_proj.weight, m.key_proj.bias,
                   m.value_proj.weight, m.value_proj.bias, m.output_proj.weight,
                   m.output_proj.bias),
        attention,
        tuple(jnp.asarray(a) for a in (w[:, :d].T, b[:d], w[:, d:2 * d].T, b[d:2 * d],
                                       w[:, 2 * d:].T, b[2 * d:], w_out.T, b_out)))
    model = {"ln1": layer_norm(*weights["ln1"]), "attention": attention,
             "ln2": layer_norm(*weights["ln2"]),
             "fc1": _eqx_linear(*weights["fc1"], next(keys)),
             "fc2": _eqx_linear(*weights["fc2"], next(keys)),
             "head": _eqx_linear(*weights["head"], next(keys))}

    def forward(m, x):  # (T, D)
        h = jax.vmap(m["ln1"])(x)
        x = x + m["attention"](h, h, h)
        h = jax.nn.gelu(jax.vmap(m["fc1"])(jax.vmap(m["ln2"])(x)), approximate=False)
        x = x + jax.vmap(m["fc2"])(h)
        return m["head"](x.reshape(-1))

    return _equinox_call(model, forward, batches)


# Flax linen: a module, its params as a dict, jax.jit of the step


def _linen_call(model, variables, batches):
    """The linen step, after checking that ``variables`` has the layout of
    ``model.init`` (a renamed submodule would otherwise fail obscurely)."""
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


def _dense_vars(w, b):
    return {"kernel": jnp.asarray(w), "bias": jnp.asarray(b)}


def build_linen(net, params, weights, batches):
    import flax.linen as nn

    widths = [w.shape[1] for w, _ in weights]

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            for width in widths[:-1]:
                x = nn.relu(nn.Dense(width)(x))
            return nn.Dense(widths[-1])(x)

    variables = {"params": {f"Dense_{i}": _dense_vars(w, b) for i, (w, b) in enumerate(weights)}}
    return _linen_call(MLP(), variables, batches)


def build_linen_cnn(net, params, weights, batches, config: CNNConfig):
    """nn.Conv (SAME, HWIO kernels: funcnet's layout) / nn.max_pool / nn.Dense, NHWC."""
    import flax.linen as nn

    channels, k = config.channels, config.kernel

    class CNN(nn.Module):
        @nn.compact
        def __call__(self, x):
            for c in channels:
                x = nn.max_pool(nn.relu(nn.Conv(c, (k, k), padding="SAME")(x)), (2, 2),
                                strides=(2, 2))
            return nn.Dense(CLASSES)(x.reshape(x.shape[0], -1))

    layers = {f"Conv_{i}": _dense_vars(w, b) for i, (w, b) in enumerate(weights["convs"])}
    layers["Dense_0"] = _dense_vars(*weights["dense"])
    return _linen_call(CNN(), {"params": layers}, batches)


def _heads_kernel(w, heads):
    """(D, D) -> (D, H, D/H): head h the contiguous columns, as DESIGN.md lays them out."""
    return jnp.asarray(w.reshape(w.shape[0], heads, -1))


def _flax_attention_params(weights, heads):
    """Flax's query / key / value / out kernels (DenseGeneral) from qkv and out."""
    (w, b), (w_out, b_out) = weights["qkv"], weights["out"]
    d = w.shape[0]
    blocks = {}
    for i, name in enumerate(("query", "key", "value")):
        blocks[name] = {"kernel": _heads_kernel(w[:, i * d:(i + 1) * d], heads),
                        "bias": jnp.asarray(b[i * d:(i + 1) * d].reshape(heads, -1))}
    blocks["out"] = {"kernel": jnp.asarray(w_out.reshape(heads, -1, d)),
                     "bias": jnp.asarray(b_out)}
    return blocks


def build_linen_transformer(net, params, weights, batches, config: TransformerConfig):
    """nn.LayerNorm (epsilon 1e-5) / nn.MultiHeadDotProductAttention (kernels (D, H, D/H)
    from the column blocks of qkv.w) / nn.Dense / nn.gelu(approximate=False)."""
    import flax.linen as nn

    d, heads = config.width, config.heads

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.LayerNorm(epsilon=1e-5)(x)
            x = x + nn.MultiHeadDotProductAttention(num_heads=heads, qkv_features=d,
                                                    out_features=d)(h, h)
            h = nn.gelu(nn.Dense(4 * d)(nn.LayerNorm(epsilon=1e-5)(x)), approximate=False)
            x = x + nn.Dense(d)(h)
            return nn.Dense(CLASSES)(x.reshape(x.shape[0], -1))

    def norm(scale, offset):
        return {"scale": jnp.asarray(scale), "bias": jnp.asarray(offset)}

    variables = {"params": {
        "LayerNorm_0": norm(*weights["ln1"]),
        "MultiHeadDotProductAttention_0": _flax_attention_params(weights, heads),
        "LayerNorm_1": norm(*weights["ln2"]), "Dense_0": _dense_vars(*weights["fc1"]),
        "Dense_1": _dense_vars(*weights["fc2"]), "Dense_2": _dense_vars(*weights["head"])}}
    return _linen_call(Block(), variables, batches)


# Flax NNX: stateful modules, nnx.Optimizer, nnx.jit


def _nnx_call(model, batches):
    from flax import nnx

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


def _nnx_set(module, **values):
    for name, value in values.items():
        getattr(module, name).value = jnp.asarray(value)


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
        _nnx_set(layer, kernel=w, bias=b)
    return _nnx_call(model, batches)


def build_nnx_cnn(net, params, weights, batches, config: CNNConfig):
    """nnx.Conv (SAME, HWIO kernels) / nnx.max_pool / nnx.Linear, NHWC."""
    from flax import nnx

    k = config.kernel
    h, w_, c = config.final_shape()

    class CNN(nnx.Module):
        def __init__(self, rngs):
            self.convs = nnx.List([nnx.Conv(w.shape[2], w.shape[3], (k, k), padding="SAME",
                                            rngs=rngs) for w, _ in weights["convs"]])
            self.dense = nnx.Linear(h * w_ * c, CLASSES, rngs=rngs)

        def __call__(self, x):
            for conv in self.convs:
                x = nnx.max_pool(nnx.relu(conv(x)), (2, 2), strides=(2, 2))
            return self.dense(x.reshape(x.shape[0], -1))

    model = CNN(nnx.Rngs(0))
    for conv, (w, b) in zip(model.convs, weights["convs"]):
        _nnx_set(conv, kernel=w, bias=b)
    _nnx_set(model.dense, kernel=weights["dense"][0], bias=weights["dense"][1])
    return _nnx_call(model, batches)


def build_nnx_transformer(net, params, weights, batches, config: TransformerConfig):
    """nnx.LayerNorm (epsilon 1e-5) / nnx.MultiHeadAttention (kernels (D, H, D/H) from the
    column blocks of qkv.w) / nnx.Linear / nnx.gelu(approximate=False)."""
    from flax import nnx

    d, heads, t = config.width, config.heads, config.length

    class Block(nnx.Module):
        def __init__(self, rngs):
            self.ln1 = nnx.LayerNorm(d, epsilon=1e-5, rngs=rngs)
            self.attention = nnx.MultiHeadAttention(num_heads=heads, in_features=d,
                                                    qkv_features=d, out_features=d,
                                                    decode=False, rngs=rngs)
            self.ln2 = nnx.LayerNorm(d, epsilon=1e-5, rngs=rngs)
            self.fc1 = nnx.Linear(d, 4 * d, rngs=rngs)
            self.fc2 = nnx.Linear(4 * d, d, rngs=rngs)
            self.head = nnx.Linear(t * d, CLASSES, rngs=rngs)

        def __call__(self, x):
            x = x + self.attention(self.ln1(x))
            x = x + self.fc2(nnx.gelu(self.fc1(self.ln2(x)), approximate=False))
            return self.head(x.reshape(x.shape[0], -1))

    model = Block(nnx.Rngs(0))
    for norm, key in ((model.ln1, "ln1"), (model.ln2, "ln2")):
        _nnx_set(norm, scale=weights[key][0], bias=weights[key][1])
    for name, values in _flax_attention_params(weights, heads).items():
        _nnx_set(getattr(model.attention, name), **values)
    for layer, key in ((model.fc1, "fc1"), (model.fc2, "fc2"), (model.head, "head")):
        _nnx_set(layer, kernel=weights[key][0], bias=weights[key][1])
    return _nnx_call(model, batches)


# PyTorch (eager)


def torch_model(config, weights):
    """The network of ``config`` in PyTorch with funcnet's weights copied in: Linear weights
    (out, in); conv kernels HWIO -> OIHW and inputs channels first (N, C, H, W), the dense
    after flatten with its rows permuted to the channels-first flatten; the attention's
    in_proj (3D, D) = qkv.w^T (q, k, v blocks and contiguous heads: PyTorch's layout too)."""
    import torch

    def linear(w, b):
        layer = torch.nn.Linear(w.shape[0], w.shape[1])
        with torch.no_grad():
            layer.weight.copy_(torch.from_numpy(np.ascontiguousarray(w.T)))  # (out, in)
            layer.bias.copy_(torch.from_numpy(np.array(b)))
        return layer

    if config.kind == "mlp":
        modules = []
        for w, b in weights:
            modules += [linear(w, b), torch.nn.ReLU()]
        return torch.nn.Sequential(*modules[:-1])
    if config.kind == "cnn":
        modules = []
        for w, b in weights["convs"]:
            if config.kernel % 2 != 1:
                raise ValueError("PyTorch's padding matches SAME only for odd kernels")
            conv = torch.nn.Conv2d(w.shape[2], w.shape[3], config.kernel,
                                   padding=config.kernel // 2)
            with torch.no_grad():
                conv.weight.copy_(torch.from_numpy(np.ascontiguousarray(w.transpose(3, 2, 0, 1))))
                conv.bias.copy_(torch.from_numpy(np.array(b)))
            modules += [conv, torch.nn.ReLU(), torch.nn.MaxPool2d(2)]
        w, b = weights["dense"]
        return torch.nn.Sequential(*modules, torch.nn.Flatten(),
                                   linear(hwc_to_chw_rows(w, config.final_shape()), b))
    return _torch_block(config, weights, linear)


def _torch_block(config, weights, linear):
    """The transformer block as a torch.nn.Module (the class made here, where torch is
    imported: torch is optional)."""
    import torch
    import torch.nn.functional as F

    class Block(torch.nn.Module):
        """nn.LayerNorm / nn.MultiheadAttention (batch_first) / nn.Linear / F.gelu (exact)."""

        def __init__(self):
            super().__init__()
            d = config.width
            self.ln1 = torch.nn.LayerNorm(d, eps=1e-5)
            self.attention = torch.nn.MultiheadAttention(d, config.heads, batch_first=True)
            self.ln2 = torch.nn.LayerNorm(d, eps=1e-5)
            self.fc1, self.fc2 = linear(*weights["fc1"]), linear(*weights["fc2"])
            self.head = linear(*weights["head"])

        def forward(self, x):
            h = self.ln1(x)
            x = x + self.attention(h, h, h, need_weights=False)[0]
            x = x + self.fc2(F.gelu(self.fc1(self.ln2(x))))
            return self.head(x.flatten(1))

    block = Block()
    (w, b), (w_out, b_out) = weights["qkv"], weights["out"]
    with torch.no_grad():
        for norm, key in ((block.ln1, "ln1"), (block.ln2, "ln2")):
            norm.weight.copy_(torch.from_numpy(np.array(weights[key][0])))
            norm.bias.copy_(torch.from_numpy(np.array(weights[key][1])))
        block.attention.in_proj_weight.copy_(torch.from_numpy(np.ascontiguousarray(w.T)))
        block.attention.in_proj_bias.copy_(torch.from_numpy(np.array(b)))
        block.attention.out_proj.weight.copy_(torch.from_numpy(np.ascontiguousarray(w_out.T)))
        block.attention.out_proj.bias.copy_(torch.from_numpy(np.array(b_out)))
    return block


def torch_inputs(config, x):
    """A numpy batch in PyTorch's layout: channels first for the CNN."""
    return channels_first(x) if config.kind == "cnn" else x


def torch_device():
    """Where the PyTorch contenders run: CUDA when JAX's default backend is a GPU and
    PyTorch sees CUDA (both sides on the same kind of device), else the CPU."""
    import torch

    if jax.default_backend() == "gpu" and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def torch_blocking(call, device):
    """``call`` made to return only once its work is done, as ``jax.block_until_ready``
    does on the JAX side, so that a timer read after it measures finished work: on CUDA,
    which runs asynchronously, ``call`` followed by ``torch.cuda.synchronize``; on the CPU,
    where PyTorch's eager ops are done when they return, ``call`` itself."""
    if device.type != "cuda":
        return call
    import torch

    def blocked():
        result = call()
        torch.cuda.synchronize(device)
        return result

    return blocked


def build_torch(net, params, weights, batches, threads: int, config):
    """The PyTorch step on :func:`torch_device`, the model and batches moved there once."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)  # the CPU's threads: harmless when the step runs on CUDA
    device = torch_device()
    model = torch_model(config, weights).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    next_batch = _cycle([(torch.from_numpy(torch_inputs(config, x)).to(device),
                          torch.from_numpy(y.astype(np.int64)).to(device))
                         for x, y in batches])

    def call():
        x, y = next_batch()
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return torch_blocking(call, device)


# --- peers that may be absent ---------------------------------------------------------------


def peer_status(module: str):
    """(status, detail): ("ok", version) when ``module`` imports, else ("absent", why)."""
    try:
        imported = importlib.import_module(module)
    except Exception as error:  # ImportError, or a broken install
        return "absent", f"not installed ({type(error).__name__}: {error}); pip install -e '.[bench]'"
    top = sys.modules.get(module.split(".")[0], imported)
    return "ok", str(getattr(top, "__version__", "?"))


def builders(threads: int, config) -> Dict[str, Callable]:
    """The builders of every contender for ``config``'s kind."""
    torch_ = lambda *a: build_torch(*a, threads=threads, config=config)  # noqa: E731
    if config.kind == "mlp":
        return {FUNCNET: build_funcnet, REFERENCE: build_reference, "equinox": build_equinox,
                "flax.linen": build_linen, "flax.nnx": build_nnx, "torch (eager)": torch_}
    by_kind = {"cnn": (build_equinox_cnn, build_linen_cnn, build_nnx_cnn),
               "transformer": (build_equinox_transformer, build_linen_transformer,
                               build_nnx_transformer)}
    equinox_, linen_, nnx_ = (lambda *a, b=b: b(*a, config=config) for b in by_kind[config.kind])
    return {FUNCNET: build_funcnet,
            REFERENCE: lambda *a: build_reference(*a, apply=plain_apply(config)),
            "equinox": equinox_, "flax.linen": linen_, "flax.nnx": nnx_,
            "torch (eager)": torch_}


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
    params = jax.tree.map(jnp.asarray, weights)
    grads = jax.tree.map(lambda a: jnp.full_like(a, 1e-3), params)

    def update(params, opt_state, grads):
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    update = jax.jit(update, donate_argnums=(0, 1))
    holder = {"p": params, "s": optimizer.init(params)}

    def call():
        holder["p"], holder["s"] = update(holder["p"], holder["s"], grads)
        return jax.block_until_ready(jax.tree.leaves(holder["p"])[0])

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


def run_config(config, classes: int, names: Sequence[str], statuses, threads: int,
               peak_sizes: Sequence[int], repeats: int, warmup: int, seed: int, block: int):
    """One configuration: build every contender, time them interleaved; the rows."""
    net, params, weights, batches = make_problem(config, classes, seed)
    build = builders(threads, config)
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
    summary = {"config": config._asdict(), "kind": config.kind, "label": config.label,
               "n_params": config.n_params(), "flops_per_step": flops,
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
            "jax_backend": jax.default_backend(), "jax_device_kind": jax.devices()[0].device_kind,
            "platform": platform.platform(),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def backend_label(m: Dict[str, Any]) -> str:
    """The backend JAX ran on, as the reports' titles name it: "CPU", or e.g.
    "GPU (NVIDIA H200)"."""
    backend = m["jax_backend"].upper()
    return backend if backend == "CPU" else f"{backend} ({m['jax_device_kind']})"


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
        limit = REFERENCE_TARGETS[summary["kind"]]
        ratio = by[label, FUNCNET].get("step_ms", math.nan) / by[label, REFERENCE].get("step_ms", math.nan)
        targets.append(target_row(f"{label}: funcnet / jax.value_and_grad step time", ratio,
                                  f"<= {limit:.2f}", ratio <= limit))
    if tiny_rows:  # the tiny net runs with the MLP configurations
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
    backend = backend_label(results["machine"])
    torch_device = results["settings"]["torch_device"]
    lines = [f"# Train step against peers (forward + backward + Adam, float32, {backend})", "",
             machine_line(results["machine"], results["load_average_end"])
             + (f" PyTorch on {torch_device}." if torch_device else ""), "",
             "Median step time over {repeats} rounds after {warmup} warm-up rounds, each "
             "running every contender (in a random order) for {block} consecutive steps, "
             "the first left out (tiny net: {tiny_repeats} rounds of {tiny_block}); "
             "time / funcnet (ratio of medians; > 1: funcnet is faster) and paired ratio "
             "(the ratio within each round, then the median over rounds: robust to load "
             "that drifts between rounds); compile s = first call - median; "
             "GFLOP/s from 3 x the forward's matmul and convolution FLOPs per step (MLP: "
             "6 * batch * sum(fan_in * fan_out)), against the XLA matmul peak measured in "
             "the same rounds; loss at step 1: every contender starts from funcnet's "
             "weights and sees the same batches, so these agree.".format(**results["settings"]),
             ""]
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
    if results["tiny_rows"]:
        lines += ["## Per-step overhead: " + results["tiny"]["label"], "",
                  table(results["tiny_rows"], ["library", "status", "step_ms", "iqr_ms",
                                               "step_ms_min", "ratio_to_funcnet",
                                               "paired_ratio_to_funcnet", "compile_s"],
                        ["library", "status", "step ms (median)", "IQR ms", "min ms",
                         "time / funcnet", "paired ratio", "compile s"]), ""]
    peaks = results["matmul_peaks"]
    best = max(peaks, key=lambda r: r["xla_gflops"])
    best_numpy = max(r["numpy_gflops"] for r in peaks)
    on_cpu = results["machine"]["jax_backend"] == "cpu"
    numpy_ = "numpy" if on_cpu else "host CPU numpy"
    if on_cpu:
        about_peaks = (f"XLA's CPU matmul peak ({best['xla_gflops']:.3g} GFLOP/s) stands at "
                       f"{best['xla_gflops'] / best_numpy:.2f}x the best library matmul on "
                       f"this machine (numpy's, {best_numpy:.3g} GFLOP/s; numpy / XLA = "
                       f"{best_numpy / best['xla_gflops']:.2f}): a fraction of XLA's peak is "
                       f"not a fraction of the hardware's.")
    else:
        about_peaks = (f"XLA's matmul peak on the {backend}: {best['xla_gflops']:.3g} GFLOP/s; "
                       f"numpy's ({best_numpy:.3g} GFLOP/s) is the host CPU's, for reference: "
                       f"the fractions above are of XLA's peak on the {backend}.")
    lines += ["## Matmul peaks (square float32, interleaved)", "",
              table(peaks, ["n", "xla_gflops", "numpy_gflops_default_threads",
                            "numpy_gflops_1_thread", "numpy_over_xla"],
                    ["n", "XLA jnp.dot GFLOP/s", f"{numpy_} np.dot GFLOP/s (default threads)",
                     f"{numpy_}, 1 thread", f"best {numpy_} / XLA"]), "",
              about_peaks, ""]
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
    parser.add_argument("--configs", nargs="+", choices=KINDS, default=None,
                        help="which kinds of configuration to run (default all: "
                             "the three MLPs, with the tiny net, the CNN and the transformer)")
    parser.add_argument("--quick", action="store_true",
                        help="toy configurations, 128/256 matmuls, few repeats (a smoke run)")
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed")
    args = parser.parse_args(argv)
    kinds = args.configs or KINDS
    configs = [c for c in (QUICK_CONFIGS if args.quick else CONFIGS) if c.kind in kinds]
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
    torch_on = (str(torch_device()) if statuses.get("torch (eager)", ("absent",))[0] == "ok"
                else None)
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
    tiny_rows, tiny = [], None
    if "mlp" in kinds:
        tiny_rows, tiny = run_config(TINY, TINY_CLASSES, names, statuses, threads, [],
                                     tiny_repeats, 1, args.seed, tiny_block)
    for row in tiny_rows:
        row.pop("samples_ms", None)
        row.pop("first_of_block_ms", None)

    results = {
        "benchmark": NAME,
        "settings": {"repeats": repeats, "warmup": warmup, "block": block,
                     "tiny_repeats": tiny_repeats, "tiny_block": tiny_block,
                     "peak_sizes": peak_sizes, "kinds": list(kinds),
                     "threads_torch": threads, "torch_device": torch_on,
                     "quick": args.quick, "seed": args.seed,
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
