"""The curvature extensions and products against JAX's own second derivatives.

For a batch of B examples, J_b = d net(w, x_b) / d w, H_b = the Hessian of example b's own
loss l_b at its output, G = mean_b J_b^T H_b J_b (the GGN) and H = the Hessian of the
batch loss in w. References, in float64 and jitted once per network:

- H by ``jax.hessian`` of the loss of the flattened params (``ravel_pytree``);
- J by ``jax.jacfwd`` of the outputs in the flattened params, H_b by ``jax.vmap`` of
  ``jax.hessian`` of the loss on one example, and J_b^T H_b J_b formed explicitly.

Compared at a relative error of 1e-10, leaf by leaf (relative to the reference leaf's
largest entry):

- ``diag_ggn`` (diag G), ``batch_diag_ggn`` (diag J_b^T H_b J_b), ``diag_hessian``
  (diag H, where allowed) and ``kflr`` (its G at the output layer is mean_b H_b, its
  A at the first layer is mean xbar xbar^T, diag of its G is diag_ggn of the bias, and
  the None slots) on small chains holding every layer type: dense, every activation,
  residual, repeat (of curved blocks for the GGN kinds, of linear ones for diag_hessian),
  conv with max and avg pooling and flatten, layer_norm, self_attention, a user layer,
  embedding on integer inputs with reshape and a dense layer on sequences, dropout with a
  key. The losses: the three of ``fnet.losses`` (logistic with (B, k) and (B,) targets,
  softmax with labels and with probability rows) and a user-defined convex loss (cosh,
  through the eigendecomposition path). One net with a repeat, a residual and curved
  activations runs every extension under every memory policy, jitted and eagerly;
- ``ggn_vp`` and ``hvp`` against G @ v and H @ v, jitted, and under ``jax.vmap`` over v,
  with dropout's key;
- ``kflr`` on a dense chain: for B = 1, kron(A, G) is exactly the GGN block of [w; b]
  (row-major), with and without bias; for B = 3, A and G by their definitions (and the
  Kronecker product is then NOT the block); a repeat's stacked pairs equal those of the
  copies written out;
- ``diag_ggn_mc`` and ``kfac`` (2 samples): averages over 200 fixed keys (one jitted
  vmap) converge to ``diag_ggn`` and kflr's G within five standard errors estimated from
  the draws, while one draw is far off; kfac's A is kflr's; the estimate depends on the
  key alone; no key is an error;
- a hypothesis property test over random dense/activation/residual chains and losses
  (``tests/strategies.py``), jitted and eager, for ``diag_ggn`` and ``diag_hessian``;
- errors: ``diag_hessian`` refusing layers with unknown second derivatives (naming the
  layer) and repeats of curved activations; a non-PSD loss for the GGN kinds, while
  ``diag_hessian`` of such a loss is exact (signed factors); bad ``samples``.

Small shapes throughout, and few networks: every one compiles its own programs and
references (about 1-2 s of CPU each), which is most of this file's time.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.flatten_util import ravel_pytree

import funcnet as fnet

# pytest runs with --import-mode=importlib; conftest puts tests/ on sys.path.
from exactness import assert_close, random_params, rel_err  # noqa: E402
from strategies import USER_LAYERS, cases, cosh_loss  # noqa: E402

E = fnet.extensions
POLICIES = ("keep", "sqrt", "recompute")
GGN_EXTENSIONS = (E.diag_ggn(), E.batch_diag_ggn(), E.kflr())
ALL_EXTENSIONS = GGN_EXTENSIONS + (E.diag_hessian(),)
PAIR = "pair"  # an expected (A, G) slot of kflr


# ---------------------------------------------------------------------------------------
# Problems and references.

def targets(kind: str, out_shape, batch: int, rng):
    """(loss, y) for outputs (batch, *out_shape)."""
    shape = (batch,) + tuple(out_shape)
    if kind == "squared_error":
        return fnet.losses.squared_error, jnp.asarray(rng.standard_normal(shape))
    if kind == "logistic":
        return fnet.losses.logistic, jnp.asarray(rng.integers(0, 2, shape).astype(np.float64))
    if kind == "logistic_vector":  # outputs (B, 1), targets (B,)
        assert tuple(out_shape) == (1,)
        return fnet.losses.logistic, jnp.asarray(rng.integers(0, 2, (batch,)).astype(np.float64))
    if kind == "softmax":
        labels = rng.integers(0, out_shape[-1], (batch,)).astype(np.int64)
        return fnet.losses.softmax_cross_entropy, jnp.asarray(labels)
    if kind == "softmax_probs":
        logits = rng.standard_normal(shape)
        probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        return fnet.losses.softmax_cross_entropy, jnp.asarray(probs)
    if kind == "cosh":  # a user-defined convex loss: the eigendecomposition path
        return cosh_loss, jnp.asarray(0.5 * rng.standard_normal(shape))
    raise AssertionError(kind)


class Case(NamedTuple):
    name: str
    net: fnet.Layer
    in_shape: Tuple[int, ...]
    batch: int
    loss_kind: str
    hessian: bool           # diag_hessian allowed
    kflr: Any               # the expected pattern of kflr's slots (PAIR / None)
    stochastic: bool = False
    embedding: Optional[int] = None  # integer inputs in [0, embedding)

    def __repr__(self):
        return self.name

    def problem(self, seed=0):
        """(params, x, y, loss, key) in float64."""
        rng = np.random.default_rng(seed)
        params, out_shape = random_params(self.net, self.in_shape, rng)
        shape = (self.batch,) + self.in_shape
        if self.embedding is None:
            x = jnp.asarray(rng.standard_normal(shape))
        else:
            x = jnp.asarray(rng.integers(0, self.embedding, shape).astype(np.int32))
        loss, y = targets(self.loss_kind, out_shape, self.batch, rng)
        key = jax.random.key(seed + 7) if self.stochastic else None
        return params, x, y, loss, key


def example_loss_hessians(loss, out, y):
    """(B, C, C): the Hessian of each example's own loss at its output, by jax.hessian on
    that example alone."""
    size = int(np.prod(out.shape[1:]))

    def one(o, y_b):
        h = jax.hessian(lambda o_: loss(o_[None], jax.tree.map(lambda a: a[None], y_b)))(o)
        return h.reshape(size, size)

    return jax.vmap(one)(out, y)


class Reference(NamedTuple):
    per_example: jax.Array    # (B, P, P): J_b^T H_b J_b
    loss_hessians: jax.Array  # (B, C, C): H_b
    unravel: Any
    hessian_of: Any           # () -> (P, P): H, compiled only when asked for

    @property
    def ggn(self):
        return jnp.mean(self.per_example, axis=0)

    @property
    def hessian(self):
        return self.hessian_of()

    def diag_ggn(self):
        return self.unravel(jnp.diagonal(self.ggn))

    def batch_diag_ggn(self):
        return jax.vmap(self.unravel)(jnp.diagonal(self.per_example, axis1=1, axis2=2))

    def diag_hessian(self):
        return self.unravel(jnp.diagonal(self.hessian))


def _outputs_fn(net, params, x, key):
    """(flat params, outputs of the flat params) with the net's key, if any."""
    flat, unravel = ravel_pytree(params)

    def outputs(w):
        return net.apply(unravel(w), x) if key is None else net.apply(unravel(w), x, key=key)

    return flat, outputs


@functools.lru_cache(maxsize=None)
def ggn_reference_fn(net, loss):
    """(B, P, P) J_b^T H_b J_b and (B, C, C) H_b: J by jax.jacfwd, H_b by jax.hessian of
    the loss on each example alone."""
    @jax.jit
    def fn(params, x, y, key):
        flat, outputs = _outputs_fn(net, params, x, key)
        out = outputs(flat)
        jac = jax.jacfwd(outputs)(flat).reshape(out.shape[0], -1, flat.size)  # (B, C, P)
        loss_hessians = example_loss_hessians(loss, out, y)
        per_example = jnp.einsum("bcp,bcd,bdq->bpq", jac, loss_hessians, jac,
                                 precision="highest")
        return per_example, loss_hessians

    return fn


@functools.lru_cache(maxsize=None)
def hessian_reference_fn(net, loss):
    """(P, P): jax.hessian of the batch loss in the flattened params."""
    @jax.jit
    def fn(params, x, y, key):
        flat, outputs = _outputs_fn(net, params, x, key)
        return jax.hessian(lambda w: loss(outputs(w), y))(flat)

    return fn


def reference(net, loss, params, x, y, key=None) -> Reference:
    per_example, loss_hessians = ggn_reference_fn(net, loss)(params, x, y, key)
    hessian_of = functools.lru_cache(maxsize=None)(
        lambda: hessian_reference_fn(net, loss)(params, x, y, key))
    return Reference(per_example, loss_hessians, ravel_pytree(params)[1], hessian_of)


@functools.lru_cache(maxsize=None)
def _case_reference(case: Case) -> Reference:
    params, x, y, loss, key = case.problem()
    return reference(case.net, loss, params, x, y, key)


@functools.lru_cache(maxsize=None)
def extensions_fn(net, loss, extensions, remat="keep", jit=True):
    """(params, x, y, key) -> record.extensions of one backprop."""
    def fn(params, x, y, key=None):
        return fnet.backprop(net, loss, params, x, y, extensions=extensions, remat=remat,
                             key=key).extensions

    return jax.jit(fn) if jit else fn


def is_pair(node) -> bool:
    return (isinstance(node, tuple) and len(node) == 2
            and all(isinstance(a, jax.Array) for a in node))


def pattern(result):
    """kflr's result with every (A, G) pair replaced by PAIR."""
    if is_pair(result):
        return PAIR
    if isinstance(result, tuple):
        return tuple(pattern(item) for item in result)
    assert result is None, result
    return None


def pairs_with_params(result, params):
    """[(A, G, dense params)] for every pair of kflr's result, with the dense layer's
    params (stacked along a copy axis in a repeat)."""
    if is_pair(result):
        return [(result[0], result[1], params)]
    if isinstance(result, tuple):
        return [item for r, p in zip(result, params) for item in pairs_with_params(r, p)]
    return []


def check_curvature(got, ref: Reference, case: Case, params, x, what: str) -> None:
    """Every extension in ``got`` against the reference; kflr by what is exact for any B:
    diag(G) = diag_ggn of the bias, G = mean_b H_b at the output layer, A = mean
    xbar xbar^T at the first layer (the chains here start and end with a vector dense
    layer whenever these apply)."""
    assert_close(got["diag_ggn"], ref.diag_ggn(), f"diag_ggn of {what}")
    assert_close(got["batch_diag_ggn"], ref.batch_diag_ggn(), f"batch_diag_ggn of {what}")
    if "diag_hessian" in got:
        assert_close(got["diag_hessian"], ref.diag_hessian(), f"diag_hessian of {what}")
    kflr = got["kflr"]
    assert pattern(kflr) == case.kflr, (what, pattern(kflr))
    diag = got["diag_ggn"]
    for a, g, p in pairs_with_params(kflr, diag):
        if "b" in p:  # the bias's GGN block is mean_b S_b S_b^T at the output: kflr's G
            assert_close(jnp.diagonal(g, axis1=-2, axis2=-1), p["b"], f"kflr G vs bias, {what}")
        fan_in = p["w"].shape[-2] + ("b" in p)
        assert a.shape[-2:] == (fan_in, fan_in), what
    if is_pair(kflr[-1]):  # the output layer: G = mean_b H_b
        assert_close(kflr[-1][1], jnp.mean(ref.loss_hessians, axis=0), f"kflr G at the top, {what}")
    if is_pair(kflr[0]):  # the first layer, whose input is x: A = mean_b xbar xbar^T
        xbar = jnp.concatenate([x, jnp.ones((x.shape[0], 1))], axis=1) if "b" in diag[0] else x
        assert_close(kflr[0][0], xbar.T @ xbar / x.shape[0], f"kflr A at the bottom, {what}")


# ---------------------------------------------------------------------------------------
# The networks: every layer type.

#: Curved activations, a residual around one, a repeat of linear layers (leaky_relu).
POLICY_CASE = Case(
    "tanh, residual(sigmoid), repeat of dense+leaky_relu",
    fnet.chain(fnet.dense(3), fnet.tanh, fnet.residual(fnet.chain(fnet.dense(3), fnet.sigmoid)),
               fnet.repeat(fnet.chain(fnet.dense(3), fnet.leaky_relu(0.1)), 2), fnet.dense(2)),
    (3,), 3, "softmax", hessian=True, kflr=(PAIR, None, (PAIR, None), (PAIR, None), PAIR))

CASES = (
    Case("repeat of curved blocks, residual, layer_norm",
         fnet.chain(fnet.dense(3), fnet.repeat(fnet.chain(fnet.dense(3), fnet.tanh), 2),
                    fnet.residual(fnet.dense(3)), fnet.layer_norm(), fnet.dense(2)),
         (3,), 2, "squared_error", hessian=False, kflr=(PAIR, (PAIR, None), PAIR, None, PAIR)),
    Case("conv, max_pool, avg_pool, flatten",
         fnet.chain(fnet.conv(3, 2), fnet.relu, fnet.max_pool(2), fnet.tanh,
                    fnet.avg_pool(2, stride=1, padding="SAME"),
                    fnet.conv(2, 2, padding="VALID", bias=False), fnet.flatten, fnet.dense(2)),
         (4, 4, 2), 2, "logistic", hessian=True, kflr=(None,) * 7 + (PAIR,)),
    Case("self_attention, layer_norm, dense on sequences, reshape, user layer",
         fnet.chain(fnet.self_attention(2), fnet.layer_norm(), fnet.dense(3), fnet.tanh,
                    fnet.reshape((-1,)), USER_LAYERS[0], fnet.dense(2)),
         (2, 2), 2, "softmax_probs", hessian=False, kflr=(None,) * 6 + (PAIR,)),
    Case("embedding, dense on sequences, flatten",
         fnet.chain(fnet.embedding(5, 3), fnet.dense(2), fnet.softplus, fnet.flatten,
                    fnet.dense(3)),
         (3,), 3, "cosh", hessian=True, kflr=(None,) * 4 + (PAIR,), embedding=5),
    Case("dropout, gelu, softplus, relu, identity",
         fnet.chain(fnet.dense(3), fnet.dropout(0.5), fnet.gelu, fnet.softplus, fnet.dense(3),
                    fnet.relu, fnet.identity, fnet.dense(1)),
         (3,), 3, "logistic_vector", hessian=True,
         kflr=(PAIR, None, None, None, PAIR, None, None, PAIR), stochastic=True),
)


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_every_layer_type(case):
    """diag_ggn, batch_diag_ggn, kflr (and diag_hessian where allowed) in one jitted
    backprop against the references."""
    params, x, y, loss, key = case.problem()
    extensions = ALL_EXTENSIONS if case.hessian else GGN_EXTENSIONS
    got = extensions_fn(case.net, loss, extensions)(params, x, y, key)
    check_curvature(got, _case_reference(case), case, params, x, case.name)


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "eager"])
@pytest.mark.parametrize("remat", POLICIES)
def test_memory_policies(remat, jit):
    """The net with curved activations (one inside a residual) and a repeat of linear
    layers, every extension, under every memory policy, jitted and eagerly."""
    case = POLICY_CASE
    params, x, y, loss, key = case.problem()
    ref = _case_reference(case)
    # the curved terms must matter here, or diag_hessian = diag_ggn would pass unseen
    assert rel_err(jnp.diagonal(ref.hessian), jnp.diagonal(ref.ggn)) > 1e-2
    got = extensions_fn(case.net, loss, ALL_EXTENSIONS, remat, jit)(params, x, y, key)
    check_curvature(got, ref, case, params, x, f"{case.name} ({remat}, jit={jit})")


# ---------------------------------------------------------------------------------------
# Matrix-free products.

def test_ggn_vp_and_hvp():
    """G v and H v against the reference matrices, jitted, for one v and under jax.vmap
    over four, on the net with dropout (a key) and curved activations."""
    case, remat = CASES[4], "keep"
    params, x, y, loss, key = case.problem()
    ref = _case_reference(case)
    flat, unravel = ravel_pytree(params)
    rng = np.random.default_rng(11)
    vs = jnp.asarray(rng.standard_normal((4, flat.size)))
    v_trees = jax.vmap(unravel)(vs)
    ggn_vp = fnet.ggn_vp(case.net, loss, remat)
    hvp = fnet.hvp(case.net, loss, remat)

    @jax.jit
    def products(params, x, y, v, many, key):
        batched = (None, None, None, 0, None)
        return (ggn_vp(params, x, y, v, key=key), hvp(params, x, y, v, key=key),
                jax.vmap(ggn_vp, in_axes=batched)(params, x, y, many, key),
                jax.vmap(hvp, in_axes=batched)(params, x, y, many, key))

    gv, hv, gvs, hvs = products(params, x, y, unravel(vs[0]), v_trees, key)
    assert_close(gv, unravel(ref.ggn @ vs[0]), f"ggn_vp of {case.name}")
    assert_close(hv, unravel(ref.hessian @ vs[0]), f"hvp of {case.name}")
    assert_close(gvs, jax.vmap(unravel)(vs @ ref.ggn.T), f"vmapped ggn_vp of {case.name}")
    assert_close(hvs, jax.vmap(unravel)(vs @ ref.hessian.T), f"vmapped hvp of {case.name}")
    # G and H differ on this net (curved layers), so each product is checked for itself
    assert rel_err(ref.ggn @ vs[0], ref.hessian @ vs[0]) > 1e-3
    # and the key matters: without dropout's masks G v is another vector
    other_key = products(params, x, y, unravel(vs[0]), v_trees, jax.random.key(99))[0]
    assert rel_err(ravel_pytree(other_key)[0], ravel_pytree(gv)[0]) > 1e-3


# ---------------------------------------------------------------------------------------
# Kronecker factors.

KFLR_NET = fnet.chain(fnet.dense(3), fnet.tanh, fnet.dense(3, bias=False), fnet.sigmoid,
                      fnet.dense(2))
DENSE_INDICES = (0, 2, 4)


@functools.lru_cache(maxsize=None)
def _kflr_reference(net, loss):
    """{index: (A, G, exact GGN block of [w; b] row-major)} for every dense layer
    ``net.layers[index]``, by the definitions: z its input from the layers below, G from
    jax.jacfwd of the layers above in that layer's output, the block from jax.jacfwd of the
    outputs in W = [w; b]."""

    def one_layer(params, x, y, index):
        bias = net.layers[index].bias
        above = fnet.chain(*net.layers[index + 1:])
        z = fnet.chain(*net.layers[:index]).apply(params[:index], x) if index else x
        zbar = jnp.concatenate([z, jnp.ones((z.shape[0], 1))], axis=1) if bias else z
        a = zbar.T @ zbar / z.shape[0]
        o = net.layers[index].apply(params[index], z)
        out = above.apply(params[index + 1:], o)
        loss_hessians = example_loss_hessians(loss, out, y)
        jac = jax.vmap(jax.jacfwd(lambda o_b: above.apply(params[index + 1:], o_b[None])[0]))(o)
        g = jnp.mean(jnp.einsum("bck,bcd,bdl->bkl", jac, loss_hessians, jac), axis=0)

        def outputs(w_bar):
            layer_params = {"w": w_bar[:-1], "b": w_bar[-1]} if bias else {"w": w_bar}
            return net.apply(params[:index] + (layer_params,) + params[index + 1:], x)

        w = params[index]["w"]
        w_bar = jnp.concatenate([w, params[index]["b"][None]]) if bias else w
        jw = jax.jacfwd(outputs)(w_bar).reshape(x.shape[0], out.shape[1], w_bar.size)
        block = jnp.mean(jnp.einsum("bck,bcd,bdl->bkl", jw, loss_hessians, jw), axis=0)
        return a, g, block

    @jax.jit
    def fn(params, x, y):
        return {index: one_layer(params, x, y, index) for index, layer in enumerate(net.layers)
                if isinstance(layer, fnet.Dense)}

    return fn


@pytest.mark.parametrize("batch", [1, 3])
def test_kflr_factors(batch):
    """A and G by their definitions at every dense layer (with and without bias); for one
    example kron(A, G) is exactly the GGN block of [w; b], for three it is not."""
    rng = np.random.default_rng(batch)
    params, _ = random_params(KFLR_NET, (4,), rng)
    x = jnp.asarray(rng.standard_normal((batch, 4)))
    loss = fnet.losses.softmax_cross_entropy
    y = jnp.asarray(rng.integers(0, 2, (batch,)))
    got = extensions_fn(KFLR_NET, loss, (E.kflr(),))(params, x, y)["kflr"]
    assert pattern(got) == (PAIR, None, PAIR, None, PAIR)
    expected = _kflr_reference(KFLR_NET, loss)(params, x, y)
    assert sorted(expected) == list(DENSE_INDICES)
    for index, (a, g, block) in expected.items():
        what = f"kflr of layer {index}, B={batch}"
        assert_close(got[index][0], a, f"A, {what}")
        assert_close(got[index][1], g, f"G, {what}")
        kron = jnp.kron(got[index][0], got[index][1])
        if batch == 1:
            assert_close(kron, block, f"kron(A, G) vs the GGN block, {what}")
        else:  # K-FAC's mean of products is not the product of means for several examples
            assert rel_err(kron, block) > 1e-3, what


def test_kflr_in_a_repeat_equals_the_copies_written_out():
    """A repeat of dense layers gives each copy's pair, stacked along the copy axis, equal
    to the pairs of the same layers chained (the repeat's params unstacked)."""
    block = fnet.chain(fnet.dense(3), fnet.tanh)
    repeated = fnet.chain(fnet.dense(3), fnet.repeat(block, 2), fnet.dense(2))
    unrolled = fnet.chain(fnet.dense(3), block, block, fnet.dense(2))
    rng = np.random.default_rng(5)
    params, _ = random_params(repeated, (2,), rng)
    copies = tuple(jax.tree.map(lambda a, k=k: a[k], params[1]) for k in range(2))
    unrolled_params = (params[0],) + copies + (params[2],)
    x = jnp.asarray(rng.standard_normal((3, 2)))
    y = jnp.asarray(rng.standard_normal((3, 2)))
    loss = fnet.losses.squared_error
    got = extensions_fn(repeated, loss, (E.kflr(),))(params, x, y)["kflr"]
    want = extensions_fn(unrolled, loss, (E.kflr(),))(unrolled_params, x, y)["kflr"]
    assert pattern(got) == (PAIR, (PAIR, None), PAIR)
    stacked = jax.tree.map(lambda *a: jnp.stack(a), want[1][0], want[2][0])
    assert_close(got[1][0], stacked, "kflr pairs of the repeat")
    assert_close(got[2], want[3], "kflr above the repeat")
    assert_close(got[0], want[0], "kflr below the repeat")


# ---------------------------------------------------------------------------------------
# Monte Carlo estimates.

MC_NET = fnet.chain(fnet.dense(3), fnet.tanh, fnet.dense(3))
MC_SAMPLES = 2
MC_KEYS = 200
MC_EXTENSIONS = (E.diag_ggn_mc(MC_SAMPLES), E.kfac(MC_SAMPLES), E.diag_ggn(), E.kflr())
#: An error of more than this many standard errors fails. With the keys fixed the test
#: is deterministic; as a statistical statement, an unbiased estimator's mean of 200 draws
#: (nearly Gaussian: each draw is a bounded function of the sampled labels) lies beyond
#: 5 standard errors in one of the ~40 entries with probability below 1e-4, while a
#: biased one (a wrong 1/sqrt(samples) or B factor, a wrong sampling distribution) is off
#: by many: one draw errs by tens of percent, the standard errors are a few percent.
Z_MAX = 5.0


def assert_converges(draws, exact, what):
    """Entry by entry, |mean - exact| <= Z_MAX standard errors (from the draws
    themselves) + rounding; and a single draw is NOT within 1% (the check has teeth)."""
    for d, e in zip(jax.tree.leaves(draws), jax.tree.leaves(exact)):
        d, e = np.asarray(d), np.asarray(e)
        count = d.shape[0]
        mean = d.mean(axis=0)
        standard_error = d.std(axis=0, ddof=1) / np.sqrt(count)
        scale = np.max(np.abs(e))
        excess = np.abs(mean - e) - (Z_MAX * standard_error + 1e-12 * scale)
        z = np.max(np.abs(mean - e) / np.maximum(standard_error, 1e-300))
        assert np.all(excess <= 0), f"{what}: mean of {count} draws off by {z:.2f} standard errors"
        assert rel_err(d[0], e) > 1e-2, f"{what}: one draw already matches: no sampling?"
        assert np.max(standard_error) < 0.2 * scale, f"{what}: too noisy to tell anything"


@functools.lru_cache(maxsize=None)
def _monte_carlo():
    """(params, x, y, loss, keys, run): softmax cross-entropy (targets sampled from the
    categorical predictive distribution) on MC_NET; ``run`` maps keys (K,) to the
    extensions' results, one backprop per key, jitted and vmapped."""
    rng = np.random.default_rng(2)
    params, _ = random_params(MC_NET, (2,), rng)
    x = jnp.asarray(rng.standard_normal((3, 2)))
    loss, y = targets("softmax", (3,), 3, rng)
    one = extensions_fn(MC_NET, loss, MC_EXTENSIONS, jit=False)
    run = jax.jit(jax.vmap(one, in_axes=(None, None, None, 0)))
    keys = jax.random.split(jax.random.key(2024), MC_KEYS)
    return params, x, y, loss, keys, run


def test_monte_carlo_converges():
    """diag_ggn_mc and kfac's G (2 samples per draw), averaged over 200 fixed keys, converge
    to diag_ggn and kflr's G; kfac's A is kflr's A exactly, at every key."""
    params, x, y, loss, keys, run = _monte_carlo()
    got = run(params, x, y, keys)
    exact_diag = jax.tree.map(lambda a: a[0], got["diag_ggn"])  # (checked on other nets)
    assert_converges(got["diag_ggn_mc"], exact_diag, "diag_ggn_mc")
    for index in (0, 2):
        a_mc, g_mc = got["kfac"][index]
        a, g = (m[0] for m in got["kflr"][index])
        assert_close(a_mc, jnp.broadcast_to(a, a_mc.shape), f"kfac A of layer {index}")
        assert_converges(g_mc, g, f"kfac G of layer {index}")


def test_monte_carlo_keys():
    """The estimate depends on the key alone (the same key in another position of the
    vmap gives the same numbers), another key gives another; without a key an
    ArgumentError names "key"."""
    params, x, y, loss, keys, run = _monte_carlo()
    order = np.roll(np.arange(MC_KEYS), 1)
    first, shifted = run(params, x, y, keys), run(params, x, y, keys[order])
    for name in ("diag_ggn_mc", "kfac"):
        assert_close(shifted[name], jax.tree.map(lambda a: a[order], first[name]), name)
    # another key, another estimate: every diag_ggn_mc leaf and kfac's G (A is not sampled)
    sampled = jax.tree.leaves(first["diag_ggn_mc"]) + [g for _, g in first["kfac"][::2]]
    assert min(rel_err(leaf[0], leaf[1]) for leaf in sampled) > 1e-3
    for extension in MC_EXTENSIONS[:2]:
        with pytest.raises(fnet.ArgumentError) as info:
            fnet.backprop(MC_NET, loss, params, x, y, extensions=(extension,))
        assert info.value.argument == "key" and extension.name in str(info.value)


# ---------------------------------------------------------------------------------------
# Property test.

@settings(max_examples=3)
@given(case=cases(max_depth=3, max_width=3, max_batch=3, extras=False), jit=st.booleans())
def test_random_chains(case, jit):
    """diag_ggn and diag_hessian on random chains of dense layers, every activation,
    nested chains and residuals, with random losses (the three, and two user losses:
    cosh and huber, through the eigen path)."""
    extensions = (E.diag_ggn(), E.diag_hessian())
    fn = extensions_fn(case.net, case.loss, extensions, jit=jit)
    got = fn(case.params, case.x, case.y)
    ref = reference(case.net, case.loss, case.params, case.x, case.y)
    what = f"{'jit' if jit else 'eager'} ({case.description})"
    assert_close(got["diag_ggn"], ref.diag_ggn(), f"diag_ggn, {what}")
    assert_close(got["diag_hessian"], ref.diag_hessian(), f"diag_hessian, {what}")


# ---------------------------------------------------------------------------------------
# Errors.

@pytest.mark.parametrize("net,path", [
    (fnet.chain(fnet.dense(3), fnet.layer_norm(), fnet.dense(2)), ((1, "layer_norm"),)),
    (fnet.chain(fnet.dense(4), fnet.self_attention(2)), ((1, "self_attention(2)"),)),
    (fnet.chain(fnet.dense(3), USER_LAYERS[0]), ((1, "user scale"),)),
    (fnet.chain(fnet.dense(3), fnet.residual(fnet.chain(fnet.tanh, fnet.layer_norm()))),
     ((1, "residual(chain)"), (0, "chain"), (1, "layer_norm"))),
    (fnet.chain(fnet.dense(3), fnet.repeat(fnet.chain(fnet.dense(3), fnet.tanh), 2)),
     ((1, "repeat(chain, 2)"),)),
], ids=["layer_norm", "self_attention", "user layer", "nested layer_norm", "repeat of tanh"])
def test_diag_hessian_refuses(net, path):
    """A LayerError naming the layer (its index and name) for layers whose second
    derivatives are unknown and for a repeat of a curved activation, eagerly and under
    jit (the check runs at trace time)."""
    in_shape = (2, 4) if path[-1][1].startswith("self_attention") else (4,)
    rng = np.random.default_rng(0)
    params, out_shape = random_params(net, in_shape, rng)
    x = jnp.asarray(rng.standard_normal((2,) + in_shape))
    y = jnp.asarray(rng.standard_normal((2,) + tuple(out_shape)))
    loss = fnet.losses.squared_error
    for jit in (False, True):
        with pytest.raises(fnet.LayerError) as info:
            extensions_fn(net, loss, (E.diag_hessian(),), jit=jit)(params, x, y)
        assert info.value.path[-len(path):] == path, info.value.path
        index, name = path[-1]
        assert f"layer {index} ({name})" in str(info.value)
        assert ("curved activation" if "repeat" in name else "curvature") in str(info.value)


def _not_convex(out, y):
    """-mean_b ||out_b - y_b||^2: Hessian -2 I in the outputs."""
    return -jnp.mean(jnp.sum(jnp.square(out - y), axis=1))


def test_ggn_of_a_non_convex_loss():
    """The GGN kinds need H_b >= 0: an ArgumentError naming "loss" eagerly, NaN under jit
    (where the eigenvalues are not known when the error would be raised)."""
    net = MC_NET  # (its layers' eager code is compiled already)
    rng = np.random.default_rng(0)
    params, _ = random_params(net, (2,), rng)
    x, y = jnp.asarray(rng.standard_normal((3, 2))), jnp.asarray(rng.standard_normal((3, 3)))
    for extension in (E.diag_ggn(), E.batch_diag_ggn(), E.kflr()):
        with pytest.raises(fnet.ArgumentError) as info:
            fnet.backprop(net, _not_convex, params, x, y, extensions=(extension,))
        assert info.value.argument == "loss" and "positive semi-definite" in str(info.value)
    got = extensions_fn(net, _not_convex, (E.diag_ggn(),))(params, x, y)["diag_ggn"]
    assert all(bool(jnp.all(jnp.isnan(a))) for a in jax.tree.leaves(got))


def _saddle_loss(out, y):
    """mean_b 0.5 ((o_0 - y_0)^2 - (o_1 - y_1)^2): H_b = diag(1, -1), not PSD anywhere."""
    d = out - y
    return 0.5 * jnp.mean(jnp.square(d[:, 0]) - jnp.square(d[:, 1]))


def test_diag_hessian_of_a_non_convex_loss():
    """diag(H) of the batch loss does not need a convex loss (the contract: any user loss
    works wherever a loss is taken)."""
    rng = np.random.default_rng(0)
    params, _ = random_params(MC_NET, (2,), rng)
    x, y = jnp.asarray(rng.standard_normal((3, 2))), jnp.asarray(rng.standard_normal((3, 3)))
    got = fnet.backprop(MC_NET, _saddle_loss, params, x, y, extensions=(E.diag_hessian(),))
    assert_close(got.extensions["diag_hessian"],
                 reference(MC_NET, _saddle_loss, params, x, y).diag_hessian(), "diag_hessian")


@pytest.mark.parametrize("maker", [E.diag_ggn_mc, E.kfac], ids=["diag_ggn_mc", "kfac"])
@pytest.mark.parametrize("samples", [0, -1, 1.5, True, "2"])
def test_bad_samples(maker, samples):
    with pytest.raises(fnet.ArgumentError) as info:
        maker(samples)
    assert "samples" in info.value.argument
