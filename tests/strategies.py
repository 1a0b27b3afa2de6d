"""Hypothesis strategies for random funcnet networks, losses and targets, in float64.

``cases()`` draws a :class:`Case`: a random network (1 to 8 top-level layers mixing dense
layers, every activation, nested chains and residuals, and, as a modest fraction of the
draws, user layers built with ``fnet.layer`` -- some bringing their own
``"per_example_grads"`` rule -- and repeats ``fnet.repeat(block, n)``), its float64
params, a batch of inputs, a loss and matching targets. Everything random about a case
comes from hypothesis draws (structure, widths, a seed), so failures shrink and replay.

User layers and repeats are opt-in (``extras=True``) in the lower-level strategies
(:func:`layers`, :func:`chains`, :func:`residuals`, :func:`networks`), so that other test
modules drawing from them keep their own distributions; :func:`cases` turns them on.

Numbers come from numpy's generator seeded by the drawn seed, not from ``jax.random``:
every ``jax.random`` call on a new shape compiles (about 0.3 s each on a small CPU), which
alone would cost more than the whole test budget. The params' structure, shapes and dtypes
are still exactly what ``net.init(jax.random.key(seed), (in_width,))`` builds (read with
``jax.eval_shape``, no FLOPs); their values are drawn like Dense's LeCun normal init, with
nonzero biases so that bias paths are exercised.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import strategies as st

import funcnet as fnet

MAX_DEPTH = 8      # top-level layers
MAX_WIDTH = 32     # input width and dense widths
MAX_BATCH = 6
MAX_NESTING = 2    # chains inside chains inside the top-level chain

MAX_REPEAT = 3     # copies in a drawn repeat

# Every activation, and flatten (the identity on the vectors used here).
PARAMETERLESS = (
    fnet.relu, fnet.tanh, fnet.sigmoid, fnet.softplus, fnet.gelu, fnet.identity,
    fnet.flatten,
)


# ---------------------------------------------------------------------------------------
# User layers, built with fnet.layer from module-level functions (so that equal layers are
# the same layer across draws, and funcnet's per-layer compile caches are reused). All of
# them keep the per-example shape (width,), so they may also be repeated.

def _init_scale(key, in_shape):
    return {"scale": 1.0 + 0.5 * jax.random.normal(key, in_shape[-1:])}


def _scale(w, z):
    """Elementwise scale: z * w["scale"], params {"scale": (width,)}."""
    return w["scale"][None] * z


def _scale_per_example_grads(layer, params, z, q):
    """The scale's own rule: A_b^T q_b = z_b * q_b, no per-example pullback."""
    del layer, params
    return {"scale": z * q}


def _init_affine_sin(key, in_shape):
    width = in_shape[-1]
    return {"w": jax.random.normal(key, (width, width)) / jnp.sqrt(width),
            "b": jnp.zeros((width,))}


def _affine_sin(w, z):
    """sin(z @ w["w"] + w["b"]), params {"w": (width, width), "b": (width,)}."""
    return jnp.sin(z @ w["w"] + w["b"][None])


def _affine_sin_per_example_grads(layer, params, z, q):
    """The affine+sin map's own rule: with u_b = z_b w + b and r_b = cos(u_b) * q_b,
    A_b^T q_b = (z_b r_b^T, r_b), no per-example pullback."""
    del layer
    r = jnp.cos(z @ params["w"] + params["b"][None]) * q
    return {"w": jnp.einsum("bi,bo->bio", z, r), "b": r}


def _sine(w, z):
    """Parameterless: sin(z)."""
    del w
    return jnp.sin(z)


USER_LAYERS = (
    fnet.layer(_scale, _init_scale, name="user scale"),
    fnet.layer(_scale, _init_scale, name="user scale with rule",
               rules={"per_example_grads": _scale_per_example_grads}),
    fnet.layer(_affine_sin, _init_affine_sin, name="user affine-sin"),
    fnet.layer(_affine_sin, _init_affine_sin, name="user affine-sin with rule",
               rules={"per_example_grads": _affine_sin_per_example_grads}),
    fnet.layer(_sine, name="user sin"),
)


# ---------------------------------------------------------------------------------------
# User-defined losses: any loss(outputs, targets) -> scalar batch mean must work.

def cosh_loss(out, y):
    """Mean over the batch of sum_k cosh(out_k - y_k)."""
    return jnp.mean(jnp.sum(jnp.cosh(out - y), axis=1))


def huber_loss(out, y, delta=0.75):
    """Mean over the batch of the summed Huber function of out - y."""
    d = jnp.abs(out - y)
    per_entry = jnp.where(d <= delta, 0.5 * d * d, delta * (d - 0.5 * delta))
    return jnp.mean(jnp.sum(per_entry, axis=1))


# ---------------------------------------------------------------------------------------
# Networks.

class Net(NamedTuple):
    layer: fnet.Layer
    out_width: int
    description: str


def activations():
    """Every activation layer, leaky_relu with a drawn slope included."""
    # (no subnormal slopes: XLA may flush those to zero in one program and not another)
    slopes = st.one_of(st.just(0.0), st.floats(1e-3, 1.0))
    leaky = slopes.map(fnet.leaky_relu)
    return st.one_of(st.sampled_from(PARAMETERLESS), leaky)


def _activation_net(layer):
    return lambda width: Net(layer, width, layer.name)


@st.composite
def dense_layers(draw, width, max_width=MAX_WIDTH, out_width=None):
    """A dense layer from ``width`` to a drawn width (or to ``out_width``)."""
    out = draw(st.integers(1, max_width)) if out_width is None else out_width
    bias = draw(st.booleans())
    return Net(fnet.dense(out, bias=bias), out, f"dense({out}{'' if bias else ', no bias'})")


def user_layers():
    """A user layer (``fnet.layer``): a scale or an affine+sin map, each with or without
    its own ``per_example_grads`` rule, or the parameterless sin."""
    return st.sampled_from(USER_LAYERS)


def _user_net(layer):
    return lambda width: Net(layer, width, layer.name)


@st.composite
def repeats(draw, width, max_width=MAX_WIDTH, nesting=1):
    """``fnet.repeat(block, n)``, n in 1..MAX_REPEAT, of a block keeping shape (width,):
    dense(width) with an activation, a residual, a user layer or a chain ending at width."""
    kind = draw(st.sampled_from(["dense", "residual", "user", "chain"]))
    if kind == "dense":
        block = draw(dense_layers(width, max_width, out_width=width))
        activation = draw(activations())
        block = Net(fnet.chain(block.layer, activation),
                    width, f"chain({block.description}, {activation.name})")
    elif kind == "residual":
        block = draw(residuals(width, max_width, nesting + 1, extras=True))
    elif kind == "user":
        block = _user_net(draw(user_layers()))(width)
    else:
        block = draw(chains(width, max_width, nesting + 1, max_length=2, end_width=width,
                            extras=True))
    n = draw(st.integers(1, MAX_REPEAT))
    return Net(fnet.repeat(block.layer, n), width, f"repeat({block.description}, {n})")


@st.composite
def layers(draw, width, max_width=MAX_WIDTH, nesting=0, extras=False):
    """One layer taking per-example shape (width,): dense, activation, chain or residual;
    with ``extras`` also (about one draw in five) a user layer or a repeat."""
    kinds = ["dense", "activation", "residual"] + (["chain"] if nesting < MAX_NESTING else [])
    if extras:
        kinds = kinds * 2 + ["user"] + (["repeat"] if nesting < MAX_NESTING else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "dense":
        return draw(dense_layers(width, max_width))
    if kind == "activation":
        return _activation_net(draw(activations()))(width)
    if kind == "user":
        return _user_net(draw(user_layers()))(width)
    if kind == "repeat":
        return draw(repeats(width, max_width, nesting))
    if kind == "chain":
        return draw(chains(width, max_width, nesting + 1, max_length=3, extras=extras))
    return draw(residuals(width, max_width, nesting + 1, extras=extras))


@st.composite
def chains(draw, width, max_width=MAX_WIDTH, nesting=1, max_length=3, end_width=None,
           extras=False):
    """A chain of 1..max_length layers; with ``end_width``, a final dense layer ends there."""
    parts = []
    for _ in range(draw(st.integers(1, max_length))):
        part = draw(layers(width, max_width, nesting, extras=extras))
        parts.append(part)
        width = part.out_width
    if end_width is not None and width != end_width:
        part = draw(dense_layers(width, max_width, out_width=end_width))
        parts.append(part)
        width = end_width
    layer = fnet.chain(*(part.layer for part in parts))
    return Net(layer, width, "chain(" + ", ".join(part.description for part in parts) + ")")


@st.composite
def residuals(draw, width, max_width=MAX_WIDTH, nesting=1, extras=False):
    """z + f(z) around a shape-keeping f: a dense layer, an activation or a chain (with
    ``extras`` also a user layer)."""
    kind = draw(st.sampled_from(["dense", "activation", "chain"] + (["user"] if extras else [])))
    if kind == "dense":
        inner = draw(dense_layers(width, max_width, out_width=width))
    elif kind == "activation":
        inner = _activation_net(draw(activations()))(width)
    elif kind == "user":
        inner = _user_net(draw(user_layers()))(width)
    else:
        inner = draw(chains(width, max_width, nesting, max_length=2, end_width=width,
                            extras=extras))
    return Net(fnet.residual(inner.layer), width, f"residual({inner.description})")


@st.composite
def networks(draw, in_width, max_depth=MAX_DEPTH, max_width=MAX_WIDTH, extras=False):
    """A network of 1..max_depth top-level layers on inputs of per-example shape (in_width,);
    with ``extras`` user layers and repeats are drawn too (see :func:`layers`).

    With one top-level layer the net is sometimes that layer itself rather than a chain
    of one (the contract counts a non-chain net as one layer).
    """
    depth = draw(st.integers(1, max_depth))
    parts, width = [], in_width
    for _ in range(depth):
        part = draw(layers(width, max_width, nesting=1, extras=extras))
        parts.append(part)
        width = part.out_width
    if depth == 1 and not draw(st.booleans()):
        return parts[0]
    layer = fnet.chain(*(part.layer for part in parts))
    return Net(layer, width, "chain(" + ", ".join(part.description for part in parts) + ")")


# ---------------------------------------------------------------------------------------
# Losses and targets.

LOSS_KINDS = (
    "squared_error", "logistic", "softmax_labels", "softmax_probs", "cosh", "huber",
)


@st.composite
def losses(draw, batch, width, rng):
    """``(loss, y, description)``: a loss and random targets for outputs (batch, width)."""
    kind = draw(st.sampled_from(LOSS_KINDS))
    shape = (batch, width)
    if kind == "squared_error":
        return fnet.losses.squared_error, jnp.asarray(rng.standard_normal(shape)), kind
    if kind == "logistic":
        if width == 1 and draw(st.booleans()):
            shape = (batch,)  # the documented (B, 1) outputs with (B,) targets
        y = jnp.asarray(rng.integers(0, 2, shape).astype(np.float64))
        return fnet.losses.logistic, y, f"logistic, y {shape}"
    if kind == "softmax_labels":
        y = jnp.asarray(rng.integers(0, width, (batch,)).astype(np.int64))
        return fnet.losses.softmax_cross_entropy, y, "softmax_cross_entropy, integer labels"
    if kind == "softmax_probs":
        logits = 2.0 * rng.standard_normal(shape)
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        y = jnp.asarray(probs / probs.sum(axis=1, keepdims=True))
        return fnet.losses.softmax_cross_entropy, y, "softmax_cross_entropy, probability rows"
    y = jnp.asarray(rng.standard_normal(shape))
    if kind == "cosh":
        return cosh_loss, y, "user loss: cosh"
    return huber_loss, y, "user loss: huber"


# ---------------------------------------------------------------------------------------
# Cases.

class Case(NamedTuple):
    net: fnet.Layer
    params: Any
    x: jax.Array
    y: Any
    loss: Callable
    description: str
    seed: int  # tests seed np.random.default_rng(seed) for tangents and cotangents

    def __repr__(self):
        return f"Case({self.description})"

    def rng(self) -> np.random.Generator:
        return np.random.default_rng([self.seed, 1])


def init_params(net: fnet.Layer, in_width: int, seed: int, rng: np.random.Generator):
    """Params with the structure, shapes and dtypes of ``net.init(key(seed), (in_width,))``,
    in float64: matrices (leaves named "w": dense kernels and the user affine map's,
    (fan_in, out), or (n, fan_in, out) stacked in a repeat) N(0, 1/fan_in) with fan_in
    the second-to-last axis; user scales ("scale") 1 + N(0, 0.25); everything else
    (biases) N(0, 0.25)."""
    def build(key):
        params, out_shape = net.init(key, (in_width,))
        return params

    structs = jax.eval_shape(build, jax.random.key(seed))

    def draw_leaf(path, struct):
        assert jnp.issubdtype(struct.dtype, jnp.floating), struct
        name = jax.tree_util.keystr(path[-1:])
        if name == "['w']":
            assert len(struct.shape) >= 2, (path, struct)
            value = rng.standard_normal(struct.shape) / np.sqrt(struct.shape[-2])
        elif name == "['scale']":
            value = 1.0 + 0.5 * rng.standard_normal(struct.shape)
        else:
            value = 0.5 * rng.standard_normal(struct.shape)
        return jnp.asarray(value, jnp.float64)

    return jax.tree_util.tree_map_with_path(draw_leaf, structs)


@st.composite
def cases(draw, max_depth=MAX_DEPTH, max_width=MAX_WIDTH, max_batch=MAX_BATCH, extras=True):
    """A random network with float64 params, inputs x (B, in_width), a loss and targets;
    ``extras``: user layers and repeats among its layers (see :func:`layers`)."""
    in_width = draw(st.integers(1, max_width))
    net = draw(networks(in_width, max_depth, max_width, extras=extras))
    batch = draw(st.integers(1, max_batch))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng([seed, 0])

    params = init_params(net.layer, in_width, seed, rng)
    out_shape = jax.eval_shape(net.layer.apply, params,
                               jax.ShapeDtypeStruct((batch, in_width), jnp.float64)).shape
    assert out_shape == (batch, net.out_width), (out_shape, net.description)

    x = rng.standard_normal((batch, in_width))
    zeros = draw(st.booleans())
    if zeros:
        # exact zeros: relu's kink at 0 (directly, or through bias-free dense layers)
        x[rng.random(x.shape) < 0.5] = 0.0
    x = jnp.asarray(x)
    loss, y, loss_description = draw(losses(batch, net.out_width, rng))

    description = (
        f"{net.description} on x {x.shape}{' with zeros' if zeros else ''}, out "
        f"({batch}, {net.out_width}), {loss_description}, seed {seed}"
    )
    return Case(net.layer, params, x, y, loss, description, seed)


def top_level_layers(net: fnet.Layer, params) -> Tuple[Tuple[fnet.Layer, ...], Tuple]:
    """The contract's top-level layers: a chain's own layers, or the net as a chain of one."""
    if isinstance(net, fnet.Chain):
        return tuple(net.layers), tuple(params)
    return (net,), (params,)
