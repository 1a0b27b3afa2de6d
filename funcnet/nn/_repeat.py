"""``repeat(layer, n)``: n copies of one shape-keeping layer with stacked params.

The params of the n copies are stacked along a new leading axis (leaf shape (n, *S)),
and the forward pass is one ``jax.lax.scan`` over them, so the traced program, and the
compile time, do not grow with n. The backward walk (``funcnet.ad``) walks it down with a
second, reversed scan; forward mode scans ``jax.jvp``.
"""

from __future__ import annotations

import dataclasses

import jax

from funcnet._arguments import check_int, check_shape
from funcnet._errors import ArgumentError, LayerError, Path, shape_str
from funcnet.nn._layer import Layer, apply_with_key


@dataclasses.dataclass(frozen=True, repr=False)
class Repeat(Layer):
    """``layer`` applied ``n`` times, z_{k+1} = g(w_k; z_k), params stacked on axis 0."""

    layer: Layer
    n: int

    def __post_init__(self):
        if not isinstance(self.layer, Layer):
            raise ArgumentError("repeat(layer)", f"must be a funcnet Layer, got {self.layer!r}.")
        object.__setattr__(self, "n", check_int("repeat(n)", self.n, minimum=1))

    @property
    def name(self) -> str:
        return f"repeat({self.layer.name}, {self.n})"

    @property
    def in_dtype(self):
        """The dtype its inputs take: that of the repeated layer."""
        return self.layer.in_dtype

    def init(self, key, in_shape):
        in_shape = check_shape("in_shape", in_shape)
        params, out_shape = self.layer.init(key, in_shape)
        _check_shape_kept(self, in_shape, out_shape, ())
        keys = jax.random.split(key, self.n)
        return jax.vmap(lambda k: self.layer.init(k, in_shape)[0])(keys), in_shape

    @property
    def stochastic(self) -> bool:
        """Whether the repeated layer draws from a key (see :meth:`copy_keys`)."""
        return self.layer.stochastic

    def copy_keys(self, key):
        """The keys of the n copies, ``jax.random.split(key, n)`` (copy k gets row k), or
        None without a key or when the layer draws none."""
        if key is None or not self.stochastic:
            return None
        return jax.random.split(key, self.n)

    def apply(self, params, z, key=None):
        return self.apply_copies(params, z, self.copy_keys(key))

    def apply_copies(self, params, z, keys=None):
        """The copies in order, copy k with ``keys[k]`` (None: no keys), one scan."""
        def body(z, copy):
            w, key = copy
            return apply_with_key(self.layer, w, z, key), None

        return jax.lax.scan(body, z, (params, keys), length=self.n)[0]

    def check(self, params, in_shape, path: Path = ()):
        leaves = jax.tree.leaves(params)
        for leaf in leaves:
            if jax.numpy.ndim(leaf) < 1 or jax.numpy.shape(leaf)[0] != self.n:
                raise LayerError(
                    f"the params of {self.name} must be stacked with a leading axis of "
                    f"{self.n} (one slice per copy), but a leaf has shape "
                    f"{shape_str(jax.numpy.shape(leaf))}. Build them with net.init.",
                    path,
                )
        one_copy = jax.tree.map(
            lambda leaf: jax.ShapeDtypeStruct(jax.numpy.shape(leaf)[1:], jax.numpy.result_type(leaf)),
            params)
        try:
            out_shape = self.layer.check(one_copy, in_shape, path + ((0, self.layer.name),))
        except LayerError as error:
            raise LayerError(
                f"{error.problem} (This is one copy inside {self.name}, whose params are "
                f"those of one copy stacked along a leading axis of {self.n}.)",
                error.path,
            ) from None
        _check_shape_kept(self, in_shape, out_shape, path)
        return tuple(in_shape)

    def check_input_values(self, z, path: Path = ()) -> None:
        """The repeated layer's check (copy 0 receives the repeat's input)."""
        self.layer.check_input_values(z, path + ((0, self.layer.name),))

    def flops(self, in_shape) -> int:
        """n times its layer's."""
        return self.n * self.layer.flops(in_shape)

    def model_axes(self, params):
        """The repeated layer's (its axes count from the end, so the stacking axis in front
        of every leaf is never split)."""
        return self.layer.model_axes(params)

    def sublayers(self, in_shape):
        return (("each", self.layer, tuple(in_shape)),)

    def describe(self) -> str:
        return f"{self.layer.name} applied {self.n} times (a scan over stacked params)"


def _check_shape_kept(repeat, in_shape, out_shape, path):
    if tuple(out_shape) != tuple(in_shape):
        raise LayerError(
            f"{repeat.name} needs a layer that keeps the shape, but {repeat.layer.name} maps "
            f"per-example shape {shape_str(in_shape)} to {shape_str(out_shape)}. Repeat a "
            f"block that ends at the width it starts with.",
            path,
        )


def repeat(layer: Layer, n: int) -> Repeat:
    """``n`` copies of ``layer`` (which must keep the shape), as one scanned layer.

    Params: ``layer``'s params with every leaf stacked, shape (n, *leaf shape); copy k
    is ``jax.tree.map(lambda a: a[k], params)``. The same function as
    ``chain(layer, ..., layer)`` with those params unstacked, at a compile time that does
    not grow with n.

    Example:
      >>> import jax, funcnet as fnet
      >>> block = fnet.chain(fnet.dense(16), fnet.tanh)
      >>> deep = fnet.chain(fnet.dense(16), fnet.repeat(block, 32), fnet.dense(1))
      >>> params, _ = deep.init(jax.random.key(0), (4,))
      >>> params[1][0]["w"].shape
      (32, 16, 16)
    """
    return Repeat(layer, n)
