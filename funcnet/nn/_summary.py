"""A network at a glance: every layer's name, shapes, parameter count and forward FLOPs."""

from __future__ import annotations

import html
import math
import dataclasses
from typing import List, Tuple

import jax

from funcnet._arguments import check_shape
from funcnet.nn._layer import Layer, abstract_init


@dataclasses.dataclass(frozen=True)
class SummaryRow:
    """One layer: ``depth`` of nesting (0 = the network itself), ``index`` within its
    parent (None for the network), shapes per example, parameter count, forward FLOPs per
    example (a container's counts include its children's)."""

    depth: int
    index: object
    name: str
    in_shape: Tuple[int, ...]
    out_shape: Tuple[int, ...]
    params: int
    flops: int


@dataclasses.dataclass(frozen=True)
class Summary:
    """``print`` it for a text table (nested layers indented); in a notebook it shows as
    an HTML table. ``rows[0]`` is the whole network, so its counts are the totals."""

    rows: Tuple[SummaryRow, ...]

    @property
    def total_params(self) -> int:
        return self.rows[0].params

    @property
    def total_flops(self) -> int:
        return self.rows[0].flops

    def _cells(self):
        for row in self.rows:
            label = row.name if row.index is None else f"{row.index}: {row.name}"
            yield ("  " * row.depth + label, str(row.in_shape), str(row.out_shape),
                   f"{row.params:,}", f"{row.flops:,}")

    def __str__(self) -> str:
        header = ("layer", "in", "out", "params", "FLOPs/example")
        cells = [header] + list(self._cells())
        widths = [max(len(c[i]) for c in cells) for i in range(5)]
        lines = []
        for n, cell in enumerate(cells):
            lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                   for i, (c, w) in enumerate(zip(cell, widths))))
            if n == 0:
                lines.append("-" * len(lines[0]))
        lines.append(f"total: {self.total_params:,} params, {self.total_flops:,} forward "
                     f"FLOPs per example")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{h}</th>" for h in ("layer", "in", "out", "params", "FLOPs/example"))
        body = "".join(
            "<tr>" + "".join(
                f"<td style='text-align:{'left' if i == 0 else 'right'};"
                f"padding-left:{self.rows[k].depth * 1.5 if i == 0 else 0.5}em'>"
                f"{html.escape(c.strip())}</td>" for i, c in enumerate(cell)) + "</tr>"
            for k, cell in enumerate(self._cells()))
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def summary(net: Layer, in_shape) -> Summary:
    """The :class:`Summary` of ``net`` for per-example input shape ``in_shape``, a tuple
    (no data needed: shapes come from ``init`` traced abstractly). ``in_shape`` as a bare
    int (``784`` for ``(784,)``) raises :class:`~funcnet.ArgumentError` with the fix.

    Works for a net on integer inputs too: a first layer built with an ``in_dtype``
    (``fnet.layer(g, init_params, in_dtype=jnp.int32)``, an embedding) is traced, and its
    FLOPs counted, on inputs of that dtype.

    Example:
      >>> import funcnet as fnet
      >>> s = fnet.summary(fnet.chain(fnet.dense(4), fnet.relu, fnet.dense(2)), (3,))
      >>> s.total_params, s.total_flops
      (26, 50)
    """
    rows: List[SummaryRow] = []
    _walk(net, check_shape("in_shape", in_shape), 0, None, rows)
    return Summary(tuple(rows))


def _walk(layer: Layer, in_shape, depth, index, rows) -> Tuple[int, ...]:
    params, out_shape = abstract_init(layer, in_shape)
    count = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))
    rows.append(SummaryRow(depth, index, layer.name, in_shape, tuple(out_shape), count,
                           layer.flops(in_shape)))
    for child_index, child, child_shape in layer.sublayers(in_shape):
        _walk(child, child_shape, depth + 1, child_index, rows)
    return tuple(out_shape)
