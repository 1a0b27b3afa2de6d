"""What the conv and pooling tests share: DESIGN.md's "SAME" padding, and hypothesis
draws of a per-axis argument (one int for every spatial axis, or one per axis)."""

from __future__ import annotations

import math

from hypothesis import strategies as st


def same_pads(n, k, s, d=1):
    """DESIGN.md's "SAME" for an axis of n entries, window k, stride s and dilation d:
    ceil(n / s) outputs, the total padding floor-halved before, the rest after."""
    total = max((math.ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0)
    return total // 2, total - total // 2


def per_axis(draw, values, rank):
    """(argument, per-axis tuple): one int for every axis, or one per axis."""
    if draw(st.booleans()):
        value = draw(values)
        return value, (value,) * rank
    value = tuple(draw(values) for _ in range(rank))
    return value, value
