"""Square roots of the loss Hessian (``fnet.hessian_sqrt``, ``fnet.sampled_hessian_sqrt``)
and the argument checks of the curvature products (``fnet.ggn_vp``, ``fnet.hvp``).

For outputs (B, *o) (C = prod(o)) and example b's own loss l_b (the batch loss is the
mean of the l_b), H_b = d2 l_b / d o_b^2 (C x C), by ``jax.hessian`` of the loss on that
example alone. In float64:

- ``hessian_sqrt`` is S (C, B, *o) with sum_m S[m, b] S[m, b]^T = H_b to a relative error
  of 1e-10: the closed forms (squared_error on vector and on (2, 2) outputs, logistic
  with (B, k) and with (B, 1) outputs and (B,) targets, softmax_cross_entropy with labels
  and with probability rows), the eigendecomposition path for user losses (cosh, a
  hand-written softmax cross-entropy whose Hessian is singular, and squared_error
  under another name), jitted, and the closed forms eagerly too;
- a loss whose Hessian is not positive semi-definite raises ArgumentError naming "loss"
  and the example, and gives NaN (that example's columns only) under jit;
- ``sampled_hessian_sqrt`` has shape (samples, B, *o) and its mean of S S^T over 4000
  columns is within five standard errors (estimated from the columns) of H_b, while one
  column is far from it; it depends on the key only (and not on the targets for the
  three built-in losses, whose targets are drawn from the model); bad keys and samples
  raise.
- ``ggn_vp`` and ``hvp`` refuse a v unlike params (structure, shape, dtype) with an error
  naming "v" and the layer; a bad remat or loss, and a missing dropout key, raise too.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import funcnet as fnet

# pytest runs with --import-mode=importlib; conftest puts tests/ on sys.path.
from exactness import assert_close, random_params, rel_err  # noqa: E402
from strategies import cosh_loss  # noqa: E402

L = fnet.losses


def handwritten_softmax_cross_entropy(out, y):
    """logsumexp(o) - o[label], averaged: softmax cross-entropy the eigen path sees as a
    user loss. Its Hessian diag(p) - p p^T is singular (the ones vector is in its null
    space): the smallest eigenvalue is 0, and may come out slightly negative in rounding,
    which the PSD check must tolerate."""
    picked = jnp.take_along_axis(out, y[:, None], axis=1)[:, 0]
    return jnp.mean(jax.nn.logsumexp(out, axis=1) - picked)


def squared_error_copy(out, y):
    """squared_error, but not ``is`` it: the eigen path, whose S S^T must still be I."""
    return L.squared_error(out, y)


def problem(kind: str, seed: int = 0):
    """(loss, out, y) for a kind of loss and target, outputs of batch 3, scale 1.5."""
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(1.5 * rng.standard_normal(shape))  # noqa: E731
    if kind == "squared_error":
        return L.squared_error, normal(3, 4), normal(3, 4)
    if kind == "squared_error (2, 2)":
        return L.squared_error, normal(3, 2, 2), normal(3, 2, 2)
    if kind == "logistic (B, k)":
        return L.logistic, normal(3, 4), jnp.asarray(rng.integers(0, 2, (3, 4)).astype(float))
    if kind == "logistic (B, 1), y (B,)":
        return L.logistic, jnp.asarray([[-2.0], [0.3], [1.2]]), jnp.asarray([0.0, 1.0, 1.0])
    if kind == "softmax labels":
        return L.softmax_cross_entropy, normal(3, 4), jnp.asarray(rng.integers(0, 4, (3,)))
    if kind == "softmax probability rows":
        p = rng.random((3, 4))
        return L.softmax_cross_entropy, normal(3, 4), jnp.asarray(p / p.sum(axis=1, keepdims=True))
    if kind == "user: cosh":
        return cosh_loss, normal(3, 4), 0.5 * normal(3, 4)
    if kind == "user: cosh, C = B":
        return cosh_loss, normal(3, 3), 0.5 * normal(3, 3)
    if kind == "user: softmax cross-entropy":
        labels = jnp.asarray(rng.integers(0, 4, (3,)))
        return handwritten_softmax_cross_entropy, normal(3, 4), labels
    if kind == "user: squared_error copy":
        return squared_error_copy, normal(3, 4), normal(3, 4)
    raise AssertionError(kind)


CLOSED = ("squared_error", "squared_error (2, 2)", "logistic (B, k)", "logistic (B, 1), y (B,)",
          "softmax labels", "softmax probability rows")
EIGEN = ("user: cosh", "user: cosh, C = B", "user: softmax cross-entropy",
         "user: squared_error copy")


@functools.partial(jax.jit, static_argnums=0)
def example_hessians(loss, out, y):
    """(B, C, C): jax.hessian of the loss on each example alone (jitted: eager
    jax.hessian compiles every primitive on its own, which costs seconds)."""
    size = int(np.prod(out.shape[1:]))

    def one(o, y_b):
        h = jax.hessian(lambda o_: loss(o_[None], jax.tree.map(lambda a: a[None], y_b)))(o)
        return h.reshape(size, size)

    return jax.vmap(one)(out, y)


def products(s):
    """(B, C, C): sum over the columns m of S[m, b] S[m, b]^T, S (M, B, *o)."""
    flat = s.reshape(s.shape[0], s.shape[1], -1)
    return jnp.einsum("mbc,mbd->bcd", flat, flat, precision="highest")


# ---------------------------------------------------------------------------------------
# The exact square root.

@pytest.mark.parametrize("kind", CLOSED + EIGEN)
def test_square_root_of_every_example_hessian(kind):
    loss, out, y = problem(kind)
    expected = example_hessians(loss, out, y)
    size = int(np.prod(out.shape[1:]))
    # jitted for all (a rounding-negative eigenvalue taken for a negative one would be NaN
    # there); eagerly for the closed forms (the eager eigen path: test_not_positive_...)
    for jit in (False, True) if kind in CLOSED else (True,):
        fn = jax.jit(fnet.hessian_sqrt, static_argnums=0) if jit else fnet.hessian_sqrt
        s = fn(loss, out, y)
        assert s.shape == (size,) + out.shape and s.dtype == out.dtype, (kind, s.shape)
        assert_close(products(s), expected, f"S S^T of {kind} (jit={jit})")
    # the examples' Hessians differ here (but for squared_error's I), so S must be per example
    if kind not in ("squared_error", "squared_error (2, 2)", "user: squared_error copy"):
        assert rel_err(expected, jnp.broadcast_to(expected[:1], expected.shape)) > 1e-2, kind


def test_closed_forms():
    """The documented closed forms themselves: I for squared_error, diag(sqrt(s (1 - s)))
    for logistic, column m = sqrt(p_m) (e_m - p) for softmax."""
    loss, out, y = problem("squared_error")
    s = fnet.hessian_sqrt(loss, out, y)
    assert_close(s, jnp.broadcast_to(jnp.eye(4)[:, None, :], (4, 3, 4)), "squared_error's S")
    loss, out, y = problem("logistic (B, k)")
    sigma = jax.nn.sigmoid(out)
    expected = jnp.eye(4)[:, None, :] * jnp.sqrt(sigma * (1 - sigma))[None]
    assert_close(fnet.hessian_sqrt(loss, out, y), expected, "logistic's S")
    loss, out, y = problem("softmax labels")
    p = jax.nn.softmax(out, axis=1)
    expected = jnp.sqrt(p).T[:, :, None] * (jnp.eye(4)[:, None, :] - p[None])
    assert_close(fnet.hessian_sqrt(loss, out, y), expected, "softmax's S")


def _cubic(out, y):
    """mean_b sum_k (o - y)^3 / 6: H_b = diag(o_b - y_b), PSD only where o >= y."""
    return jnp.mean(jnp.sum((out - y) ** 3, axis=1)) / 6


def test_not_positive_semi_definite():
    """The eigen path, eagerly, refuses a clearly negative eigenvalue, naming "loss" and
    the first bad example (and passes a PSD Hessian); under jit (values
    unknown when the error would be raised) that example's columns are NaN and the
    others' are exact."""
    with pytest.raises(fnet.ArgumentError) as info:
        fnet.hessian_sqrt(lambda o, y: -L.squared_error(o, y), jnp.ones((3, 4)), jnp.zeros((3, 4)))
    assert info.value.argument == "loss" and "example 0" in str(info.value)
    out = jnp.asarray([[1.0, 2.0, 0.5, 1.5], [0.5, -1.0, 2.0, 1.0], [3.0, 0.25, 1.0, 2.0]])
    y = jnp.zeros((3, 4))
    with pytest.raises(fnet.ArgumentError) as info:
        fnet.hessian_sqrt(_cubic, out, y)
    assert info.value.argument == "loss"
    assert "example 1" in str(info.value) and "-1" in str(info.value)
    assert "positive semi-definite" in str(info.value)
    s = jax.jit(fnet.hessian_sqrt, static_argnums=0)(_cubic, out, y)
    assert bool(jnp.any(jnp.isnan(s[:, 1])))
    expected = example_hessians(_cubic, out, y)
    assert_close(products(s)[::2], expected[::2], "the PSD examples under jit")
    # eagerly, a PSD Hessian passes (a singular one: under jit in the test above, where an
    # eigenvalue of -1e-17 taken for a negative one would give NaN)
    assert_close(products(fnet.hessian_sqrt(_cubic, jnp.abs(out), y)),
                 jnp.abs(expected), "eager, PSD")


def test_checks_the_loss_shapes():
    """The loss's own shape checks run first: mismatched targets raise its error."""
    with pytest.raises(fnet.LayerError, match="targets"):
        fnet.hessian_sqrt(L.squared_error, jnp.ones((3, 2)), jnp.ones((3, 3)))


# ---------------------------------------------------------------------------------------
# The sampled square root.

SAMPLES = 4000
#: Jitted once per loss and sample count (eager calls compile every primitive alone).
sampled = jax.jit(fnet.sampled_hessian_sqrt, static_argnums=(0, 4))
#: An error of more than this many standard errors fails. The keys are fixed, so the test
#: is deterministic; as a statistical statement, each estimate is the mean of 4000
#: independent bounded (Bernoulli, categorical) or Gaussian-product terms, nearly Gaussian,
#: so an unbiased estimator lands beyond 5 standard errors in one of the ~170 entries
#: checked with probability about 1e-4, while a wrong scale (1/sqrt(samples), the batch
#: factor B) or distribution is off by tens of percent: many standard errors, which are
#: about 2% of the largest entry here (the largest z seen is 3.5).
Z_MAX = 5.0


SAMPLED_KINDS = (
    "squared_error (2, 2)", "logistic (B, k)", "softmax labels", "user: cosh, C = B",
    "user: cosh",
)


@pytest.mark.parametrize("kind", SAMPLED_KINDS)
def test_sampled_square_root(kind):
    """Shape (samples, B, *o); the mean of the 4000 columns' S S^T within Z_MAX standard
    errors of H_b, one column far from it; the same key gives the same columns, another
    key others; the built-in losses draw their targets from the model, so y does not
    matter, while the user loss's S_b eps follows its Hessian, which depends on y."""
    loss, out, y = problem(kind)
    expected = np.asarray(example_hessians(loss, out, y))
    size = int(np.prod(out.shape[1:]))
    s = sampled(loss, out, y, jax.random.key(7), SAMPLES)
    assert s.shape == (SAMPLES,) + out.shape and s.dtype == out.dtype
    flat = np.asarray(s).reshape(SAMPLES, out.shape[0], size) * np.sqrt(SAMPLES)
    terms = flat[:, :, :, None] * flat[:, :, None, :]  # each column's S S^T, unscaled
    mean = terms.mean(axis=0)
    assert_close(mean, products(s), "the columns' mean is sum_m S S^T")
    standard_error = terms.std(axis=0, ddof=1) / np.sqrt(SAMPLES)
    scale = np.max(np.abs(expected))
    z = np.abs(mean - expected) / np.maximum(standard_error, 1e-300)
    assert np.all(np.abs(mean - expected) <= Z_MAX * standard_error + 1e-12 * scale), (
        f"{kind}: {np.max(z):.2f} standard errors off")
    assert np.max(standard_error) < 0.05 * scale, kind  # precise enough to mean something
    assert rel_err(terms[0], expected) > 0.05, f"{kind}: one column is already exact?"

    assert_close(sampled(loss, out, y, jax.random.key(7), SAMPLES), s, "same key")
    assert rel_err(sampled(loss, out, y, jax.random.key(8), SAMPLES), s) > 1e-3, "another key"
    _, _, other_y = problem(kind, seed=1)
    with_other_y = sampled(loss, out, other_y, jax.random.key(7), SAMPLES)
    if kind.startswith("user"):
        assert rel_err(with_other_y, s) > 1e-3, kind
    else:
        assert_close(with_other_y, s, f"{kind}: targets drawn from the model, y unused")
    if kind == "squared_error (2, 2)":  # eagerly, the same numbers
        eager = fnet.sampled_hessian_sqrt(loss, out, y, jax.random.key(7), samples=SAMPLES)
        assert_close(eager, s, "eager")


def test_sampled_arguments():
    loss, out, y = problem("softmax labels")
    for key in (None, 0, jax.random.split(jax.random.key(0), 2), jnp.zeros(3, jnp.uint32)):
        with pytest.raises(fnet.ArgumentError) as info:
            fnet.sampled_hessian_sqrt(loss, out, y, key)
        assert info.value.argument == "key"
    for samples in (0, -2, 2.0, True):
        with pytest.raises(fnet.ArgumentError) as info:
            fnet.sampled_hessian_sqrt(loss, out, y, jax.random.key(0), samples=samples)
        assert info.value.argument == "samples"
    # a raw uint32 key works too
    raw = fnet.sampled_hessian_sqrt(L.squared_error, out, out, jax.random.PRNGKey(0), samples=2)
    assert raw.shape == (2,) + out.shape
    with pytest.raises(fnet.LayerError, match="targets"):
        fnet.sampled_hessian_sqrt(L.squared_error, out, jnp.ones((3, 5)), jax.random.key(0))


# ---------------------------------------------------------------------------------------
# Argument checks of the curvature products.

NET = fnet.chain(fnet.dense(3), fnet.tanh, fnet.dense(2))


def _bad_vs(params):
    """(description, v, the start of the error message)."""
    first, _, last = params
    return [
        ("too few entries", params[:2], "v must be a tuple of 3 entries like params, got tuple"),
        ("a list", list(params), "v must be a tuple of 3 entries like params, got list"),
        ("None", None, "v must be a tuple of 3 entries like params, got NoneType"),
        ("a missing leaf", ({"w": first["w"]}, (), last), "layer 0 (dense(3)): v have structure"),
        ("an extra leaf", (first, (), dict(last, c=last["b"])),
         "layer 2 (dense(2)): v have structure"),
        ("a wrong shape", (first, (), {"w": last["w"][:2], "b": last["b"]}),
         "layer 2 (dense(2)): v leaf ['w'] has shape (2, 2), expected (3, 2)"),
        ("a wrong dtype", (jax.tree.map(lambda a: a.astype(jnp.float32), first), (), last),
         "layer 0 (dense(3)): v leaf ['b'] has dtype float32, expected float64"),
    ]


@pytest.mark.parametrize("product", [fnet.ggn_vp, fnet.hvp], ids=["ggn_vp", "hvp"])
def test_products_refuse_a_v_unlike_params(product):
    """A LayerError naming "v" (and the layer, where one is at fault), eagerly and jitted
    (the check runs at trace time)."""
    rng = np.random.default_rng(0)
    params, _ = random_params(NET, (4,), rng)
    x, y = jnp.asarray(rng.standard_normal((2, 4))), jnp.asarray(rng.standard_normal((2, 2)))
    fn = product(NET, L.squared_error)
    for what, v, start in _bad_vs(params):
        for call in (fn, jax.jit(fn)):
            with pytest.raises(fnet.LayerError) as info:
                call(params, x, y, v)
            assert str(info.value).startswith(start), (what, str(info.value))


def test_products_refuse_bad_arguments():
    with pytest.raises(fnet.ArgumentError) as info:
        fnet.ggn_vp(NET, L.squared_error, remat="everything")
    assert info.value.argument == "remat"
    with pytest.raises(fnet.ArgumentError) as info:
        fnet.ggn_vp(NET, "squared_error")
    assert info.value.argument == "loss"
    dropout_net = fnet.chain(fnet.dense(3), fnet.dropout(0.5), fnet.dense(2))
    rng = np.random.default_rng(0)
    params, _ = random_params(dropout_net, (4,), rng)
    x, y = jnp.asarray(rng.standard_normal((2, 4))), jnp.asarray(rng.standard_normal((2, 2)))
    for product in (fnet.ggn_vp, fnet.hvp):
        with pytest.raises(fnet.LayerError, match="dropout"):
            product(dropout_net, L.squared_error)(params, x, y, params)  # no key
